"""CLI for ``metaalign judge``: a thin layer over :mod:`metaalign_cli.judging`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the ``judge`` subcommand to app."""
    app.command("judge")(judge_cmd)


def judge_cmd(
    input: str = typer.Argument("-", help="JSONL (e.g. what `correct` writes) or CSV; '-' reads stdin."),
    output: str = typer.Option("-", "--output", "-o", help="JSONL, one row per judgment; '-' writes stdout."),
    mode: str = typer.Option("pairwise", "--mode", help="pairwise (win rate vs the golden, Algorithm 2) or score (0-10, Appendix E)."),
    objectives: Optional[str] = typer.Option(None, "--objectives", "-O",
                                             help="Objectives to judge on, comma-separated. Default: each record's own (objectives / metaalign.objectives)."),
    template: Optional[str] = typer.Option(None, "--template", "-t",
                                           help="Judge template name or YAML path. [default: judge-pairwise / judge-score]"),
    golden_field: Optional[str] = typer.Option(None, "--golden-field", help="Field of the golden response. [default: golden, else goldens]"),
    candidate_field: Optional[list[str]] = typer.Option(None, "--candidate-field",
                                                        help="Candidate field (repeatable; the first is the baseline for the advantage). Default: the original response and 'corrected'."),
    query_field: Optional[str] = typer.Option(None, "--query-field", help="Field holding the query."),
    id_field: str = typer.Option("id", "--id-field", help="Record id field (alignment key); without ids, line numbers are used."),
    input_format: Optional[str] = typer.Option(None, "--input-format", help="jsonl or csv. Default: csv for *.csv, else jsonl."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Judge: served model name, GGUF file or HF directory. Default: embedded SmolLM2 demo model."),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="openai, anthropic, llama-cpp or transformers. Default: guessed from --model/--base-url."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server (vLLM, llama.cpp, Ollama); key from $OPENAI_API_KEY."),
    prompt_format: Optional[str] = typer.Option(None, "--prompt-format", help="chat or raw. Default: the template's (chat)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for chat prompts."),
    seed: int = typer.Option(0, "--seed", help="Seeds the candidate-position draw (and sampling)."),
    both_orders: bool = typer.Option(False, "--both-orders", help="Ask both positions; disagreement counts as a tie."),
    retries: int = typer.Option(2, "--retries", min=0, help="Re-asks after an unparsable answer."),
    max_invalid: float = typer.Option(0.1, "--max-invalid", min=0.0, max=1.0, help="Exit 1 when the invalid rate is above this."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Judge calls in flight (openai/anthropic)."),
    rpm: Optional[float] = typer.Option(None, "--rpm", min=0.0, help="At most this many judge calls per minute."),
    timeout: float = typer.Option(120.0, "--timeout", min=0.1, help="Seconds per API request (openai/anthropic)."),
    api_retries: int = typer.Option(4, "--api-retries", min=0, help="Client retries on 429/5xx/timeouts, exponential backoff honouring Retry-After."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="Cap on the judge's answer tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (default)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable), e.g. $'\\n' for raw prompts."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Judge cache (SQLite). [default: $METAALIGN_HOME/cache/judge.sqlite or ~/.cache/metaalign/judge.sqlite]"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the cache."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print calls, cached calls and estimated input tokens as JSON; call nothing."),
    resume: bool = typer.Option(False, "--resume", help="With -o FILE: keep FILE's rows and judge only what is missing."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Write the summary (win rates, intervals, counts) as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Score mode: PNG with one histogram panel per objective (needs matplotlib)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary table."),
    n_ctx: int = typer.Option(4096, "--n-ctx", min=64, help="Context tokens (llama-cpp)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (llama-cpp)."),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", help="Layers on the GPU (llama-cpp); -1 = all."),
    quant: str = typer.Option("auto", "--quant", help="Re-quantize the GGUF once (cached) before loading (llama-cpp): q8_0, f16, f32 or none. auto = q8_0 for the embedded SmolLM2 (prefills ~1.7x faster than its Q4_1 on CPU), the file as it is otherwise."),
    device: str = typer.Option("auto", "--device", help="auto, cuda, mps or cpu (transformers)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bf16, fp16, fp32 (transformers)."),
    objectives_dir: Optional[list[Path]] = typer.Option(None, "--objectives-dir", help="Extra directory of objective YAML files (repeatable)."),
    objective_file: Optional[list[Path]] = typer.Option(None, "--objective-file", help="Extra objective YAML file (repeatable)."),
):
    """Judge candidates against golden responses (win rate, Algorithm 2) or score them 0-10
    (Appendix E) with an LLM judge, every judgment auditable and cached.

    Each output row holds the record id, objective, candidate, position order, the exact
    prompt, the raw answer, the parsed verdict, latency and tokens. Exit 1 when the invalid
    rate exceeds --max-invalid, 2 on bad input.
    """
    from metaalign_cli import judging
    from metaalign_cli.backends.base import WEIGHT_OPTIONS, GenerationSettings
    from metaalign_cli.cli_common import (EXIT_FAILED, EXIT_OK, cli_errors, console, fail, load_objective_set,
                                          make_backend, quiet_libraries, split_names, check_output)
    from metaalign_cli.records import JsonlWriter, read_records
    from metaalign_cli.templates import load_template

    if mode not in ("pairwise", "score"):
        raise fail(f"--mode must be pairwise or score, not '{mode}'")
    if prompt_format not in (None, "raw", "chat"):
        raise fail(f"--prompt-format must be raw or chat, not '{prompt_format}'")
    if resume and output == "-":
        raise fail("--resume needs -o FILE")
    if plot and mode != "score":
        raise fail("--plot draws score histograms: use it with --mode score")
    if not dry_run:  # every output is checked before the first (perhaps paid) judge call
        check_output(output)
        if summary:
            check_output(summary, "--summary")
        if plot:
            check_output(plot, "--plot", (".png", ".pdf", ".svg", ".jpg", ".jpeg"))
    quiet_libraries(quiet)
    with cli_errors():
        objset = load_objective_set(objectives_dir, objective_file)
        objs = objset.resolve(objectives) if split_names(objectives) else None
        kind = "judge-pairwise" if mode == "pairwise" else "judge-score"
        tpl = load_template(template or kind, kind=kind)
        items = judging.load_judge_items(read_records(input, input_format), objset, objs, mode, golden_field,
                                         candidate_field or None, query_field, id_field)
        empty = [it for it in items if it.golden is not None and not it.golden.strip()]
        if empty and not quiet:
            console.print(f"warning: {len(empty)} record(s) have an empty golden response (first: {empty[0].source}:"
                          f"{empty[0].line}); they are judged against empty text", markup=False)
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                      stop=tuple(stop or ()))
        opts = judging.JudgeOptions(template=tpl, mode=mode, settings=settings, seed=seed, both_orders=both_orders,
                                    retries=retries, concurrency=concurrency, rpm=rpm or None,
                                    prompt_format=prompt_format, system=system)
        units = judging.plan_units(items, opts)
        done_rows = judging.load_done_rows(output) if resume else []
        planned = {u.key for u in units}
        stray = [r for r in done_rows if judging.unit_key(r["record_id"], r["objective"], r["candidate"]) not in planned]
        if stray:
            r = stray[0]
            raise fail(f"{output}: resumed rows do not match this run (record {r['record_id']!r}, objective "
                       f"'{r['objective']}', candidate '{r['candidate']}' is not planned); use the same input and flags")
        if any(r.get("mode", mode) != mode for r in done_rows):
            raise fail(f"{output}: holds rows of another --mode; cannot resume")
        done_rows_by_key = {judging.unit_key(r["record_id"], r["objective"], r["candidate"]): r for r in done_rows}
        if not quiet and model is None and base_url is None and backend in (None, "llama-cpp"):
            console.print("[dim]judging with the embedded demo model SmolLM2-135M-Instruct (tiny: expect many invalid "
                          "answers; pass --model/--base-url for a real judge)[/]")
        be = make_backend(backend, model, base_url, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, quant=quant,
                          device=device, dtype=dtype, concurrency=1, retries=api_retries, timeout=timeout, seed=seed)
        if done_rows:
            mine = judging.judge_info(be, opts)
            same = ("backend", "model", *WEIGHT_OPTIONS, "template", "prompt_format", "settings", "seed", "both_orders")
            theirs = done_rows[0].get("judge") or {}
            diff = [k for k in same if theirs.get(k) != mine.get(k)]
            if diff:
                be.close()
                raise fail(f"{output}: its rows were judged with another {', '.join(diff)}; cannot resume "
                           f"(use the same judge flags, or a new -o file)")
        store = None if no_cache else judging.JudgeCache(cache or judging.default_cache_path())
        try:
            if dry_run:
                plan = judging.dry_run(units, be, store, opts, set(done_rows_by_key))
                if store is not None:
                    plan["cache"] = str(store.path)
                print(json.dumps(plan))
                console.print(f"dry run: {plan['units']} judgment(s), {plan['calls']} judge call(s) to make, "
                              f"{plan['cached']} already cached, {plan['to_call']} to call (at most "
                              f"{plan['max_calls']} with re-asks), ~{plan['input_tokens']} input tokens "
                              f"({plan['token_count']}); nothing was called", markup=False)
                raise typer.Exit(EXIT_OK)
            rows: dict = dict(done_rows_by_key)
            with JsonlWriter(output, append=resume) as writer:
                def emit(row: dict) -> None:
                    writer.write(row)
                    rows[judging.unit_key(row["record_id"], row["objective"], row["candidate"])] = row

                progress = _progress(quiet, len(units) - len(done_rows_by_key), console)
                with progress as prog:
                    task = prog.add_task("judging", total=len(units) - len(done_rows_by_key),
                                         calls=0, hits=0, invalid=0) if prog else None

                    def on_progress(n, rep):
                        if prog:
                            prog.update(task, completed=n, calls=rep.calls, hits=rep.cache_hits, invalid=rep.invalid)

                    report = judging.judge_units(units, be, store, opts, emit, set(done_rows_by_key), on_progress)
        finally:
            be.close()
            if store is not None:
                store.close()
        ordered = [rows[u.key] for u in units if u.key in rows]
        cand_names = list(items[0].candidates) if items else []
        obj_names = list(dict.fromkeys(o.name for it in items for o in it.objectives))
        summ = judging.summarize(ordered, mode, cand_names, obj_names)
        summ["judge"] = judging.judge_info(be, opts)
        summ["run"] = {"calls": report.calls, "cache_hits": report.cache_hits, "resumed": report.resumed,
                       "judged": report.judged, "call_failures": report.call_failures,
                       "prompt_tokens": report.prompt_tokens, "completion_tokens": report.completion_tokens,
                       "seconds": round(report.seconds, 3),
                       "calls_per_s": round(report.calls / report.seconds, 3) if report.seconds else None}
        saved = "the judgments are in " + ("the output" if output == "-" else output) + " and the cache"
        if summary:
            try:
                summary.write_text(json.dumps(summ, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            except OSError as e:
                raise fail(f"{summary}: cannot write the summary: {e.strerror or e} ({saved})")
        if plot:
            try:
                judging.plot_scores(ordered, plot, obj_names, cand_names)
            except (OSError, ValueError) as e:
                raise fail(f"{plot}: cannot write the plot: {getattr(e, 'strerror', None) or e} ({saved})")
        if not quiet:
            _print_summary(summ, console)
    if summ["invalid_rate"] > max_invalid:
        console.print(f"error: {summ['invalid']} of {summ['units']} judgment(s) invalid "
                      f"({summ['invalid_rate']:.1%} > --max-invalid {max_invalid:.1%})", markup=False)
        raise typer.Exit(EXIT_FAILED)
    raise typer.Exit(EXIT_OK)


def _pct(x, ci=None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" + (f"\n[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _print_summary(summ: dict, console) -> None:
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
    run = summ["run"]
    extra = f"; position consistency {summ['position_consistency']:.1%}" if "position_consistency" in summ else ""
    reasons = ", ".join(f"{k}: {v}" for k, v in summ.get("invalid_reasons", {}).items())
    console.print(f"{summ['units']} judgment(s), {summ['invalid']} invalid" + (f" ({reasons})" if reasons else "")
                  + f"{extra}; {run['calls']} judge call(s), {run['cache_hits']} cache hit(s), {run['resumed']} resumed, "
                  f"{run['call_failures']} failed call(s); {run['seconds']:.1f}s", markup=False)


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _progress(quiet: bool, total: int, console):
    if quiet or not sys.stderr.isatty() or total == 0:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[calls]} calls, {task.fields[hits]} cached, {task.fields[invalid]} invalid"),
                    TimeElapsedColumn(), console=console)
