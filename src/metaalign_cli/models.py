"""Which model a run uses: one :class:`ModelSpec` and one resolver for every command.

``--model NAME`` means the same in `correct`, `judge`, `train --base-model`, `export` and
``bench/``: a ``.gguf`` file, a `metaalign train` output directory (its card brings template,
prompt format, GGUF and GGUF LoRA), an installed corrector's name, ``smollm2`` (the embedded
SmolLM2-135M-Instruct, prompted zero-shot), an HF directory or hub id, or with ``--base-url``
a served model name. :func:`resolve_model` turns a spec into a :class:`ResolvedModel` (the
backend to create, its validated options and the card's defaults) without loading anything,
so bad input and bad options are reported before a model loads; :meth:`ResolvedModel.load`
then creates the backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from metaalign_cli.correctors import (DEFAULT_NAME, PROMPTED_DEFAULT, check_finished_run, find_corrector, read_card,
                                      shipped_corrector)
from metaalign_cli.errors import ConfigError, MetaAlignError
from metaalign_cli.redact import redact_url

Role = Literal["corrector", "judge"]

#: Backends that talk to a server: the only ones that take ``base_url``.
SERVER_BACKENDS = ("openai", "anthropic")


class ModelSpec(BaseModel):
    """What to run: ``model`` (see the module docstring; None = the role's default),
    ``backend`` (None = guessed), ``base_url`` (a server, for the API backends) and the
    backend's load ``options`` (checked against its ``Options`` model at resolve time)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    backend: str | None = None
    base_url: str | None = None
    options: dict[str, Any] = {}


@dataclass
class ResolvedModel:
    """A spec resolved, nothing loaded yet: ``backend`` name, ``model`` as that backend takes
    it (None = the embedded GGUF), validated ``options``, the corrector ``card`` ({} for a plain
    model), ``kind`` (``prompted`` the embedded demo, ``shipped``, ``installed``, ``run`` a train
    output directory, ``model`` anything else) and ``label`` (what the user is told is used)."""

    backend: str
    model: str | None
    options: dict[str, Any]
    card: dict = field(default_factory=dict)
    kind: str = "model"
    label: str = ""

    @property
    def hub_note(self) -> str | None:
        """A note when the model is a name that is neither a local path nor an installed
        corrector, which transformers then fetches as a hub id (a misspelt name would wait on
        the hub's retries): None otherwise."""
        if self.kind != "model" or self.backend != "transformers" or not self.model or Path(self.model).exists():
            return None
        import difflib

        from metaalign_cli.correctors import installed_names

        close = difflib.get_close_matches(self.model, installed_names(), n=1, cutoff=0.75)
        hint = f"did you mean the installed corrector '{close[0]}'?" if close else "check the name if that is not meant"
        return (f"{self.model}: not a local path or an installed corrector: it is loaded as a hub id "
                f"(needs the hub or its cache; {hint})")

    @property
    def template(self) -> str | None:
        """The template the corrector was trained with (None: not a trained corrector)."""
        return self.card.get("template")

    def prompt_note(self, template: str, prompt_format: str | None) -> str | None:
        """A note when a trained corrector is given prompts other than those it was trained on
        (``template``, the correction template's name, and ``prompt_format`` as ``correct`` will
        render them): it has never seen them, and its corrections are likely worse. None when
        they are its own, or the model is not a trained corrector."""
        trained, fmt = self.template, self.card.get("prompt_format")
        if not trained or (template == trained and (not fmt or not prompt_format or prompt_format == fmt)):
            return None
        own = f"the '{trained}' template" + (f" ({fmt} prompts)" if fmt else "")
        given = f"'{template}'" + (f" ({prompt_format} prompts)" if prompt_format and fmt else "")
        return (f"{self.label} was trained on {own}; {given} renders prompts it has not seen, so expect worse "
                "corrections (leave out --template/--prompt-format to use its own)")

    @property
    def repeat_penalty(self) -> float | None:
        """The repeat penalty the card says the corrector was judged with (its
        ``generation.repeat_penalty``), or None (the card has none: 1.0 applies)."""
        return (self.card.get("generation") or {}).get("repeat_penalty")

    @property
    def prompt_format(self) -> str | None:
        """The card's prompt format; ``chat`` for the prompted demo without a LoRA (its chat
        template); else None (the template's)."""
        if self.card.get("prompt_format"):
            return self.card["prompt_format"]
        return "chat" if self.kind == "prompted" and not self.options.get("lora_path") else None

    def load(self):
        """Create (load) the backend. Raises MetaAlignError when the model cannot be loaded."""
        from metaalign_cli.backends import create_backend

        return create_backend(self.backend, self.model, **self.options)


def _card_for(name: str | None, role: Role) -> tuple[dict, str, str]:
    """(card, kind, label) of a model name: the corrector it names, or ({}, ...) for a plain model."""
    if name == PROMPTED_DEFAULT or (name is None and role == "judge"):
        return {}, "prompted", "the embedded demo model SmolLM2-135M-Instruct, prompted zero-shot"
    if name is None:
        found = find_corrector(DEFAULT_NAME)
        if found:
            card = read_card(found)
            return card, "installed", f"the installed default corrector ({card.get('lora') or card.get('gguf')})"
        shipped = shipped_corrector()
        if shipped:
            return read_card(shipped), "shipped", "the shipped corrector (SmolLM2-135M-Instruct + metaalign LoRA)"
        return {}, "prompted", "the embedded demo model SmolLM2-135M-Instruct, prompted zero-shot"
    p = Path(name)
    if p.is_dir():
        check_finished_run(p)
        card = read_card(p)
        return card, ("run" if card else "model"), str(p)
    found = None if p.exists() else find_corrector(name)
    if found:
        return read_card(found), "installed", f"the installed corrector '{name}'"
    return {}, "model", name


def locate(model: str | None, backend: str | None, base_url: str | None,
           role: Role = "corrector") -> ResolvedModel:
    """Which backend loads what for a model name (no options yet): a corrector's GGUF and GGUF
    LoRA go to llama-cpp (its HF weights to ``--backend transformers``), a ``.gguf`` file to
    llama-cpp, ``base_url`` to openai, a directory or hub id to transformers.

    Raises MetaAlignError for a file that is not a model, and for a card naming missing files.
    """
    from metaalign_cli.backends import backend_class, guess_backend

    if base_url and backend in (None, *SERVER_BACKENDS):
        card, kind, label = {}, "model", model or f"the first model {redact_url(base_url)} lists"  # a served name
    elif model is None and backend not in (None, "llama-cpp"):
        card, kind, label = {}, "model", f"the {backend} backend's default model"  # no embedded GGUF there
    else:
        card, kind, label = _card_for(model, role)
    if kind == "prompted":
        model = None
    use_gguf = bool(card.get("gguf")) and backend in (None, "llama-cpp")
    target = card["gguf"] if use_gguf else (model if kind in ("model", "run") else None)
    if kind in ("installed", "shipped") and not use_gguf:
        raise MetaAlignError(f"{label}: an installed corrector is a GGUF; it runs on the llama-cpp backend only")
    name = backend or guess_backend(target, base_url)
    backend_class(name)  # an unknown backend fails now, with the known names
    if (target and not use_gguf and not base_url and name in ("llama-cpp", "transformers")
            and Path(target).is_file() and not str(target).lower().endswith(".gguf")):
        raise MetaAlignError(f"{target}: not a model: give a .gguf file, a model directory, a hub id or an installed "
                             "corrector's name")
    options: dict[str, Any] = {}
    if use_gguf and card.get("lora"):
        options["lora_path"] = card["lora"]
    return ResolvedModel(name, target, options, card, kind, label)


def resolve_model(spec: ModelSpec, role: Role = "corrector", located: ResolvedModel | None = None) -> ResolvedModel:
    """Resolve ``spec`` for ``role`` (``corrector``: no model means the installed ``default``
    corrector, else the shipped one, else the prompted demo; ``judge``: no model means the
    prompted demo): the backend, the model it loads, the card's defaults and the options
    (``spec.options`` over the card's LoRA), validated by the backend's ``Options`` model.

    Raises ConfigError for an option or ``base_url`` the backend does not take,
    UnknownNameError for an unknown backend, MetaAlignError for a model that is not one.
    ``located``: :func:`locate`'s answer for this spec, when the caller has it already.
    """
    from metaalign_cli.backends import validate_options

    r = located or locate(spec.model, spec.backend, spec.base_url, role)
    options = {**r.options, **spec.options}
    if spec.base_url:
        if r.backend not in SERVER_BACKENDS:
            raise ConfigError(f"--base-url is for the {' and '.join(SERVER_BACKENDS)} backends, not {r.backend}")
        check_base_url(spec.base_url)
        options["base_url"] = spec.base_url
    opts = validate_options(r.backend, options)
    r.options = {k: v for k, v in opts.model_dump().items() if k in options}
    return r


def check_base_url(url: str) -> None:
    """Raises ConfigError (naming ``--base-url``, credentials masked) for a server URL that is
    not ``http(s)://host[:port]/...`` (no scheme, no host, a bad port or bracketed address)."""
    from urllib.parse import urlsplit

    shown = redact_url(url)
    if not url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"--base-url {shown!r} needs http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parses the port: ValueError when it is not a number in range)
    except ValueError as e:
        raise ConfigError(f"--base-url {shown!r} is not a valid URL: {e}") from None
    if not parts.hostname:
        raise ConfigError(f"--base-url {shown!r} names no host")


def spec_from_config(cfg, role: Role = "corrector") -> ModelSpec:
    """The ModelSpec of a command's config (:class:`metaalign_cli.config.CorrectConfig` or
    ``JudgeConfig``): ``model``, ``backend``, ``base_url`` and the options of the backend that
    will run, from the config's backend knobs (fields with ``backends`` metadata).

    A knob set for a backend that does not take it is a ConfigError naming the flag (it used
    to be dropped silently); pipeline knobs (``forward``) go only where they apply.
    """
    return _spec_located(cfg, role)[0]


def resolve_config(cfg, role: Role = "corrector") -> ResolvedModel:
    """:func:`resolve_model` of :func:`spec_from_config` (``correct`` and ``judge``), locating
    the model once. Raises as both do."""
    spec, r = _spec_located(cfg, role)
    return resolve_model(spec, role, located=r)


def _spec_located(cfg, role: Role) -> tuple[ModelSpec, ResolvedModel]:
    from metaalign_cli.config import flag_of

    r = locate(cfg.model, cfg.backend, cfg.base_url, role)
    options: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        mapping = f.metadata.get("backends")
        value = getattr(cfg, f.name)
        if not mapping or value is None:
            continue
        if r.backend in mapping:
            options[mapping[r.backend]] = value
        elif not f.metadata.get("forward"):
            raise ConfigError(f"{flag_of(type(cfg), f.name)} is an option of the {' and '.join(mapping)} backend"
                              f"{'s' if len(mapping) > 1 else ''}, not of {r.backend} (the model runs on {r.backend})")
    return ModelSpec(model=cfg.model, backend=cfg.backend, base_url=cfg.base_url, options=options), r


def resolve_base_model(base: str | None) -> str:
    """A training base model: ``base`` as given (a hub id, HF directory or ``.gguf`` file), or
    the embedded SmolLM2-135M-Instruct GGUF for None or ``smollm2`` (as ``--model smollm2`` in
    `correct`). Raises MetaAlignError for an installed corrector's name (a LoRA cannot be a base)."""
    from metaalign_cli.backends import default_model_path

    if base in (None, PROMPTED_DEFAULT):
        return str(default_model_path())
    if not Path(base).exists() and find_corrector(base):
        raise MetaAlignError(f"'{base}' is an installed corrector (a GGUF LoRA); train from its base model instead")
    return str(base)
