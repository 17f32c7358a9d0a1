"""Anthropic backend (Claude models) through the official ``anthropic`` client."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ConfigDict, Field

from metaalign_cli.backends.base import Backend, BackendError, Generation, GenerationSettings, Prompt
from metaalign_cli.errors import MetaAlignError


class Options(BaseModel):
    """Options of the anthropic backend (``create_backend("anthropic", model, **options)``)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(None, description="A proxy in front of the Messages API. Default: Anthropic's.")
    concurrency: int = Field(4, ge=1, description="Requests in flight.")
    retries: int = Field(4, ge=0, description="Retries per request (the client's backoff) on connection errors, "
                                              "timeouts, 408/409/429/5xx.")
    timeout: float = Field(120.0, gt=0, description="Seconds one request may take before it is retried.")


class AnthropicBackend(Backend):
    """Claude through the Messages API. Key only from ``$ANTHROPIC_API_KEY``; ``base_url``
    for a proxy; ``concurrency`` requests in flight; the client's retries with backoff.
    Every prompt is sent as a user message (Anthropic has no raw completion endpoint).
    ``top_k`` and ``top_p`` are sent when they are not off; the loop guard cuts a looping
    tail after the fact (on words). Options: :class:`Options`."""

    name = "anthropic"

    def __init__(self, model: str | None, base_url: str | None = None, concurrency: int = 4,
                 retries: int = 4, timeout: float = 120.0):
        from pydantic import ValidationError

        try:
            Options(base_url=base_url, concurrency=concurrency, retries=retries, timeout=timeout)
        except ValidationError as e:
            err = e.errors()[0]
            raise MetaAlignError(f"anthropic option '{err['loc'][0]}': {err['msg']}") from None
        try:
            import anthropic
        except ImportError:
            raise MetaAlignError("the anthropic backend needs the anthropic package: pip install anthropic") from None
        key = os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise MetaAlignError("the anthropic backend needs ANTHROPIC_API_KEY in the environment")
        if not model:
            raise MetaAlignError("the anthropic backend needs --model (e.g. claude-sonnet-4-5)")
        self._anthropic = anthropic
        self.client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=retries, timeout=timeout)
        self.model_id = model
        self.base_url = base_url
        self.concurrency = max(1, int(concurrency))

    def _one(self, p: Prompt, s: GenerationSettings) -> Generation:
        kw = dict(model=self.model_id, max_tokens=s.max_new_tokens, temperature=s.temperature,
                  messages=[{"role": "user", "content": p.text}])
        if p.system:
            kw["system"] = p.system
        if s.stop:
            kw["stop_sequences"] = list(s.stop)
        if s.top_k:
            kw["top_k"] = s.top_k
        if s.top_p < 1.0:
            kw["top_p"] = s.top_p
        try:
            r = self.client.messages.create(**kw)
        except self._anthropic.AnthropicError as e:
            raise BackendError(f"{type(e).__name__}: {e}".splitlines()[0]) from e
        if r.content is None:
            raise BackendError(f"the API answered no content (model {self.model_id})")
        text = "".join(getattr(b, "text", None) or "" for b in r.content)
        reason = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}.get(r.stop_reason, r.stop_reason)
        from metaalign_cli.backends.openai_api import guard_remote

        return guard_remote(Generation(text, r.usage.input_tokens, r.usage.output_tokens, reason), s)

    @property
    def chunk_size(self) -> int:
        return self.concurrency

    def generate(self, prompts: list[Prompt], settings: GenerationSettings) -> list[Generation | Exception]:
        def run(p):
            try:
                return self._one(p, settings)
            except Exception as e:
                return e

        with ThreadPoolExecutor(self.concurrency) as ex:
            return list(ex.map(run, prompts))

    def info(self) -> dict:
        return {"backend": self.name, "model": self.model_id, **({"base_url": self.base_url} if self.base_url else {})}
