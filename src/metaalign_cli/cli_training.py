"""CLI for ``metaalign train`` and ``metaalign export``: flags -> :mod:`metaalign_cli.training`
and :mod:`metaalign_cli.export`. torch/transformers/trl load inside the commands only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from metaalign_cli.cli_common import cli_errors, console, quiet_libraries


TRAIN_DOC = """Train a MetaAligner corrector: warm-up, equal-preference, then preference stages
(paper section 3.3, Eq. 6), loss on the target tokens only.

The output directory holds the model, metaalign.json (template and prompt format, read by
`metaalign correct --model DIR`), train_config.yaml, metrics.jsonl and checkpoints."""


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``export`` to app."""
    from metaalign_cli import cli_spec
    from metaalign_cli.training import TrainConfig

    cli_spec.register(app, "train", TrainConfig, train_main, TRAIN_DOC,
                      "Train a corrector: warm-up, equal-preference, preference (section 3.3)", extras=(
        cli_spec.flag("resume", "--resume", help="Continue the run in --output from its last checkpoint, with "
                                                 "the settings it recorded in train_config.yaml: a setting not "
                                                 "given (flag or --config key) is the run's, one given must equal "
                                                 "it (else exit 2), except --device, --save-steps, "
                                                 "--save-total-limit, --logging-steps, --report-to and "
                                                 "--gradient-checkpointing. A complete run is left as it is."),
        cli_spec.flag("quiet", "--quiet", "-q", help="No progress bar or summary.")))
    app.command("export", cls=cli_spec.SectionedCommand,
                short_help="Convert a trained corrector to GGUF (and install it)")(export_cmd)


def train_main(cfg, given: dict) -> None:
    """``metaalign train``: flags -> :func:`metaalign_cli.training.train_corrector` -> summary."""
    quiet = bool(given.get("quiet"))
    with cli_errors():
        quiet_libraries(quiet)
        _quiet_libraries()
        from metaalign_cli.training import train_corrector

        def say(msg: str) -> None:
            if not quiet:
                console.print(msg, markup=False)

        with _TrainProgress(quiet) as prog:
            result = train_corrector(cfg, resume=bool(given.get("resume")), on_event=prog.event, log=say,
                                     given=_settings_given(given))
    if not result.main_process:
        return  # another rank of a multi-process run: rank 0 reports
    if not quiet and not result.complete:  # (a complete run was reported by train_corrector)
        for r in result.reports:
            if r.skipped:
                console.print(f"{r.stage}: skipped ({r.skipped})", markup=False)
            else:
                loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "n/a"
                console.print(f"{r.stage}: {r.kept} of {r.rows} rows ({r.dropped_too_long} dropped, {r.truncated} "
                              f"truncated), {_steps(r.steps)}, final loss {loss}, {r.seconds:.1f}s", markup=False)
        console.print(f"trained corrector written to {result.output_dir} in {result.seconds:.1f}s "
                      f"(template {result.card['template']}, {result.card['prompt_format']} prompts)", markup=False)
        for q, p in result.gguf.items():
            console.print(f"gguf {q}: {p}", markup=False)
    print(str(result.output_dir))


def _settings_given(given: dict) -> set[str]:
    """The TrainConfig fields the user set: the flags given, and the keys of the ``--config``
    file (read again here: the generated command passes the flags only). What a ``--resume``
    compares with the run's record; the rest is taken from it."""
    import click

    names = set(given)
    ctx = click.get_current_context(silent=True)
    path = ctx.params.get("config") if ctx is not None else None
    if path:
        from metaalign_cli.yamlfiles import load_yaml_mapping

        names |= set(load_yaml_mapping(path, "config file", empty_ok=True))
    return names


def _steps(n: int) -> str:
    """``"1 step"``, ``"308 steps"``."""
    return f"{n} step{'' if n == 1 else 's'}"


