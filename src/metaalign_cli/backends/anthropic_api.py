"""Anthropic backend (Claude models) through the official ``anthropic`` client."""

from __future__ import annotations

import inspect

from metaalign_cli.backends.base import BackendError, Generation, GenerationSettings, Prompt
from metaalign_cli.backends.server import ServerBackend, ServerOptions, api_key, split_query
from metaalign_cli.errors import MetaAlignError


class AnthropicOptions(ServerOptions):
    """Options of the anthropic backend (``create_backend("anthropic", model, **options)``);
    ``base_url``: a proxy in front of the Messages API."""


class AnthropicBackend(ServerBackend):
    """Claude through the Messages API. Key only from ``$ANTHROPIC_API_KEY``; ``base_url``
    for a proxy; ``concurrency`` requests in flight; the client's retries with backoff.
    Every prompt is sent as a user message (Anthropic has no raw completion endpoint).
    ``top_k`` and ``top_p`` are sent when they are not off; the loop guard cuts a looping
    tail after the fact (on words). Options: :class:`AnthropicOptions`."""

    name = "anthropic"
    Options = AnthropicOptions
    key_env = "ANTHROPIC_API_KEY"

    def __init__(self, model: str | None, base_url: str | None = None, concurrency: int = 4,
                 retries: int = 4, timeout: float = 120.0):
        try:
            import anthropic
        except ImportError:
            raise MetaAlignError("the anthropic backend needs the anthropic package: pip install anthropic") from None
        key = api_key(self.key_env, True, "the anthropic backend needs ANTHROPIC_API_KEY in the environment")
        if not model:
            raise MetaAlignError("the anthropic backend needs --model (e.g. claude-sonnet-4-5)")
        self._anthropic = anthropic
        url, query = split_query(base_url)
        self.client = anthropic.Anthropic(api_key=key or "no-key", base_url=url, default_query=query, max_retries=retries,
                                          timeout=timeout)
        self.model_id = model
        self.base_url = base_url
        self._sdk_sampling = "temperature" in inspect.signature(self.client.messages.create).parameters
        self.concurrency = max(1, int(concurrency))

    def _one(self, p: Prompt, s: GenerationSettings) -> Generation:
        kw: dict = dict(model=self.model_id, max_tokens=s.max_new_tokens, messages=[{"role": "user", "content": p.text}])
        sampling: dict = {"temperature": s.temperature}
        if p.system:
            kw["system"] = p.system
        if s.stop:
            kw["stop_sequences"] = list(s.stop)
        if s.top_k:
            sampling["top_k"] = s.top_k
        if s.top_p < 1.0:
            sampling["top_p"] = s.top_p
        if self._sdk_sampling:
            kw.update(sampling)
        else:  # SDKs from 2.x take no sampling arguments; the Messages API body still names them so
            kw["extra_body"] = sampling
        try:
            r = self.client.messages.create(**kw)
        except self._anthropic.AnthropicError as e:
            raise BackendError(f"{type(e).__name__}: {e}".splitlines()[0]) from e
        if r.content is None:
            raise BackendError(f"the API answered no content (model {self.model_id})")
        text = "".join(getattr(b, "text", None) or "" for b in r.content)
        reason = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}.get(r.stop_reason, r.stop_reason)
        return Generation(text, r.usage.input_tokens, r.usage.output_tokens, reason)
