"""``metaalign build-data``: the dynamic multi-objective dataset (paper Algorithm 1).

A thin layer over :func:`metaalign_cli.dataset.build_data`: flags in, output directory and
``stats.json`` out, a summary on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

OUTPUT_FORMATS = ("sharegpt",)


def parse_formats(values: list[str] | None) -> tuple[str | None, bool]:
    """(input format or None to guess, sharegpt?) from ``--format`` values, each one name or a
    comma-separated list: at most one input format, plus ``sharegpt``. Raises ValueError."""
    from metaalign_cli.dataset import INPUT_FORMATS

    input_format, sharegpt = None, False
    for v in values or ():
        for name in (x.strip().lower() for x in v.split(",")):
            if not name:
                continue
            if name == "sharegpt":
                sharegpt = True
            elif name in INPUT_FORMATS:
                if input_format not in (None, name):
                    raise ValueError(f"--format: two input formats given ({input_format}, {name})")
                input_format = name
            else:
                raise ValueError(f"--format: unknown format '{name}' (input: {', '.join(INPUT_FORMATS)}; "
                                 "output: sharegpt)")
    return input_format, sharegpt


def parse_objective_map(values: list[str] | None) -> dict[str, str]:
    """``aspect=objective`` pairs (repeatable, or comma-separated) as a dict. Raises ValueError."""
    out: dict[str, str] = {}
    for v in values or ():
        for part in v.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"--objective-map: expected ASPECT=OBJECTIVE, got '{part.strip()}'")
            k, o = (x.strip() for x in part.split("=", 1))
            if not k or not o:
                raise ValueError(f"--objective-map: expected ASPECT=OBJECTIVE, got '{part.strip()}'")
            out[k] = o
    return out


def register(app: typer.Typer) -> None:
    """Add ``build-data`` to ``app``."""

    @app.command("build-data")
    def build_data_cmd(
        inputs: list[Path] = typer.Argument(..., help="Input files (.jsonl, .jsonl.gz, .json, .csv); several allowed."),
        output: Path = typer.Option(..., "--output", "-o", help="Output directory (split/stage JSONL files and stats.json)."),
        formats: Optional[list[str]] = typer.Option(
            None, "--format", "-f",
            help="Input format: ultrafeedback, scored, pairwise or hh-rlhf (guessed from the fields when "
                 "omitted); add 'sharegpt' (e.g. -f ultrafeedback,sharegpt) to also write FastChat conversations."),
        template: Optional[str] = typer.Option(
            None, "--template", "-t",
            help="Correction template rendering the prompts (same as `correct`). Default: hh-rlhf for hh-rlhf input, else ultrafeedback."),
        objectives: Optional[str] = typer.Option(
            None, "--objectives", "-O",
            help="pairwise/hh-rlhf without labels: objectives the chosen response is better on "
                 "(hh-rlhf default: harmless). ultrafeedback/scored: use only these."),
        objective_map: Optional[list[str]] = typer.Option(
            None, "--objective-map", help="Rename a source aspect/score field: ASPECT=OBJECTIVE (repeatable)."),
        tie_margin: float = typer.Option(0.0, "--tie-margin", min=0.0,
                                         help="Scores within this margin count as equal (scored, ultrafeedback)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the objective shuffles and the warm-up sample."),
        split_seed: int = typer.Option(0, "--split-seed", help="Seed of the per-query split hash."),
        warmup_ratio: float = typer.Option(0.1, "--warmup-ratio", min=0.0, max=1.0,
                                           help="Share of equal-preference items copied into the warm-up stage."),
        validation_ratio: float = typer.Option(0.05, "--validation-ratio", min=0.0, max=1.0,
                                               help="Share of queries in the validation split."),
        test_ratio: float = typer.Option(0.0, "--test-ratio", min=0.0, max=1.0,
                                         help="Share of queries in a test split (0: no test split)."),
        exclude_queries: Optional[list[Path]] = typer.Option(
            None, "--exclude-queries",
            help="CSV/JSONL file whose query column lists queries to keep out (repeatable), e.g. the paper's test queries."),
        exclude_field: str = typer.Option("query", "--exclude-field", help="Column/field of --exclude-queries files."),
        tokenizer: Optional[str] = typer.Option(
            None, "--tokenizer", help="GGUF file or local HF tokenizer directory: report token-length percentiles."),
        strict: bool = typer.Option(False, "--strict", help="Stop at the first bad row with a one-line error (exit 2)."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Read at most this many rows per input file."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier build in --output."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary."),
        objectives_dir: Optional[list[Path]] = typer.Option(None, "--objectives-dir", help="Extra directory of objective YAML files (repeatable)."),
        objective_file: Optional[list[Path]] = typer.Option(None, "--objective-file", help="Extra objective YAML file (repeatable)."),
    ):
        """Build the dynamic multi-objective dataset (paper Algorithm 1) for training a corrector.

        Writes OUTPUT/{train,validation[,test]}/{warmup,equal,preference}.jsonl and
        OUTPUT/stats.json; a summary goes to stderr. Rows that cannot be used are counted per
        reason (see stats.json); --strict stops at the first one.
        """
        from metaalign_cli.cli_common import EXIT_FAILED, cli_errors, console, fail, load_objective_set, quiet_libraries, split_names
        from metaalign_cli.dataset import BuildOptions, ReadOptions, build_data, load_excluded_queries
        from metaalign_cli.templates import load_template

        try:
            input_format, sharegpt = parse_formats(formats)
            omap = parse_objective_map(objective_map)
        except ValueError as e:
            raise fail(str(e))
        if validation_ratio + test_ratio > 1.0:
            raise fail("--validation-ratio + --test-ratio must be at most 1")
        if output.exists() and not output.is_dir():
            raise fail(f"{output}: exists and is not a directory")
        if not overwrite and output.is_dir():
            from metaalign_cli.dataset import output_files

            old = [p for p in output_files(output) if p.exists()]
            if old:
                raise fail(f"{output}: holds an earlier build ({old[0]}); use --overwrite or another directory")
        quiet_libraries(quiet)
        with cli_errors():
            objset = load_objective_set(objectives_dir, objective_file)
            objs = objset.resolve(objectives) if split_names(objectives) else None
            for k, v in omap.items():
                objset.get(v)  # an unknown target name fails now, with suggestions
            if template is None:
                from metaalign_cli.dataset import guess_file_format

                fmt = input_format or (None if str(inputs[0]) == "-" else guess_file_format(str(inputs[0])))
                template = "hh-rlhf" if fmt == "hh-rlhf" else "ultrafeedback"
            tpl = load_template(template, kind="correction")
            exclude = load_excluded_queries(exclude_queries or (), exclude_field) if exclude_queries else frozenset()
            count_tokens = None
            if tokenizer:
                from metaalign_cli.dataset import load_token_counter

                count_tokens = load_token_counter(tokenizer)
            read = ReadOptions(objective_set=objset, objectives=objs, objective_map=omap,
                               tie_margin=tie_margin, exclude=exclude, limit=limit)
            opts = BuildOptions(template=tpl, read=read, input_format=input_format, seed=seed,
                                split_seed=split_seed, warmup_ratio=warmup_ratio,
                                validation_ratio=validation_ratio, test_ratio=test_ratio,
                                sharegpt=sharegpt, strict=strict, count_tokens=count_tokens)
            # `kill` (SIGTERM) cleans up like Ctrl-C: the half-built dataset is removed.
            import signal

            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
            show = not quiet and sys.stderr.isatty()
            if show:
                with console.status("reading rows...") as status:
                    def on_row(n: int) -> None:
                        if n % 1000 == 0:
                            status.update(f"read {n} rows")

                    stats = build_data([str(p) for p in inputs], output, opts, on_row, keep_empty=False)
            else:
                stats = build_data([str(p) for p in inputs], output, opts, keep_empty=False)
        if not quiet:
            print_summary(stats.to_dict(), output, console)
        total = sum(stats.to_dict()["items_total"].values())
        if total == 0:
            raise fail(f"no items were built (see the bad records and dropped pairs above); nothing was written to "
                       f"{output}", EXIT_FAILED)

    return None


def print_summary(stats: dict, output: Path, console) -> None:
    """The human summary of ``stats.json`` on stderr: items per split and stage, queries,
    objective frequencies, bad records and dropped pairs, token lengths."""
    from rich.table import Table

    t = Table(title=f"build-data -> {output}", title_justify="left")
    t.add_column("split")
    for st in ("warmup", "equal", "preference"):
        t.add_column(st, justify="right")
    t.add_column("queries", justify="right")
    for sp, counts in stats["items"].items():
        t.add_row(sp, *(str(counts[s]) for s in ("warmup", "equal", "preference")), str(stats["queries"].get(sp, 0)))
    console.print(t)
    console.print(f"{stats['rows']} rows, {stats['pairs']} pairs, {stats['pairs_used']} used; "
                  f"{stats['unknown_ratings']} unknown ratings; excluded {stats['excluded']['rows']} rows "
                  f"({stats['excluded']['queries']} queries)", markup=False)
    freq = stats["objective_frequency"]
    names = sorted({n for c in freq.values() for n in c})
    if names:
        ft = Table(title="objective frequency (items listing it)", title_justify="left")
        ft.add_column("objective")
        for st in ("warmup", "equal", "preference"):
            ft.add_column(st, justify="right")
        for n in names:
            ft.add_row(n, *(str(freq[st].get(n, 0)) for st in ("warmup", "equal", "preference")))
        console.print(ft)
    if stats["dropped_pairs"] or stats["bad_records"]:
        dt = Table(title="skipped", title_justify="left")
        dt.add_column("reason")
        dt.add_column("bad records", justify="right")
        dt.add_column("pairs dropped", justify="right")
        for reason in dict.fromkeys(list(stats["bad_records"]) + list(stats["dropped_pairs"])):
            dt.add_row(reason, str(stats["bad_records"].get(reason, 0)), str(stats["dropped_pairs"].get(reason, 0)))
        console.print(dt)
        for reason, example in stats["bad_record_examples"].items():
            console.print(f"first {reason}: {example}", markup=False)
    if stats["token_lengths"]:
        tt = Table(title="token lengths", title_justify="left")
        for c in ("stage", "part", "p50", "p90", "p95", "p99", "max", "mean"):
            tt.add_column(c, justify="right" if c not in ("stage", "part") else "left")
        for st, parts in stats["token_lengths"].items():
            for part, pct in parts.items():
                tt.add_row(st, part, *(str(pct.get(k, "")) for k in ("p50", "p90", "p95", "p99", "max", "mean")))
        console.print(tt)
