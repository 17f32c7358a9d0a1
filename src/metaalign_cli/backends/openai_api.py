"""OpenAI-compatible backend: OpenAI, vLLM, llama.cpp's server, Ollama... (``--base-url``)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from pydantic import Field

from metaalign_cli.backends.base import Backend, BackendError, BackendOptions, Generation, GenerationSettings, Prompt
from metaalign_cli.errors import MetaAlignError
from metaalign_cli.redact import redact_url


class APIOptions(BackendOptions):
    """Load options of the API backends (openai, anthropic)."""

    base_url: str | None = Field(None, description="The server; default: the provider's.")
    concurrency: int = Field(4, ge=1, description="Requests in flight.")
    retries: int = Field(4, ge=0, description="The client's retries (429, 5xx, timeouts), exponential backoff "
                                              "honouring Retry-After.")
    timeout: float = Field(120.0, gt=0, description="Seconds per request.")


class OpenAIBackend(Backend):
    """Any OpenAI-compatible server through the official ``openai`` client.

    ``model``: the served model name (default: the first one the server lists).
    ``base_url``: the server (default: the client's, i.e. OpenAI). The key comes only from
    ``$OPENAI_API_KEY`` (a placeholder is sent to local servers that need none).
    ``concurrency``: requests in flight. ``retries``: the client's own retries, with
    exponential backoff that honours Retry-After, on 408/409/429/5xx and timeouts.
    Raw prompts use the completions endpoint, chat prompts the chat endpoint.
    """

    name = "openai"
    Options = APIOptions

    def __init__(self, model: str | None, base_url: str | None = None, concurrency: int = 4,
                 retries: int = 4, timeout: float = 120.0):
        try:
            import openai
        except ImportError:
            raise MetaAlignError("the openai backend needs the openai package: pip install openai") from None
        key = os.environ.get("OPENAI_API_KEY")
        if not key and not base_url:
            raise MetaAlignError("the openai backend needs OPENAI_API_KEY in the environment (or --base-url for a local server)")
        self.base_url = base_url
        self.self_hosted = bool(base_url) and "api.openai.com" not in base_url
        self.concurrency = max(1, int(concurrency))
        self.client = openai.OpenAI(api_key=key or "sk-no-key", base_url=base_url,
                                    max_retries=retries, timeout=timeout)
        self._openai = openai
        if not model:
            try:
                models = self.client.models.list().data
            except openai.OpenAIError as e:
                raise MetaAlignError(f"{redact_url(base_url)}: cannot list models: {e}") from None
            if not models:
                raise MetaAlignError(f"{redact_url(base_url)}: the server lists no model; pass --model")
            model = models[0].id
        self.model_id = model

    def _one(self, p: Prompt, s: GenerationSettings) -> Generation:
        common = dict(model=self.model_id, max_tokens=s.max_new_tokens, temperature=s.temperature,
                      top_p=s.top_p, seed=s.seed, stop=list(s.stop) or None)
        if self.self_hosted or s.repeat_penalty != 1.0:
            # llama.cpp's server applies repeat_penalty 1.1 unless told otherwise: say 1.0
            # explicitly so no penalty is added that the user did not ask for.
            common["extra_body"] = {"repeat_penalty": s.repeat_penalty}
        try:
            if p.chat:
                r = self.client.chat.completions.create(messages=p.messages(), **common)
                ch = r.choices[0]
                text = ch.message.content  # None (no text) fails the record, as a null completion does
            else:
                r = self.client.completions.create(prompt=p.text, **common)
                ch = r.choices[0]
                text = ch.text
        except self._openai.OpenAIError as e:
            raise BackendError(f"{type(e).__name__}: {e}".splitlines()[0]) from e
        u = r.usage
        return Generation(text, getattr(u, "prompt_tokens", None), getattr(u, "completion_tokens", None),
                          ch.finish_reason)

    def generate(self, prompts: list[Prompt], settings: GenerationSettings) -> list[Generation | Exception]:
        def run(p):
            try:
                return self._one(p, settings)
            except Exception as e:
                return e

        if self.concurrency == 1 or len(prompts) == 1:
            return [run(p) for p in prompts]
        with ThreadPoolExecutor(self.concurrency) as ex:
            return list(ex.map(run, prompts))

    def info(self) -> dict:
        d = {"backend": self.name, "model": self.model_id}
        if self.base_url:
            d["base_url"] = redact_url(self.base_url)
        return d

    def chunk_size(self, batch_size: int, concurrency: int) -> int:
        return max(1, batch_size, concurrency)

    def close(self) -> None:
        self.client.close()
