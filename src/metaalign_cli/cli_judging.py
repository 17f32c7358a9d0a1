"""CLI for ``metaalign judge``: flags -> :func:`metaalign_cli.judging.judge.run_judge` (an
LLM judge) or the blind task export / verdict import of :mod:`metaalign_cli.judging.blind`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from metaalign_cli.cli_common import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PIPE, check_not_replacing, check_output,
                                      cli_errors, console, fail, note_stdin, progress_bar, quiet_libraries, say,
                                      silence_stdout)
from metaalign_cli.config import JudgeConfig

DOC = """Judge candidates against golden responses (win rate, Algorithm 2) or score them 0-10
(Appendix E) with an LLM judge, every judgment auditable and cached; or export blind tasks
for people (or any outside judge) and import their verdicts.

Each output row holds the record id, objective, candidate, position order, the exact
prompt, the raw answer, the parsed verdict, latency and tokens. Exit 1 when the invalid
rate exceeds --max-invalid or records that failed in `correct` were left out, 2 on bad
input."""


def register(app: typer.Typer) -> None:
    """Add the ``judge`` subcommand to app."""
    from metaalign_cli import cli_spec

    cli_spec.register(app, "judge", JudgeConfig, judge_main, DOC,
                      "Judge: win rates vs golden responses (Algorithm 2), scores, blind tasks")


def _check_outputs(cfg: JudgeConfig) -> None:
    """Every output is checked before the first (perhaps paid) judge call."""
    if cfg.dry_run:
        return
    if cfg.blind_tasks:
        check_output(cfg.blind_tasks, "--blind-tasks")
        check_output(cfg.blind_key, "--blind-key")
        check_not_replacing(cfg.blind_tasks, "--blind-tasks", cfg.overwrite, resumable=False)
        check_not_replacing(cfg.blind_key, "--blind-key", cfg.overwrite, resumable=False)
        return
    check_output(cfg.output)
    resumable = not cfg.blind_verdicts  # a blind import is redone whole (--resume is refused there)
    if not cfg.resume:
        check_not_replacing(cfg.output, overwrite=cfg.overwrite, resumable=resumable)
    if cfg.summary:
        check_output(cfg.summary, "--summary")
    if cfg.plot:
        check_output(cfg.plot, "--plot", (".png", ".pdf", ".svg", ".jpg", ".jpeg"))
    if not cfg.resume:  # (a resumed run's summary and plot are of the whole file: they are redone)
        for path, flag in ((cfg.summary, "--summary"), (cfg.plot, "--plot")):
            check_not_replacing(path, flag, cfg.overwrite, resumable=resumable)


def judge_main(cfg: JudgeConfig, given: dict) -> None:
    """``metaalign judge``: plan (input checked before any judge loads), then judge, export
    blind tasks or import blind verdicts; write the summary and plot; print the table."""
    from metaalign_cli.judging.judge import plan_judge

    _check_outputs(cfg)
    quiet_libraries(cfg.quiet)
    note_stdin(cfg.input, "records to judge")
    with cli_errors():
        if cfg.blind_verdicts and "seed" not in given:
            from metaalign_cli.judging.blind import key_seed

            cfg.seed = key_seed(cfg.blind_key, cfg.seed)  # the positions the export drew
        plan = plan_judge(cfg)
        if not cfg.quiet:
            for w in plan.warnings:
                say(f"warning: {w}")
        if cfg.blind_tasks:
            _export_blind(cfg, plan)
            _exit_for_failed_records(plan)
            raise typer.Exit(EXIT_OK)
        run = _import_blind(cfg, plan) if cfg.blind_verdicts else _judge(cfg, plan)
        if not cfg.quiet:
            for w in run.warnings:
                say(f"warning: {w}")
        if run.dry_run is not None:
            _print_dry_run(run.dry_run)
            raise typer.Exit(EXIT_OK)
    _write_outputs(cfg, run, plan)
    if not cfg.quiet:
        _print_summary(run.summary)
    summ = run.summary
    if run.exit_code(cfg.max_invalid):
        say(f"error: {summ['invalid']} of {summ['units']} judgment(s) invalid "
            f"({summ['invalid_rate']:.1%} > --max-invalid {cfg.max_invalid:.1%})")
        raise typer.Exit(EXIT_FAILED)
    _exit_for_failed_records(plan)
    raise typer.Exit(EXIT_OK)


def _exit_for_failed_records(plan) -> None:
    """Exit 1 when records that failed in `correct` were left out (warned when planned), as
    `correct` exits on the same file; the rest is judged (or exported) and written first."""
    if plan.failed_records:
        say(f"error: {plan.failed_records} record(s) that failed in `correct` were not judged")
        raise typer.Exit(EXIT_FAILED)


def _judge(cfg: JudgeConfig, plan):
    """An LLM judge run with a progress bar."""
    from rich.markup import escape
    from rich.progress import MofNCompleteColumn, TextColumn

    from metaalign_cli.judging.judge import run_judge

    def on_model(label: str) -> None:
        if not cfg.quiet:  # (a dry run too: it says which judge the real run would ask)
            # the paper's prompts are beyond it (invalid answers); a short template of your own is
            # answered, but by a 135M model
            tiny = "its verdicts mean little" if cfg.template else "expect many invalid answers"
            note = f" (tiny: {tiny}; pass --model/--base-url for a real judge)" if "prompted" in label else ""
            console.print(f"[dim]judging with {escape(label)}{note}[/]")

    bar = progress_bar(cfg.quiet or cfg.dry_run, MofNCompleteColumn(),
                       TextColumn("{task.fields[calls]} calls, {task.fields[hits]} cached, {task.fields[invalid]} invalid"))
    with bar as prog:
        task = prog.add_task("judging", total=len(plan.units), calls=0, hits=0, invalid=0) if prog else None

        def on_progress(n, rep) -> None:
            if prog:
                prog.update(task, completed=n + rep.resumed, calls=rep.calls, hits=rep.cache_hits, invalid=rep.invalid)

        try:
            return run_judge(cfg, plan, on_progress=on_progress, on_model=on_model,
                             warn=lambda m: say(f"warning: {m}"))
        except KeyboardInterrupt:  # Ctrl-C: every judgment written so far is a whole line
            more = f"; the same command with --resume continues {cfg.output}" if cfg.output != "-" else ""
            say(f"interrupted{more}")
            raise typer.Exit(EXIT_INTERRUPTED)
        except BrokenPipeError:  # `| head`: quiet, as `correct` (and Unix filters) stop
            silence_stdout()
            raise typer.Exit(EXIT_PIPE)
        except OSError as e:
            where = cfg.output if cfg.output != "-" else "<stdout>"
            raise fail(f"{where}: cannot write output: {e.strerror or e} (the judgments before it are kept)")


def _export_blind(cfg: JudgeConfig, plan) -> None:
    from metaalign_cli.judging.blind import export_tasks
    from metaalign_cli.records import JsonlWriter

    tasks, key = export_tasks(plan.units, cfg.seed)
    try:
        with JsonlWriter(cfg.blind_tasks) as w:
            for t in tasks:
                w.write(t)
        Path(cfg.blind_key).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.blind_key).write_text(json.dumps(key, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise fail(f"cannot write the blind tasks: {e.strerror or e}")
    if cfg.input == "-" and not cfg.quiet:
        say("warning: the import needs this same input again (and these flags): standard input is gone after "
            "this run, so save it to a file (e.g. `... | tee corrected.jsonl | metaalign judge - ...`)")
    if not cfg.quiet:
        twice = len(key["tasks"]) - len(tasks)
        same = f"; {twice} pair(s) the plan shows twice are one task each" if twice else ""
        say(f"wrote {len(tasks)} blind task(s) of export {key['export']} to {cfg.blind_tasks} and their key to "
            f"{cfg.blind_key} (keep the key from the judges{same})")


def _import_blind(cfg: JudgeConfig, plan):
    from metaalign_cli.judging.judge import run_blind_import

    try:
        return run_blind_import(cfg, plan)
    except OSError as e:
        raise fail(f"{cfg.output}: cannot write output: {e.strerror or e}")


def _write_outputs(cfg: JudgeConfig, run, plan) -> None:
    saved = "the judgments are in " + ("the output" if cfg.output == "-" else cfg.output)
    if cfg.summary:
        try:
            Path(cfg.summary).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.summary).write_text(json.dumps(run.summary, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        except OSError as e:
            raise fail(f"{cfg.summary}: cannot write the summary: {e.strerror or e} ({saved})")
    if cfg.plot:
        from metaalign_cli.judging import plot_scores

        try:
            with cli_errors():
                plot_scores(run.rows, cfg.plot, plan.objectives, plan.candidates)
        except (OSError, ValueError) as e:
            raise fail(f"{cfg.plot}: cannot write the plot: {getattr(e, 'strerror', None) or e} ({saved})")


def _print_dry_run(plan: dict) -> None:
    print(json.dumps(plan))
    say(f"dry run: {plan['units']} judgment(s), {plan['calls']} judge call(s) to make, {plan['cached']} already "
        f"cached, {plan['to_call']} to call (at most {plan['max_calls']} with re-asks), ~{plan['input_tokens']} "
        f"input tokens ({plan['token_count']}); nothing was called")


def _pct(x, ci=None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" + (f"\n[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _print_summary(summ: dict) -> None:
    from rich.table import Table

    if summ["mode"] == "score":
        table = Table("objective", "candidate", "n", "inv.", "mean\n(95% CI)", "median", "sd", "vs\nbaseline",
                      title="scores 0-10 (Appendix E)", box=None, pad_edge=False)
        for r in summ["results"]:
            ci = r["mean_ci"]
            mean = "-" if r["mean"] is None else f"{r['mean']:.2f}" + (f"\n[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            md = r.get("mean_difference")
            table.add_row(r["objective"], r["candidate"], str(r["n"]), str(r["invalid"]), mean,
                          "-" if r["median"] is None else str(r["median"]), "-" if r["sd"] is None else f"{r['sd']:.2f}",
                          "" if md is None else f"{md:+.2f}")
    else:
        table = Table(title="win rate vs golden (Algorithm 2)", box=None, pad_edge=False)
        for name in ("objective", "candidate"):
            table.add_column(name, no_wrap=True, min_width=9)
        for name in ("W/T/L", "inv.", "win %\n95% CI", "(W+T/2)/n %\n95% CI", "advantage %\n95% CI"):
            table.add_column(name, no_wrap=True)
        for r in summ["results"]:
            adv = r.get("advantage")
            adv_s = "" if adv is None else f"{100 * adv:+.1f}" + (
                f"\n[{100 * r['advantage_ci'][0]:+.1f}, {100 * r['advantage_ci'][1]:+.1f}]" if r.get("advantage_ci") else "")
            table.add_row(r["objective"], r["candidate"], f"{r['wins']}/{r['ties']}/{r['losses']}", str(r["invalid"]),
                          _pct(r["win_rate"], r["win_rate_ci"]), _pct(r["win_rate_ties_half"], r["win_rate_ties_half_ci"]),
                          adv_s)
    console.print(table)
    run = summ.get("run")
    extra = f"; position consistency {summ['position_consistency']:.1%}" if "position_consistency" in summ else ""
    reasons = ", ".join(f"{k}: {v}" for k, v in summ.get("invalid_reasons", {}).items())
    calls = (f"; {run['calls']} judge call(s), {run['cache_hits']} cache hit(s), {run['resumed']} resumed, "
             f"{run['call_failures']} failed call(s); {run['seconds']:.1f}s") if run else ""
    say(f"{summ['units']} judgment(s), {summ['invalid']} invalid" + (f" ({reasons})" if reasons else "")
        + extra + calls)