def _rate(x: float) -> str:
    """A tokens/s figure for the progress line: whole numbers from 10 up, else 2 significant
    digits (a tiny model on a busy CPU runs at 0.11 target tok/s, which ``:.0f`` showed as 0)."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def export_cmd(
    model_dir: Path = typer.Argument(..., metavar="RUN", show_default=False,
                                     help="A `metaalign train` output directory (or any Llama-family HF directory)."),
    types: Optional[str] = typer.Option(None, "--type", metavar="TYPES", show_default=False,
                                        help="GGUF types, comma-separated: f16, f32, q8_0, q4_k_m and the other "
                                             "llama.cpp types. [default: f16; with --install, none when RUN has "
                                             "been exported]"),
    lora: bool = typer.Option(True, "--lora/--no-lora", show_default=False,
                              help="Also convert RUN/adapter (LoRA runs) to a GGUF LoRA adapter. [default: on]"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="DIR", show_default=False,
                                          help="Directory for the .gguf files. [default: RUN/gguf]"),
    install: Optional[str] = typer.Option(None, "--install", metavar="NAME",
                                          help="Install the corrector as NAME in $METAALIGN_HOME/models "
                                               "('default' makes it `correct`'s default model), from RUN's "
                                               "export as it is: RUN is not changed."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="With --install: replace a corrector installed as NAME from another run."),
):
    """Convert a trained corrector to GGUF for `correct --backend llama-cpp` (the gguf package
    writes f16 and f32; llama-cpp-python's quantize API makes q8_0, q4_k_m and the others).
    Updates RUN's metaalign.json so `correct --model RUN` then uses the GGUF (paths relative
    to the card, so the run can be moved or copied).

    With --install NAME, the GGUF LoRA adapter (or the GGUF) and its card are copied to
    $METAALIGN_HOME/models/NAME, so `correct --model NAME` (and, for NAME 'default', plain
    `correct`) uses it. A run exported before is installed as it is (RUN and its
    metaalign.json stay unchanged); one never exported is exported first (--type, default
    f16)."""
    with cli_errors():
        from metaalign_cli.export import export_gguf
        from metaalign_cli.correctors import check_install, install_corrector, read_card

        if install is not None:
            check_install(model_dir, install, overwrite)  # before the (slow) export
        # Installing takes the run's export as it is: a new f16 GGUF written into RUN, and RUN's
        # card repointed to it, would switch `correct --model RUN` from the q8_0 it had (issue 14).
        exported = install is not None and types is None and output is None and bool(read_card(model_dir).get("gguf"))
        out: dict[str, str] = {}
        if not exported:
            out = export_gguf(model_dir, [t.strip() for t in (types or "f16").split(",") if t.strip()],
                              out_dir=output, lora=lora, log=lambda m: console.print(m, markup=False))
        if install:
            out["installed"] = str(install_corrector(model_dir, install, overwrite))
    for q, p in out.items():
        print(f"{q}\t{p}")


def _quiet_libraries() -> None:
    """transformers/datasets chatter (progress bars, advisory warnings) off stderr."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "datasets", "trl", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


class _TrainProgress:
    """Rich bar per stage on stderr (stage, step/total, loss, target tokens/s, ETA); plain
    one-line logs when stderr is not a terminal."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.prog = None
        self.task = None
        self.stage = None

    def __enter__(self):
        if not self.quiet and self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.prog = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"),
                                 TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(), console=console)
            self.prog.__enter__()
        return self

    def __exit__(self, *exc):
        if self.prog is not None:
            self.prog.__exit__(*exc)
        return False

    def event(self, ev: dict) -> None:
        if self.quiet:
            return
        kind = ev["event"]
        if self.prog is not None:
            if kind == "begin":
                self.task = self.prog.add_task(ev["stage"], total=ev["max_steps"], completed=ev["step"],
                                               loss="-", tps="-")
            elif kind == "step" and self.task is not None:
                self.prog.update(self.task, completed=ev["step"])
            elif kind == "log" and self.task is not None:
                self.prog.update(self.task, loss=f"{ev['loss']:.4f}", tps=_rate(ev['target_tokens_per_s']))
            return
        if kind == "begin":
            console.print(f"{ev['stage']}: training {_steps(ev['max_steps'])}", markup=False)
        elif kind == "log":
            console.print(f"{ev['stage']} step {ev['step']}/{ev['max_steps']} loss {ev['loss']:.4f} "
                          f"lr {ev['lr']:.2e} {_rate(ev['target_tokens_per_s'])} target tok/s", markup=False)
