"""Anthropic backend (Claude models) through the official ``anthropic`` client."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from metaalign_cli.backends.base import Backend, BackendError, Generation, GenerationSettings, Prompt
from metaalign_cli.backends.openai_api import APIOptions
from metaalign_cli.errors import MetaAlignError
from metaalign_cli.redact import redact_url


class AnthropicBackend(Backend):
    """Claude through the Messages API. Key only from ``$ANTHROPIC_API_KEY``; ``base_url``
    for a proxy; ``concurrency`` requests in flight; the client's retries with backoff.
    Every prompt is sent as a user message (Anthropic has no raw completion endpoint)."""

    name = "anthropic"
    Options = APIOptions

    def __init__(self, model: str | None, base_url: str | None = None, concurrency: int = 4,
                 retries: int = 4, timeout: float = 120.0):
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
        try:
            r = self.client.messages.create(**kw)
        except self._anthropic.AnthropicError as e:
            raise BackendError(f"{type(e).__name__}: {e}".splitlines()[0]) from e
        text = "".join(getattr(b, "text", "") for b in r.content)
        reason = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}.get(r.stop_reason, r.stop_reason)
        return Generation(text, r.usage.input_tokens, r.usage.output_tokens, reason)

    def generate(self, prompts: list[Prompt], settings: GenerationSettings) -> list[Generation | Exception]:
        def run(p):
            try:
                return self._one(p, settings)
            except Exception as e:
                return e

        with ThreadPoolExecutor(self.concurrency) as ex:
            return list(ex.map(run, prompts))

    def info(self) -> dict:
        return {"backend": self.name, "model": self.model_id,
                **({"base_url": redact_url(self.base_url)} if self.base_url else {})}

    def chunk_size(self, batch_size: int, concurrency: int) -> int:
        return max(1, batch_size, concurrency)
