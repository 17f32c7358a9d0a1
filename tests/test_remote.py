"""Correcting through servers: requests in flight, what is sent, null and empty answers, the
loop guard after the fact, prompts fitted with --tokenizer, --timeout and --retries. Real
local HTTP servers (tests/fault_server.py) on 127.0.0.1 and the real CLI."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli
from fault_server import FaultServer

from metaalign_cli.backends import create_backend
from metaalign_cli.backends.base import GenerationSettings, Prompt, loop_cut

EX = REPO / "examples" / "hh-rlhf.jsonl"


def records(n: int) -> str:
    return "".join(json.dumps({"id": f"r{i}", "query": f"Question {i}?", "response": f"Answer {i}."}) + "\n"
                   for i in range(n))


def lines(b: bytes) -> list[dict]:
    return [json.loads(l) for l in b.decode("utf-8").splitlines() if l.strip()]


def echo_id(prompt: str) -> str:
    """An answer naming the record it was asked about: 'fixed <n>' for 'Question <n>?'."""
    import re

    m = re.search(r"Question (\d+)\?", prompt)
    return f"fixed {m.group(1) if m else '?'}"


def test_concurrency_alone_puts_that_many_requests_in_flight():
    """`--concurrency 8` with the default --batch-size 1: 8 requests are served at once, and the
    output is still in input order, one line per record."""
    with FaultServer(echo_id, delay_s=0.3) as srv:
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "--concurrency", "8", "-q", input=records(24))
    assert r.returncode == 0, r.stderr.decode()
    out = lines(r.stdout)
    assert [o["id"] for o in out] == [f"r{i}" for i in range(24)]
    assert [o["corrected"] for o in out] == [f"fixed {i}" for i in range(24)]
    assert srv.max_in_flight == 8 and srv.requests == 24


def test_concurrency_holds_with_a_cap_per_record():
    """With `--max-new-tokens auto` every record of another length has its own cap; the
    requests still go out `--concurrency` at a time (grouping by cap sent them one by one)."""
    recs = "".join(json.dumps({"id": f"r{i}", "query": f"Question {i}?", "response": "word " * (60 * i + 1)}) + "\n"
                   for i in range(16))
    with FaultServer(echo_id, delay_s=0.3) as srv:
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "--concurrency", "8", "-q", input=recs)
    assert r.returncode == 0, r.stderr.decode()
    out = lines(r.stdout)
    assert [o["corrected"] for o in out] == [f"fixed {i}" for i in range(16)]
    caps = [o["metaalign"]["max_new_tokens"] for o in out]
    assert len(set(caps)) > 8 and [b["max_tokens"] for b in sorted(srv.bodies, key=lambda b: b["max_tokens"])] == sorted(caps)
    assert srv.max_in_flight == 8


def test_self_hosted_servers_get_top_k_both_penalty_names_and_repetition_detection():
    with FaultServer(echo_id) as srv:
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "--top-k", "7", "--repeat-penalty", "1.2",
                    "--temperature", "0.5", "-q", input=records(1))
        assert r.returncode == 0, r.stderr.decode()
        body = srv.bodies[0]
        assert body["top_k"] == 7 and body["repeat_penalty"] == 1.2 and body["repetition_penalty"] == 1.2
        assert body["repetition_detection"] == {"min_pattern_size": 16, "max_pattern_size": 64, "min_count": 4}
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "--no-loop-guard", "-q", input=records(1))
        body = srv.bodies[1]
        # greedy and no penalty are said explicitly, so llama.cpp's server adds neither its top_k 40 nor 1.1
        assert body["top_k"] == 0 and body["repeat_penalty"] == 1.0 and body["temperature"] == 0.0
        assert "repetition_detection" not in body


def test_null_text_fails_its_record_and_empty_text_is_flagged():
    """A server answering `"text": null` fails that record (`--on-error keep` writes it with an
    error, exit 1); an empty answer is written, flagged `empty` and counted in the summary."""
    def answer(prompt):
        return None if "Question 1?" in prompt else "" if "Question 2?" in prompt else echo_id(prompt)

    with FaultServer(answer) as srv:
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "--on-error", "keep", input=records(4))
        assert r.returncode == 1
        out = lines(r.stdout)
        assert [o["id"] for o in out] == ["r0", "r1", "r2", "r3"]
        assert "generation failed: the server answered null text" in out[1]["error"] and "corrected" not in out[1]
        assert out[2]["corrected"] == "" and out[2]["metaalign"]["empty"] is True
        assert "empty" not in out[0]["metaalign"] and out[3]["corrected"] == "fixed 3"
        err = r.stderr.decode()
        assert "corrected 3 record(s) (0 unchanged), 1 failed" in err and "1 empty" in err
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", input=records(2))
        assert r.returncode == 1 and lines(r.stdout)[0]["corrected"] == "fixed 0"
        assert "null text" in r.stderr.decode()  # --on-error fail: a one-line error, no traceback
        assert "Traceback" not in r.stderr.decode()


def test_loop_guard_cuts_a_looping_answer_as_local_backends_stop(tiny_llama_dir):
    """A looping answer is cut where the local backends stop (the first multiple of 8 tokens
    whose tail loops), on the --tokenizer's ids, or on words without one; finish_reason loop."""
    loop = "Thanks for asking. " + "I am here to help you with that. " * 30
    with FaultServer(lambda p: loop) as srv:
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "-q", "--on-loop", "keep", input=records(1))
        words = lines(r.stdout)[0]
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "--tokenizer", str(tiny_llama_dir), "-q",
                    "--on-loop", "keep", input=records(1))
        toks = lines(r.stdout)[0]
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "-q", input=records(1))
        trimmed = lines(r.stdout)[0]  # the default, --on-loop trim: what it said before repeating
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "--no-loop-guard", "-q", input=records(1))
        whole = lines(r.stdout)[0]
    assert whole["corrected"] == loop.strip() and whole["metaalign"]["finish_reason"] == "stop"
    n = loop_cut(loop.split())
    assert words["metaalign"]["finish_reason"] == "loop" and words["corrected"] == " ".join(loop.split()[:n])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    ids = tok(loop, add_special_tokens=False)["input_ids"]
    cut = loop_cut(ids)
    assert toks["metaalign"]["finish_reason"] == "loop" and toks["corrected"] == tok.decode(ids[:cut]).strip()
    assert len(toks["corrected"]) < len(whole["corrected"]) and toks["metaalign"]["tokenizer"] == str(tiny_llama_dir)
    assert trimmed["corrected"] == "Thanks for asking. I am here to help you with that."
    assert trimmed["metaalign"]["finish_reason"] == "loop" and trimmed["metaalign"]["loop_trimmed"] is True


