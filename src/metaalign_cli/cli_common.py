"""Pieces the subcommands share: error handling, stderr console, objectives and backends.

Kept free of heavy imports: torch, transformers and llama_cpp load only inside backends.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console

from metaalign_cli.errors import MetaAlignError

console = Console(stderr=True, highlight=False, soft_wrap=True)


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def fail(message: str, code: int = EXIT_USAGE) -> "typer.Exit":
    """Print a one-line error on stderr and return the Exit to raise."""
    if sys.stderr.isatty():
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
    else:
        print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn MetaAlignError (and a closed stdout pipe) into a one-line message and exit 2."""
    try:
        yield
    except MetaAlignError as e:
        raise fail(str(e)) from None
    except BrokenPipeError:
        try:
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        raise typer.Exit(EXIT_OK) from None


def check_output(output: str | Path, flag: str = "-o", suffixes: tuple[str, ...] = ()) -> None:
    """Fail early (before a model loads or a judge is called) when ``output`` cannot be
    written: a directory, an uncreatable or unwritable parent, or (when ``suffixes`` is given)
    another file extension. ``-`` is stdout and must be open."""
    import os

    if str(output) == "-":
        if sys.stdout is None or sys.stdout.closed:
            raise fail("standard output is closed")
        return
    p = Path(output)
    if p.is_dir():
        raise fail(f"{output}: is a directory; {flag} takes a file")
    if suffixes and p.suffix.lower() not in suffixes:
        raise fail(f"{output}: {flag} takes a file ending in {', '.join(suffixes)}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fail(f"{output}: cannot write output: {e.strerror or e}")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise fail(f"{output}: cannot write output: permission denied")


def quiet_libraries(quiet: bool) -> None:
    """With ``--quiet``, also silence the progress bars that transformers, huggingface_hub and
    tqdm print on stderr (loading and de-quantizing weights). Must run before they import."""
    if quiet:
        import os

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def split_names(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def load_objective_set(objectives_dir: list[Path] | None, objective_file: list[Path] | None):
    from metaalign_cli.objectives import load_objectives

    return load_objectives(dirs=objectives_dir or (), files=objective_file or ())


def model_card(model: str | None) -> dict:
    """The ``metaalign.json`` of a trained corrector: a directory given as ``--model``, an
    installed corrector's name (``$METAALIGN_HOME/models/NAME``), or with no ``--model`` the
    installed ``default`` corrector; {} for any other model (see :mod:`metaalign_cli.models`)."""
    from metaalign_cli.models import DEFAULT_NAME, PROMPTED_DEFAULT, find_corrector, read_card

    if model == PROMPTED_DEFAULT:
        return {}
    if not model:
        found = find_corrector(DEFAULT_NAME)
        return read_card(found) if found else {}
    p = Path(model)
    if p.is_dir():
        return read_card(p)
    found = None if p.exists() else find_corrector(model)
    return read_card(found) if found else {}


QUANT_CHOICES = ("auto", "none", "q8_0", "f16", "f32")


def check_quant(quant: str) -> str:
    """A ``--quant`` value in lower case; MetaAlignError when it is not one of QUANT_CHOICES."""
    if quant.lower() not in QUANT_CHOICES:
        raise MetaAlignError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, not '{quant.lower()}'")
    return quant.lower()


def resolve_quant(quant: str | None, model: str | None) -> str | None:
    """``--quant``: ``auto`` (or None) re-quantizes the embedded SmolLM2 (Q4_1) to q8_0, which
    prefills ~1.7x faster on CPU at the same decoding speed, and leaves any other GGUF as it
    is; ``none`` never re-quantizes; ``q8_0``/``f16``/``f32`` always do. Returns the type to
    pass to the llama-cpp backend, or None. Raises MetaAlignError for another value."""
    from metaalign_cli.models import is_embedded

    quant = None if quant is None else check_quant(quant)
    if quant in (None, "auto"):
        return "q8_0" if is_embedded(model) else None
    return None if quant == "none" else quant


def make_backend(backend: str | None, model: str | None, base_url: str | None = None, **options):
    """Create the backend named (or guessed from ``model``/``base_url``) with CLI options."""
    from metaalign_cli.backends import create_backend, guess_backend

    name = backend or guess_backend(model, base_url)
    asked = options.pop("quant", None)
    quant = resolve_quant(asked, model)  # validated for every backend
    if name == "llama-cpp" and quant and asked in (None, "auto"):
        # The default's speed-up must never stop a run: without a writable cache, load as is.
        from metaalign_cli.backends import default_model_path
        from metaalign_cli.backends.llamacpp import requantized

        try:
            requantized(model or default_model_path(), quant, options.get("threads"))
        except (MetaAlignError, FileNotFoundError) as e:
            console.print(f"warning: {e}; loading the model file as it is (--quant none)", markup=False)
            quant = None
    if name == "llama-cpp":
        options["quant"] = quant
    elif quant and asked not in (None, "auto"):
        console.print(f"warning: --quant applies to GGUF models (llama-cpp backend); ignored for {name}",
                      markup=False)
    opts = {k: v for k, v in options.items() if v is not None}
    if base_url:
        opts["base_url"] = base_url
    return create_backend(name, model, **opts)
