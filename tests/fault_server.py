"""A small OpenAI-compatible judge server on 127.0.0.1 for judge tests, built on http.server.

It answers ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` and Anthropic's
``/v1/messages``. What it says is
up to the test: ``answer(prompt) -> str`` gives the judge's answer, and ``fault(prompt, n)``
(n = how many times this exact prompt was asked before) may return ``"429"`` (Too Many
Requests with ``Retry-After``), ``"500"`` or any other HTTP status code as a string (``"401"``),
``"401echo"`` (a 401 whose message quotes the request's Authorization or x-api-key header and path),
``"slow"`` (sleeps ``slow_s`` before answering, so a client with a shorter timeout gives up)
or None for a normal answer. ``answer`` may return None: the server then sends ``"text": null``
(completions) or ``"content": null`` (chat). ``delay_s`` is a fixed latency per request. ``port``
fixes the port (default: any free one). Every request is
logged (prompt, time, what was sent back) so tests can count calls and check the retry
timing; ``bodies`` holds the JSON bodies received and ``max_in_flight`` the most requests
handled at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

PAIR = re.compile(r"RESPONSE 1: (.*) \| RESPONSE 2: (.*)\. Consider the following aspect", re.S)


def pair_of(prompt: str) -> tuple[str, str]:
    """(response 1, response 2) of a prompt rendered from the paper's template E."""
    m = PAIR.search(prompt)
    if m is None:
        raise ValueError("not a pairwise judge prompt")
    return m.group(1), m.group(2)


def prefer_marker(prompt: str) -> str:
    """A judge that follows the marker words: GOOD beats FINE beats anything else; equal -> 0."""
    r1, r2 = pair_of(prompt)

    def rank(t: str) -> int:
        return 2 if "GOOD" in t else 1 if "FINE" in t else 0

    a, b = rank(r1), rank(r2)
    return "0" if a == b else "1" if a > b else "2"


class FaultServer:
    """Start with ``with FaultServer(answer, fault) as srv:``; ``srv.url`` is the base URL
    (``http://127.0.0.1:PORT/v1``); ``srv.log`` lists (prompt, time, status) per request."""

    def __init__(self, answer: Callable[[str], str | None], fault: Callable[[str, int], str | None] | None = None,
                 slow_s: float = 3.0, delay_s: float = 0.0, retry_after: str = "1", port: int = 0):
        self.answer = answer
        self.fault = fault or (lambda p, n: None)
        self.slow_s = slow_s
        self.delay_s = delay_s
        self.retry_after = retry_after
        self.log: list[tuple[str, float, str]] = []
        self.paths: list[str] = []  # the path of every POST, e.g. /v1/chat/completions
        self.seen: dict[str, int] = {}
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def do_GET(self):
                if self.path.split("?")[0].rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "fake-judge", "object": "model", "owned_by": "test"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                with srv.lock:
                    srv.in_flight += 1
                    srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
                try:
                    self._post()
                finally:
                    with srv.lock:
                        srv.in_flight -= 1

            def _post(self):
                n = int(self.headers.get("Content-Length") or 0)
                req = json.loads(self.rfile.read(n) or b"{}")
                route = self.path.split("?")[0]  # (a query string the client sends with every request)
                chat = route.endswith("/chat/completions")
                messages = route.endswith("/messages")  # Anthropic's Messages API
                prompt = req["messages"][-1]["content"] if chat or messages else req.get("prompt", "")
                with srv.lock:
                    srv.paths.append(self.path)
                    srv.bodies.append(req)
                    k = srv.seen.get(prompt, 0)
                    srv.seen[prompt] = k + 1
                f = srv.fault(prompt, k)
                with srv.lock:
                    srv.log.append((prompt, time.monotonic(), f or "ok"))
                if f == "429":
                    return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                                      {"Retry-After": srv.retry_after})
                if f == "500":
                    return self._send(500, {"error": {"message": "internal error", "type": "server_error"}})
                if f == "401echo":  # a gateway that quotes the request's credentials back
                    auth = self.headers.get("Authorization") or self.headers.get("x-api-key")
                    return self._send(401, {"error": {"message": f"Incorrect API key provided: {auth} (url {self.path})",
                                                      "type": "invalid_request_error"}})
                if f and f.isdigit():
                    return self._send(int(f), {"error": {"message": f"status {f}", "type": "test_fault"}})
                if f == "slow":
                    time.sleep(srv.slow_s)
                elif srv.delay_s:
                    time.sleep(srv.delay_s)
                text = srv.answer(prompt)
                usage = {"prompt_tokens": len(prompt) // 4, "completion_tokens": 1, "total_tokens": len(prompt) // 4 + 1}
                if messages:
                    body = {"id": "m1", "type": "message", "role": "assistant", "model": req.get("model"),
                            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                            "stop_sequence": None, "usage": {"input_tokens": len(prompt) // 4, "output_tokens": 1}}
                elif chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    body = {"id": "c1", "object": "chat.completion", "created": 0, "model": "fake-judge",
                            "choices": [choice], "usage": usage}
                else:
                    body = {"id": "c1", "object": "text_completion", "created": 0, "model": "fake-judge",
                            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                            "usage": usage}
                self._send(200, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def requests(self) -> int:
        with self.lock:
            return len(self.log)