def test_loop_guard_cuts_a_numbered_list_loop_but_not_counting(tiny_llama_dir):
    """A numbered list whose items repeat (the numbers change, nothing else) is a loop on the
    tokenizer's ids and on words alike; trimmed, the first item is kept. A count is no loop."""
    loop = "Here is how: " + " ".join(f"{i}. Boil an egg." for i in range(1, 40))
    count = " ".join(f"{i}," for i in range(1, 120))
    out = {}
    for name, answer in (("loop", loop), ("count", count)):
        with FaultServer(lambda p, a=answer: a) as srv:
            for tok in ((), ("--tokenizer", str(tiny_llama_dir))):
                r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "-q", *tok, input=records(1))
                out[name, bool(tok)] = lines(r.stdout)[0]
    for tok in (False, True):
        assert out["loop", tok]["metaalign"]["finish_reason"] == "loop"
        assert out["loop", tok]["corrected"] == "Here is how: 1. Boil an egg."
        assert out["count", tok]["metaalign"]["finish_reason"] == "stop"
        assert out["count", tok]["corrected"] == count


def test_a_name_the_local_server_does_not_list_and_a_tokenizer_without_a_context_are_said(tmp_path, tiny_llama_dir):
    """A local server that lists 'fake-judge' answers any name (llama.cpp's does): `correct` and
    `judge` warn that the name given is not the one it lists (it is recorded as given).
    --tokenizer with a server that lists no context length warns that prompts are not fitted
    unless --max-model-len is given."""
    (tmp_path / "j.jsonl").write_text(json.dumps({"query": "Q?", "response": "A.", "golden": "G."}) + "\n")
    note = "the server lists 'fake-judge', not 'gpt-4o'; a server that answers any name (llama.cpp's) is recorded as 'gpt-4o'"
    tok = "--tokenizer: {url} lists no context length for 'fake-judge', so prompts are not fitted to it"
    with FaultServer(lambda p: "1") as srv:
        for args, want in ((("-m", "gpt-4o"), note), (("-m", "fake-judge"), None),
                           (("-m", "fake-judge", "--tokenizer", str(tiny_llama_dir)), tok.format(url=srv.url)),
                           (("-m", "fake-judge", "--tokenizer", str(tiny_llama_dir), "--max-model-len", "2048"), None)):
            r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "-q", *args, input=records(1))
            assert r.returncode == 0, r.stderr.decode()
            warned = [x for x in r.stderr.decode().splitlines() if x.startswith("warning")]
            assert (len(warned) == 1 and want in warned[0]) if want else warned == [], (args, warned)
        r = run_cli("judge", str(tmp_path / "j.jsonl"), "-O", "harmless", "--candidate-field", "response",
                    "--base-url", srv.url, "-m", "gpt-4o", "--no-cache", "-q", "-o", str(tmp_path / "o.jsonl"))
        assert note in r.stderr.decode(), r.stderr.decode()
        assert json.loads((tmp_path / "o.jsonl").read_text())["judge"]["model"] == "gpt-4o"


