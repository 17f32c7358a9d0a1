"""What the server backends (openai, anthropic) share: their options and a pool of requests."""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from concurrent.futures import ThreadPoolExecutor

from pydantic import Field

from metaalign_cli.backends.base import (WORDS, Backend, BackendError, BackendOptions, Generation,
                                         GenerationSettings, Prompt, TokenKinds, loop_cut)
from metaalign_cli.errors import MetaAlignError
from metaalign_cli.records import replace_surrogates
from metaalign_cli.redact import redact_text, redact_url, url_secrets


def split_query(base_url: str | None) -> tuple[str | None, dict | None]:
    """(``base_url`` without its query string, the query's parameters or None): clients append
    paths to the base URL, so a ``?api-key=...`` left in it would be sent inside the path; it
    goes to the client as a default query instead, sent with every request."""
    if not base_url:
        return base_url, None
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    parts = urlsplit(base_url)
    if not parts.query:
        return base_url, None
    return urlunsplit(parts._replace(query="")), dict(parse_qsl(parts.query, keep_blank_values=True))


class ServerOptions(BackendOptions):
    """Options of a backend that talks to a server over HTTP."""

    base_url: str | None = Field(None, description="The server (e.g. http://127.0.0.1:8000/v1). Default: the "
                                                   "provider's.")
    concurrency: int = Field(4, ge=1, description="Requests in flight.")
    retries: int = Field(4, ge=0, description="Retries per request (the client's exponential backoff, honouring "
                                              "Retry-After) on connection errors, timeouts, 408/409/429/5xx.")
    timeout: float = Field(120.0, gt=0, description="Seconds one request may take before it is retried.")


class ServerBackend(Backend):
    """A backend answering each prompt with one HTTP request (:meth:`_one`), ``concurrency`` of
    them in flight, every answer through :func:`guard_remote` (with ``loop_tokenizer``'s ids
    when the backend has one); ``base_url`` is recorded with its credentials masked."""

    concurrency: int = 1
    base_url: str | None = None
    loop_tokenizer = None
    key_env: str | None = None  # the environment variable holding the API key

    def secrets(self) -> list[str]:
        """What an error text must never show: the API key and the base URL's credentials."""
        key = os.environ.get(self.key_env) if self.key_env else None
        return [*([key] if key else []), *url_secrets(self.base_url)]

    def scrubbed(self, e: Exception) -> Exception:
        """``e`` itself when its message holds none of :meth:`secrets`, else a BackendError of
        the message with them masked (a proxy's 401 may quote the Authorization header back);
        the original, with the key in its request and body, is not chained to it."""
        text = f"{type(e).__name__}: {e}" if not isinstance(e, BackendError) else str(e)
        clean = redact_text(text, self.secrets())
        if clean == text:
            return e
        err = BackendError(clean)
        err.__suppress_context__ = True
        return err

    def _one(self, p: Prompt, s: GenerationSettings) -> Generation:
        """The server's answer to one prompt, as it came (no loop guard yet)."""
        raise NotImplementedError

    def generate(self, prompts: list[Prompt], settings: GenerationSettings) -> list[Generation | Exception]:
        return self.generate_each(prompts, [settings] * len(prompts))

    def generate_each(self, prompts: list[Prompt], settings: list[GenerationSettings]) -> list[Generation | Exception]:
        """Every prompt its own request, ``concurrency`` in flight, whatever its settings."""
        def run(p, s):
            try:
                return guard_remote(self._one(p, s), s, self.loop_tokenizer)
            except Exception as e:  # one failed request never takes another's result
                return self.scrubbed(e)

        if self.concurrency == 1 or len(prompts) <= 1:
            return [run(p, s) for p, s in zip(prompts, settings)]
        with ThreadPoolExecutor(min(self.concurrency, len(prompts))) as ex:
            return list(ex.map(run, prompts, settings))

    def info(self) -> dict:
        return {"backend": self.name, "model": self.model_id,
                **({"base_url": same_url(redact_url(self.base_url))} if self.base_url else {})}

    def chunk_size(self, batch_size: int, concurrency: int) -> int:
        return max(1, batch_size, concurrency)


def same_url(url: str) -> str:
    """``url`` without a trailing ``/`` on its path (``.../v1/`` and ``.../v1`` are one server,
    for the judge cache and ``--resume``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/"))) if parts.path.endswith("/") else url


_KEY_OPTIONAL = contextvars.ContextVar("metaalign_api_key_optional", default=False)


@contextlib.contextmanager
def api_key_optional():
    """Within it, an API backend loads without its key (``judge --dry-run`` counts calls and
    tokens and calls nothing, so it needs none); a call it made would fail to authenticate."""
    token = _KEY_OPTIONAL.set(True)
    try:
        yield
    finally:
        _KEY_OPTIONAL.reset(token)


def api_key(env: str, needed: bool, message: str) -> str | None:
    """The API key in ``$env``. Raises MetaAlignError(``message``) when it is unset and
    ``needed``, except inside :func:`api_key_optional`."""
    key = os.environ.get(env)
    if not key and needed and not _KEY_OPTIONAL.get():
        raise MetaAlignError(message)
    return key


def guard_remote(g: Generation, s: GenerationSettings, tokenizer=None) -> Generation:
    """The loop guard after the fact for a server's answer: cut ``g.text`` where the local
    backends would have stopped (:func:`loop_cut` on ``tokenizer``'s ids of the text, or on its
    whitespace-separated words without one) and set ``finish_reason`` to ``loop``. Lone UTF-16
    surrogates in the answer (valid JSON, not text) become U+FFFD first."""
    if isinstance(g.text, str) and (clean := replace_surrogates(g.text)) != g.text:
        g = Generation(clean, g.prompt_tokens, g.completion_tokens, g.finish_reason, g.extra)
    if not s.loop_guard or not g.text:
        return g
    if tokenizer is not None:
        ids = tokenizer(g.text, add_special_tokens=False)["input_ids"]
        cut = loop_cut(ids, kinds=TokenKinds.of(tokenizer))
        if cut is None:
            return g
        text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        return Generation(text, g.prompt_tokens, cut, "loop", g.extra)
    spans = [m.span() for m in re.finditer(r"\S+", g.text)]
    cut = loop_cut([g.text[a:b] for a, b in spans], kinds=WORDS)
    if cut is None:
        return g
    return Generation(g.text[:spans[cut - 1][1]], g.prompt_tokens, g.completion_tokens, "loop", g.extra)
