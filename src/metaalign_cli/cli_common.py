"""Pieces the subcommands share: the stderr console, one-line errors and exit codes, output
checks, progress bars.

Kept free of heavy imports: torch, transformers and llama_cpp load only inside backends.
"""

from __future__ import annotations

import contextlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console

from metaalign_cli.errors import MetaAlignError

console = Console(stderr=True, highlight=False, soft_wrap=True)


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
EXIT_PIPE = 141  # the reader of stdout went away (`| head -1`): 128 + SIGPIPE, as a Unix filter ends


def fail(message: str, code: int = EXIT_USAGE) -> "typer.Exit":
    """Print a one-line error on stderr and return the Exit to raise."""
    if sys.stderr.isatty():
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
    else:
        print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def say(message: str) -> None:
    """A plain line on stderr (no markup: user text is printed as it is)."""
    console.print(message, markup=False)


def silence_stdout() -> None:
    """Point stdout at /dev/null: the reader went away (``| head -1``), stop quietly."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn MetaAlignError (and a closed stdout pipe) into a one-line message and exit 2."""
    try:
        yield
    except MetaAlignError as e:
        raise fail(str(e)) from None
    except BrokenPipeError:
        silence_stdout()
        raise typer.Exit(EXIT_PIPE) from None


def check_output(output: str | Path, flag: str = "-o", suffixes: tuple[str, ...] = ()) -> None:
    """Fail early (before a model loads or a judge is called) when ``output`` cannot be
    written: a directory, a parent that is a file or that cannot be created (its nearest
    existing ancestor is not a writable directory), an unwritable file, or (when ``suffixes``
    is given) another file extension. Creates nothing: missing directories are made when
    writing starts. ``-`` is stdout and must be open."""
    if str(output) == "-":
        if sys.stdout is None or sys.stdout.closed:
            raise fail("standard output is closed")
        return
    p = Path(output)
    if p.is_dir():
        raise fail(f"{output}: is a directory; {flag} takes a file")
    if suffixes and p.suffix.lower() not in suffixes:
        raise fail(f"{output}: {flag} takes a file ending in {', '.join(suffixes)}")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise fail(f"{output}: cannot write output: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise fail(f"{output}: cannot write output: permission denied")


def check_not_replacing(output: str | Path | None, flag: str = "-o", overwrite: bool = False,
                        resumable: bool = True) -> None:
    """Refuse (exit 2) to replace a non-empty regular file ``output`` of an earlier run unless
    ``overwrite`` (``--overwrite``): a rerun, a ``--dry-run`` or an empty input would otherwise
    cut finished work to nothing. ``resumable``: the message also offers ``--resume`` (callers
    check only when ``--resume`` is not given). ``-``, None, absent and empty files and
    non-regular files (``/dev/null``) pass."""
    if output is None or str(output) == "-" or overwrite:
        return
    p = Path(output)
    if not p.is_file() or p.stat().st_size == 0:
        return
    hint = "--resume to continue it, " if resumable else ""
    raise fail(f"{output}: holds an earlier run's output ({flag}); use {hint}--overwrite to replace it, "
               "or another file")


def note_stdin(path: str, what: str = "records") -> None:
    """Say so when a command waits for ``what`` on a terminal's standard input (``path`` is
    ``-``): a user who forgot the file name would otherwise see nothing happen."""
    if path == "-" and sys.stdin is not None and not sys.stdin.closed and sys.stdin.isatty():
        say(f"reading {what} from standard input (end with Ctrl-D; or give a file name)")


def quiet_libraries(quiet: bool) -> None:
    """Keep library progress bars off stderr: always when it is not a terminal (a log file
    would get every redraw), and with ``--quiet``. transformers, huggingface_hub and tqdm read
    these variables when they are imported, so this runs before they are."""
    if quiet or not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    if quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def progress_bar(quiet: bool, *columns):
    """A rich Progress on stderr with ``columns`` after the description and bar, or
    ``contextlib.nullcontext()`` (``with ... as prog``: None) when quiet or when stderr is not a
    terminal."""
    if quiet or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), *columns, TimeElapsedColumn(), console=console)