def test_secrets_a_server_quotes_back_are_never_written(tmp_path):
    """A gateway whose 401 quotes the request's credentials back (the API key in its
    Authorization or x-api-key header, the base URL's user:password as Basic, a key in its
    query): none of them reaches stderr, the output rows of `correct --on-error keep` or
    `judge`'s rows; each is masked as REDACTED."""
    import base64

    key = "sk-TESTSECRET-abc123XYZ"
    secrets = (key, "hunter2pw", base64.b64encode(b"bob:hunter2pw").decode(), "URLKEY10x")
    env = {"OPENAI_API_KEY": key, "ANTHROPIC_API_KEY": key}
    with FaultServer(lambda p: "fixed", lambda p, n: "401echo") as srv:
        url = srv.url.replace("http://", "http://bob:hunter2pw@") + "?api_key=URLKEY10x"
        runs = {
            "correct-openai": ("correct", "--base-url", url, "-m", "m", "-O", "harmless", "--retries", "0",
                               "--on-error", "keep", "-o", str(tmp_path / "c.jsonl")),
            "correct-bearer": ("correct", "--base-url", srv.url, "-m", "m", "-O", "harmless", "--retries", "0",
                               "--on-error", "keep", "-o", str(tmp_path / "b.jsonl")),
            "correct-anthropic": ("correct", "-b", "anthropic", "--base-url", srv.url.removesuffix("/v1"), "-m", "m",
                                  "-O", "harmless", "--retries", "0", "--on-error", "keep", "-o", str(tmp_path / "a.jsonl")),
        }
        out = {}
        for name, args in runs.items():
            r = run_cli(*args, input=records(2), env=env)
            assert r.returncode == 1, (name, r.stderr.decode())
            out[name] = r.stderr.decode() + (tmp_path / args[-1].split("/")[-1]).read_text()
        judged = [json.dumps({"id": "j", "query": "Q?", "response": "A.", "golden": "G."}) + "\n"]
        (tmp_path / "j.jsonl").write_text("".join(judged))
        r = run_cli("judge", str(tmp_path / "j.jsonl"), "-O", "harmless", "--candidate-field", "response",
                    "--base-url", url, "-m", "m", "--retries", "0", "--no-cache", "-o", str(tmp_path / "jo.jsonl"), env=env)
        assert r.returncode == 1, r.stderr.decode()
        out["judge"] = r.stderr.decode() + (tmp_path / "jo.jsonl").read_text()
    assert srv.requests >= 7  # every run reached the server, which quoted the credentials back
    for name, text in out.items():
        assert "Incorrect API key provided" in text and "REDACTED" in text, (name, text)
        for secret in secrets:
            assert secret not in text, (name, secret, text)


