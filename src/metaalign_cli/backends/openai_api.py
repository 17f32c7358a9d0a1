"""OpenAI-compatible backend: OpenAI, vLLM, llama.cpp's server, Ollama... (``--base-url``)."""

from __future__ import annotations


from pydantic import Field

from metaalign_cli.backends.base import BackendError, Generation, GenerationSettings, Prompt, tokenizer_prompt_ids
from metaalign_cli.backends.server import ServerBackend, ServerOptions, api_key, split_query
from metaalign_cli.errors import MetaAlignError
from metaalign_cli.redact import redact_text, redact_url


class OpenAIOptions(ServerOptions):
    """Options of the openai backend (``create_backend("openai", model, **options)``)."""
    tokenizer: str | None = Field(None, description="HF directory or hub id of the served model's tokenizer: "
                                                    "prompts are then fitted to the context before sending, and "
                                                    "the loop guard counts real tokens.")
    max_model_len: int | None = Field(None, ge=16, description="The served model's context in tokens. Default: "
                                                               "what the server lists (vLLM does), if anything.")


class OpenAIBackend(ServerBackend):
    """Any OpenAI-compatible server through the official ``openai`` client.

    ``model``: the served model name (default: the first one the server lists).
    The key comes only from ``$OPENAI_API_KEY`` (a placeholder is sent to local servers that
    need none). Raw prompts use the completions endpoint, chat prompts the chat endpoint.
    Self-hosted servers are sent ``top_k`` and the penalty under both names that vLLM
    (``repetition_penalty``) and llama.cpp's server (``repeat_penalty``) read, so neither adds a
    default of its own; vLLM is also asked to stop looping requests (``repetition_detection``).
    The loop guard then cuts a looping tail as the local backends stop it (token ids from
    ``tokenizer``, else whitespace-separated words). A reply without text (``null``, or no
    choice) fails that prompt (a BackendError). Options: :class:`OpenAIOptions`.
    """

    name = "openai"
    Options = OpenAIOptions
    key_env = "OPENAI_API_KEY"

    def __init__(self, model: str | None, base_url: str | None = None, concurrency: int = 4,
                 retries: int = 4, timeout: float = 120.0, tokenizer: str | None = None,
                 max_model_len: int | None = None):
        self.options = OpenAIOptions(base_url=base_url, concurrency=concurrency, retries=retries, timeout=timeout,
                                     tokenizer=tokenizer, max_model_len=max_model_len)
        try:
            import openai
        except ImportError:
            raise MetaAlignError("the openai backend needs the openai package: pip install openai") from None
        key = api_key(self.key_env, not base_url,
                      "the openai backend needs OPENAI_API_KEY in the environment (or --base-url for a local server)")
        self.base_url = base_url
        self.self_hosted = bool(base_url) and "api.openai.com" not in base_url
        self.concurrency = self.options.concurrency
        url, query = split_query(base_url)
        self.client = openai.OpenAI(api_key=key or "sk-no-key", base_url=url, default_query=query,
                                    max_retries=retries, timeout=timeout)
        self._openai = openai
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        self.loop_tokenizer = self.tokenizer
        # The list is needed for the model's name or context; a local server's is read anyway,
        # since it answers any name (a warning below when it lists others).
        needed = not model or (self.tokenizer is not None and not max_model_len)
        models = []
        if needed or self.self_hosted:
            try:
                models = self.client.models.list().data
            except (openai.OpenAIError, ValueError) as e:
                if needed:
                    msg = redact_text(str(e), self.secrets())
                    raise MetaAlignError(f"{redact_url(base_url) or 'the OpenAI API'}: cannot list models: "
                                         f"{msg}") from None
        if not models and not model:
            raise MetaAlignError(f"{redact_url(base_url)}: the server lists no model; pass --model")
        model = model or models[0].id
        listed = next((m for m in models if m.id == model), None)
        warnings = []
        if self.self_hosted and listed is None and models:
            warnings.append(f"{redact_url(base_url)}: the server lists {', '.join(repr(m.id) for m in models[:5])}, "
                            f"not '{model}'; a server that answers any name (llama.cpp's) is recorded as '{model}'")
        self.model_id = model
        self._ctx = max_model_len or _listed_context(listed)
        if self.tokenizer is not None and self._ctx is None:
            warnings.append(f"--tokenizer: {redact_url(base_url) or 'the server'} lists no context length for "
                            f"'{model}', so prompts are not fitted to it; pass --max-model-len N (an overlong prompt "
                            "then fails at the server)")
        self.warnings = tuple(warnings)

    def context_length(self) -> int | None:
        return self._ctx

    def count_prompt_tokens(self, prompt: Prompt) -> int | None:
        """Tokens of ``prompt`` by ``tokenizer`` (the chat template applied to chat prompts), or
        None without one."""
        if self.tokenizer is None:
            return None
        return len(tokenizer_prompt_ids(self.tokenizer, prompt, f"--tokenizer {self.options.tokenizer}"))

    def _one(self, p: Prompt, s: GenerationSettings) -> Generation:
        common = dict(model=self.model_id, max_tokens=s.max_new_tokens, temperature=s.temperature,
                      top_p=s.top_p, seed=s.seed, stop=list(s.stop) or None)
        if self.self_hosted:
            # llama.cpp's server applies repeat_penalty 1.1 and top_k 40 unless told otherwise:
            # say 1.0 and 0 (= off) explicitly, under the names each server reads.
            extra = {"repeat_penalty": s.repeat_penalty, "repetition_penalty": s.repeat_penalty, "top_k": s.top_k}
            if s.loop_guard:
                from metaalign_cli.backends.vllm_engine import _REPEAT

                extra["repetition_detection"] = dict(_REPEAT)
            common["extra_body"] = extra
        elif s.repeat_penalty != 1.0 or s.top_k:
            common["extra_body"] = {k: v for k, v in (("repeat_penalty", s.repeat_penalty), ("top_k", s.top_k))
                                    if (k == "top_k" and v) or (k == "repeat_penalty" and v != 1.0)}
        try:
            if p.chat:
                r = self.client.chat.completions.create(messages=p.messages(), **common)
            else:
                r = self.client.completions.create(prompt=p.text, **common)
        except self._openai.OpenAIError as e:
            raise BackendError(f"{type(e).__name__}: {e}".splitlines()[0]) from e
        except ValueError as e:  # a body that is not JSON (the client's json.loads)
            raise BackendError(f"the server's answer is not JSON ({e}) (model {self.model_id})") from e
        if not hasattr(r, "choices"):  # e.g. an HTML page with status 200
            raise BackendError(f"the server's answer is not a completion (a {type(r).__name__}) (model {self.model_id})")
        ch = r.choices[0] if r.choices else None
        if p.chat:
            text = ch.message.content if ch is not None and ch.message is not None else None
        else:
            text = ch.text if ch is not None else None
        if not isinstance(text, str):
            what = "no choice" if ch is None else "null text" if text is None else f"a {type(text).__name__} as text"
            raise BackendError(f"the server answered {what} (model {self.model_id})")
        u = r.usage
        finish = {"repetition": "loop"}.get(ch.finish_reason, ch.finish_reason)
        return Generation(text, getattr(u, "prompt_tokens", None), getattr(u, "completion_tokens", None), finish)

    def info(self) -> dict:
        d = super().info()
        if self.options.tokenizer:
            d["tokenizer"] = self.options.tokenizer
        if self._ctx:
            d["max_model_len"] = self._ctx
        return d

    def close(self) -> None:
        self.client.close()


def _listed_context(entry) -> int | None:
    """The context a server lists for a model: vLLM's ``max_model_len`` (others list none)."""
    if entry is None:
        return None
    extra = getattr(entry, "model_extra", None) or {}
    n = extra.get("max_model_len")
    return int(n) if isinstance(n, int) and n > 0 else None


def load_tokenizer(name: str):
    """An HF tokenizer from a directory or hub id (from the local cache when offline).
    Raises MetaAlignError when transformers is missing or the tokenizer cannot be loaded."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MetaAlignError("--tokenizer needs transformers: pip install 'metaalign-cli[torch]'") from None
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise MetaAlignError(f"{name}: cannot load tokenizer: {str(e).splitlines()[0]}") from None
