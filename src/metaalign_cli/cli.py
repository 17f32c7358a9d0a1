"""The ``metaalign`` command: a thin Typer layer over the library.

Data goes to stdout, progress and logs to stderr. Exit codes: 0 ok, 1 some records failed,
2 usage or input error. Each command's options are generated from its config class
(:mod:`metaalign_cli.config`, :mod:`metaalign_cli.cli_spec`); the command reads them, calls
the library's entry point and prints. Subcommands other than ``correct`` and ``objectives``
live in small ``cli_*`` modules.
"""

from __future__ import annotations

import sys

import typer

from metaalign_cli import __version__
from metaalign_cli.cli_common import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PIPE, EXIT_USAGE, check_not_replacing,
                                      check_output, cli_errors, console, fail, note_stdin, progress_bar,
                                      quiet_libraries, say, silence_stdout)
from metaalign_cli.config import CorrectConfig, ObjectivesConfig

app = typer.Typer(
    name="metaalign",
    help="MetaAligner from the command line: correct any model's responses toward objectives you "
         "name, and build data for, train and judge such correctors (Yang et al., NeurIPS 2024).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        print(f"metaalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """MetaAligner from the command line."""


def objectives_main(cfg: ObjectivesConfig, given: dict) -> None:
    """``metaalign objectives``: every objective with its aliases, text and source file."""
    import json

    from metaalign_cli.objectives import load_objectives

    with cli_errors():
        objset = load_objectives(dirs=cfg.objectives_dir, files=cfg.objective_file)
        try:
            objs = objset.resolve(cfg.objectives) if cfg.objectives else list(objset)
        except ValueError as e:
            raise fail(str(e))
        tname = None
        if cfg.template:
            from metaalign_cli.templates import load_template

            tname = load_template(cfg.template, kind="correction").name
        for note in objset.notes(objs, tname):
            say(f"warning: {note}")
        if cfg.json or not sys.stdout.isatty():
            for o in objs:
                print(json.dumps({"name": o.name, "aliases": list(o.aliases), "text": o.render(tname),
                                  "source": o.source}, ensure_ascii=False))
            return
        from rich.table import Table

        table = Table("name", "aliases", "text" + (f" ({tname})" if tname else ""), "source")
        for o in objs:
            table.add_row(o.name, ", ".join(o.aliases), o.render(tname), o.source)
        from rich.console import Console

        Console().print(table)


def correct_main(cfg: CorrectConfig, given: dict) -> None:
    """``metaalign correct``: flags -> :func:`metaalign_cli.correction.run_correct` -> summary."""
    from rich.markup import escape
    from rich.progress import TextColumn

    from metaalign_cli.correction import RecordFailed, run_correct

    check_output(cfg.output)
    if not cfg.resume:
        check_not_replacing(cfg.output, overwrite=cfg.overwrite)
    quiet_libraries(cfg.quiet)
    note_stdin(cfg.input)

    def warn(msg: str) -> None:
        say(f"warning: {msg}")

    def on_model(label: str) -> None:
        if not cfg.quiet:
            console.print(f"[dim]{'prompts for' if cfg.dry_run else 'using'} {escape(label)}[/]")

    progress = progress_bar(cfg.quiet, TextColumn("{task.completed} records"),
                            TextColumn("{task.fields[rps]:.2f} records/s"), TextColumn("{task.fields[tokens]:.1f} tokens/s"))
    try:
        with cli_errors(), progress as prog:
            task = prog.add_task("correcting", total=None, tokens=0.0, rps=0.0) if prog else None

            def on_progress(n: int, toks: int) -> None:
                if prog:
                    el = max(prog.tasks[0].elapsed or 1e-9, 1e-9)
                    prog.update(task, completed=n, tokens=toks / el, rps=n / el)

            try:
                report = run_correct(cfg, on_progress=on_progress, warn=warn, on_model=on_model)
            except RecordFailed as e:  # (a MetaAlignError: caught here, before cli_errors makes it exit 2)
                raise fail(str(e.cause), EXIT_USAGE if e.is_input else EXIT_FAILED) from None
    except BrokenPipeError:
        silence_stdout()  # the reader went away (`| head -1`): stop quietly, as Unix filters do,
        raise typer.Exit(EXIT_PIPE)  # but not with 0: records were left uncorrected
    except KeyboardInterrupt:  # Ctrl-C: every record written so far is whole (JsonlWriter)
        more = f"; the same command with --resume continues {cfg.output}" if cfg.output != "-" else ""
        say(f"interrupted{more}")
        raise typer.Exit(EXIT_INTERRUPTED)
    except OSError as e:
        raise fail(f"{cfg.output if cfg.output != '-' else '<stdout>'}: cannot write output: {e.strerror or e}")
    if cfg.dry_run and not cfg.quiet:
        say(f"wrote {report.prompts} prompt(s), {report.failed} record(s) failed (--dry-run: no model loaded)")
    elif not cfg.quiet:
        s = report.to_dict()
        earlier = f", {report.retried} redone (kept as failed by the earlier run)" if report.retried else ""
        empty = f", {report.empty} empty" if report.empty else ""
        labels = f", {report.markers_cut} cut at the prompt's field labels" if report.markers_cut else ""
        trimmed = f" ({report.trimmed} cut back to before the repetition)" if report.trimmed else ""
        rates = (f"; {report.corrected / report.seconds:.2f} records/s, {s['tokens_per_s'] or 0:.1f} generated tokens/s"
                 if report.corrected and report.seconds else "")  # (no rate of failures alone)
        say(f"corrected {report.corrected} record(s) ({report.unchanged} unchanged), {report.failed} failed, "
            f"{report.resumed} already done{earlier}, "
            f"{report.truncated} with the query cut to fit the context, {report.looped} stopped in a repetition "
            f"loop{trimmed}, {report.capped} at the token cap{empty}{labels}{rates}")
    raise typer.Exit(report.exit_code)


def _register_subcommands() -> None:
    from metaalign_cli import cli_dataset, cli_judging, cli_spec, cli_training

    cli_spec.register(app, "objectives", ObjectivesConfig, objectives_main,
                      "List every objective with its aliases, text and source file.",
                      "List the objectives, their aliases and texts")
    cli_spec.register(app, "correct", CorrectConfig, correct_main,
                      "Correct responses toward the objectives you name (MetaAligner inference, paper section "
                      "3.4).\n\nEach output line is the input record unchanged plus the corrected text and a "
                      "'metaalign' provenance object, in input order, written as soon as it is done.",
                      "Correct responses toward the objectives you name (JSONL in, JSONL out)")
    for mod in (cli_dataset, cli_training, cli_judging):
        mod.register(app)


_register_subcommands()


def main() -> None:
    """Entry point of the ``metaalign`` executable. A usage error that click finds itself (an
    unknown option, a value out of range) is one line on stderr and exit 2, like ours."""
    from typer._click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as e:  # `metaalign` alone: the help, on stdout
        try:
            print(e.format_message())
        except BrokenPipeError:
            silence_stdout()
        code = EXIT_USAGE
    except UsageError as e:
        if e.format_message():  # (none when no arguments were given: typer has printed the help)
            cmd = e.ctx.command_path if e.ctx is not None else "metaalign"
            fail(f"{e.format_message()} (see '{cmd} --help')")
        code = EXIT_USAGE
    except typer.Abort:  # as click's standalone mode does
        print("Aborted!", file=sys.stderr)
        code = EXIT_FAILED
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