def test_tokenizer_fits_prompts_to_max_model_len(tiny_llama_dir):
    """With --tokenizer and --max-model-len the query is cut from its start before sending, so
    the prompt the server gets fits: prompt tokens + max_new_tokens <= max_model_len."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    long_q = "".join(f"\n\nHuman: Tell me fact number {i} about owls.\n\nAssistant: Owls fact {i}." for i in range(60))
    rec = json.dumps({"id": "long", "query": long_q + "\n\nHuman: And one more?", "response": "No."}) + "\n"
    with FaultServer(echo_id) as srv:
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "-t", "hh-rlhf", "--prompt-format", "raw", "--tokenizer", str(tiny_llama_dir),
                    "--max-model-len", "512", "--max-new-tokens", "64", "-q", input=rec)
        assert r.returncode == 0, r.stderr.decode()
        sent = srv.bodies[0]["prompt"]
        r2 = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "-t", "hh-rlhf", "--prompt-format", "raw", "-q", input=rec)
        whole = srv.bodies[1]["prompt"]
    out = lines(r.stdout)[0]
    n = len(tok(sent)["input_ids"])
    assert n + 64 <= 512 < len(tok(whole)["input_ids"]) + 64
    assert out["metaalign"]["truncated_query_chars"] > 0 and out["metaalign"]["max_model_len"] == 512
    assert sent.count("Human:") < whole.count("Human:") and "And one more?" in sent
    assert lines(r2.stdout)[0]["metaalign"].get("truncated_query_chars") is None


def test_timeout_and_retries_flags():
    """--timeout gives up on a slow answer; --retries 0 then fails the record, --retries 1 asks
    again and gets it."""
    def slow_first(prompt, n):
        return "slow" if n == 0 else None

    with FaultServer(echo_id, slow_first, slow_s=3.0) as srv:
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "--timeout", "0.5", "--retries", "0",
                    "--on-error", "keep", "-q", input=records(1))
        assert r.returncode == 1 and "generation failed: APITimeoutError" in lines(r.stdout)[0]["error"]
    with FaultServer(echo_id, slow_first, slow_s=3.0) as srv:
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "--timeout", "0.5", "--retries", "1",
                    "-q", input=records(1))
        assert r.returncode == 0 and lines(r.stdout)[0]["corrected"] == "fixed 0" and srv.requests == 2


def test_backend_options_are_declared_and_checked():
    """openai and anthropic declare their options (pydantic, extra='forbid'): an unknown one,
    or one meant for another backend, is an error naming it; bad values name the option."""
    from pydantic import ValidationError

    from metaalign_cli.backends import BACKENDS, backend_class
    from metaalign_cli.errors import ConfigError

    for name in BACKENDS:
        if name == "vllm":
            continue  # tests/test_vllm.py (its module imports only where vLLM is installed)
        opts = backend_class(name).Options
        assert all(f.description for f in opts.model_fields.values()), name
        with pytest.raises(ValidationError):
            opts(bogus=1)
    with FaultServer(echo_id) as srv:
        be = create_backend("openai", None, base_url=srv.url, concurrency=3)
        assert be.model_id == "fake-judge" and be.chunk_size(1, 3) == 3 and be.context_length() is None
        with pytest.raises(ConfigError, match=r"the openai backend does not take option 'n_ctx'"):
            create_backend("openai", None, base_url=srv.url, n_ctx=512)
        with pytest.raises(ConfigError, match="the openai backend does not take option 'concurency'"):
            create_backend("openai", None, base_url=srv.url, concurency=3)
        with pytest.raises(ConfigError, match="openai backend option 'timeout'"):
            create_backend("openai", None, base_url=srv.url, timeout=0)
        g = be.generate([Prompt("Question 5?"), Prompt("Question 6?", chat=True)], GenerationSettings(max_new_tokens=8))
        assert [x.text for x in g] == ["fixed 5", "fixed 6"]
        be.close()


def test_lone_surrogates_in_answers_become_u_fffd(tmp_path):
    """A server answering `"\\ud800"` (valid JSON, not text): the record is written with U+FFFD
    there and every line is valid UTF-8 (it crashed the writer, losing the whole output)."""
    with FaultServer(lambda p: "C \ud800 end" if "Question 1?" in p else "x\udc80" if "Question 2?" in p
                     else echo_id(p)) as srv:
        r = run_cli("correct", "--base-url", srv.url, "-O", "harmless", "-q", input=records(3))
    assert r.returncode == 0, r.stderr.decode()
    r.stdout.decode("utf-8")  # strict: raises on any invalid byte
    assert [o["corrected"] for o in lines(r.stdout)] == ["fixed 0", "C \ufffd end", "x\ufffd"]
    # The judge's raw answer too, through its SQLite cache (which cannot store a lone surrogate).
    src = tmp_path / "j.jsonl"
    src.write_text(json.dumps({"id": "j", "query": "Q?", "golden": "g", "response": "r", "corrected": "c"}) + "\n",
                   encoding="utf-8")
    with FaultServer(lambda p: "1\udc80") as srv:
        r = run_cli("judge", str(src), "-O", "harmless", "--base-url", srv.url, "-m", "fake", "--retries", "0",
                    "--cache", str(tmp_path / "c.sqlite"), "-q")
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr.decode(), r.stderr.decode()
    rows = lines(r.stdout)  # strict UTF-8
    assert len(rows) == 2 and {j["raw_answer"] for x in rows for j in x["judgments"]} == {"1\ufffd"}


def test_base_url_query_is_sent_as_a_query_and_every_key_name_is_masked():
    """`?x-api-key=...` stays a query string on every request (it was glued into the path:
    /v1/?x-api-key=Kcompletions), and parameter names that end in key/token are masked."""
    with FaultServer(echo_id) as srv:
        url = srv.url + "?x-api-key=CANARY1&subscription-key=CANARY2&model_hint=m"
        r = run_cli("correct", "--base-url", url, "-O", "harmless", input=records(2))
    assert r.returncode == 0, r.stderr.decode()
    assert srv.paths == ["/v1/completions?x-api-key=CANARY1&subscription-key=CANARY2&model_hint=m"] * 2
    assert b"CANARY" not in r.stdout + r.stderr
    assert lines(r.stdout)[0]["metaalign"]["base_url"] == (
        srv.url + "?x-api-key=REDACTED&subscription-key=REDACTED&model_hint=m")


def test_anthropic_backend_against_a_local_messages_server():
    """`-b anthropic` through the installed anthropic client (2.x takes no sampling arguments:
    they go in the request body) against a local Messages API server."""
    with FaultServer(echo_id) as srv:
        r = run_cli("correct", "-b", "anthropic", "--base-url", srv.url.removesuffix("/v1"), "-m", "claude-x",
                    "-O", "harmless", "--top-k", "5", "-q", input=records(2), env={"ANTHROPIC_API_KEY": "sk-ant-CANARY"})
    assert r.returncode == 0, r.stderr.decode()
    assert [o["corrected"] for o in lines(r.stdout)] == ["fixed 0", "fixed 1"]
    assert srv.paths == ["/v1/messages"] * 2
    b = srv.bodies[0]
    assert (b["model"], b["temperature"], b["top_k"], b["max_tokens"]) == ("claude-x", 0.0, 5, 128)
    assert b"CANARY" not in r.stdout + r.stderr


def test_resume_redoes_records_kept_as_failed_and_restores_input_order(tmp_path):
    """Tenth new-user trial: after a short outage under `--on-error keep`, `--resume` said
    "3 already done (3 of them kept as failed)" and retried nothing. A failure is never kept as a
    result: `--resume` now redoes the kept failures, and the finished file is in input order,
    as an uninterrupted run's would be. The server fails `Question 1?` and `Question 2?` the
    first time each is asked (HTTP 500, no retries), then answers."""
    out = tmp_path / "o.jsonl"
    fault = (lambda p, k: "500" if k == 0 and ("Question 1?" in p or "Question 2?" in p) else None)
    with FaultServer(echo_id, fault) as srv:
        args = ("correct", "--base-url", srv.url, "-O", "harmless", "--retries", "0", "--on-error", "keep",
                "-o", str(out))
        r = run_cli(*args, input=records(4))
        assert r.returncode == 1
        assert [("error" in o, o.get("corrected")) for o in lines(out.read_bytes())] == [
            (False, "fixed 0"), (True, None), (True, None), (False, "fixed 3")]
        r = run_cli(*args, "--resume", input=records(4))
        err = r.stderr.decode()
        assert r.returncode == 0, err
        assert "corrected 2 record(s) (0 unchanged), 0 failed, 2 already done, 2 redone (kept as failed by the " \
            "earlier run)" in err, err
        got = lines(out.read_bytes())
        assert [(o["id"], o["corrected"], "error" in o) for o in got] == [
            ("r0", "fixed 0", False), ("r1", "fixed 1", False), ("r2", "fixed 2", False), ("r3", "fixed 3", False)]
        assert [o["metaalign"]["input_line"] for o in got] == [1, 2, 3, 4]
        assert srv.requests == 6  # 4, then only the two redone
        r = run_cli(*args, "--resume", input=records(4))  # finished: nothing redone, the file as it is
        assert r.returncode == 0 and "0 record(s) (0 unchanged), 0 failed, 4 already done," in r.stderr.decode()
        assert lines(out.read_bytes()) == got and srv.requests == 6
