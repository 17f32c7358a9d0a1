"""``metaalign build-data``: the dynamic multi-objective dataset (paper Algorithm 1).

A thin layer over :func:`metaalign_cli.dataset.build_data`: flags in, output directory and
``stats.json`` out, a summary on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

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


DOC = """Build the dynamic multi-objective dataset (paper Algorithm 1) for training a corrector.

Writes OUTPUT/{train,validation[,test]}/{warmup,equal,preference}.jsonl and OUTPUT/stats.json;
a summary goes to stderr. Rows that cannot be used are counted per reason (see stats.json);
--strict stops at the first one."""


def register(app: typer.Typer) -> None:
    """Add ``build-data`` to ``app``."""
    from metaalign_cli import cli_spec
    from metaalign_cli.config import BuildConfig

    cli_spec.register(app, "build-data", BuildConfig, build_data_main, DOC,
                      "Build the training data: the dynamic multi-objective dataset (Algorithm 1)")


def build_options(cfg):
    """The library's :class:`~metaalign_cli.dataset.BuildOptions` of a ``build-data`` config
    (objectives, template, excluded queries and tokenizer loaded). Raises ValueError for bad
    ``--format``/``--objective-map`` values, MetaAlignError for the rest."""
    from metaalign_cli.cli_common import say
    from metaalign_cli.dataset import BuildOptions, ReadOptions, load_excluded_queries
    from metaalign_cli.objectives import load_objectives
    from metaalign_cli.templates import load_template

    input_format, sharegpt = parse_formats(cfg.format)
    omap = parse_objective_map(cfg.objective_map)
    objset = load_objectives(dirs=cfg.objectives_dir, files=cfg.objective_file)
    objs = objset.resolve(cfg.objectives) if cfg.objectives else None
    for v in omap.values():
        objset.get(v)  # an unknown target name fails now, with suggestions
    for note in objset.notes(objs or []):
        say(f"warning: {note}")
    template = cfg.template
    if template is None:
        from metaalign_cli.dataset import guess_file_format

        first = cfg.inputs[0]
        fmt = input_format or (None if first == "-" else guess_file_format(first))
        template = "hh-rlhf" if fmt == "hh-rlhf" else "ultrafeedback"
    exclude = load_excluded_queries(cfg.exclude_queries, cfg.exclude_field) if cfg.exclude_queries else frozenset()
    count_tokens = None
    if cfg.tokenizer:
        from metaalign_cli.dataset import load_token_counter

        count_tokens = load_token_counter(cfg.tokenizer)
    read = ReadOptions(objective_set=objset, objectives=objs, objective_map=omap, tie_margin=cfg.tie_margin,
                       exclude=exclude, limit=cfg.limit)
    return BuildOptions(template=load_template(template, kind="correction"), read=read, input_format=input_format,
                        seed=cfg.seed, split_seed=cfg.split_seed, warmup_ratio=cfg.warmup_ratio,
                        validation_ratio=cfg.validation_ratio, test_ratio=cfg.test_ratio, sharegpt=sharegpt,
                        strict=cfg.strict, count_tokens=count_tokens)


def check_output_dir(output: Path, overwrite: bool, inputs: list[str] = ()) -> None:
    """Fail before reading anything when ``output`` cannot hold the build: a file, an earlier
    build without ``--overwrite``, a build file that is one of ``inputs`` (``--overwrite`` would
    replace what it reads), or a place where no directory can be made (its nearest existing
    ancestor is not a writable directory)."""
    import os

    from metaalign_cli.cli_common import fail
    from metaalign_cli.dataset import output_files

    if output.exists() and not output.is_dir():
        raise fail(f"{output}: exists and is not a directory")
    written = {(st.st_dev, st.st_ino): p for p in output_files(output) if p.exists() for st in [p.stat()]}
    for i in inputs:
        try:
            st = os.stat(i)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in written:
            raise fail(f"{i}: is an input, and the build in {output} writes {written[st.st_dev, st.st_ino]}; "
                       "choose another output directory")
    if not overwrite and output.is_dir():
        old = [p for p in output_files(output) if p.exists()]
        if old:
            raise fail(f"{output}: holds an earlier build ({old[0]}); use --overwrite or another directory")
    ancestor = output
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise fail(f"{output}: cannot write the dataset here ({ancestor} is not a writable directory)")


def build_data_main(cfg, given: dict) -> None:
    """``metaalign build-data``: flags -> :func:`metaalign_cli.dataset.build_data` -> summary."""
    import signal

    from metaalign_cli.cli_common import EXIT_FAILED, EXIT_INTERRUPTED, cli_errors, console, fail, quiet_libraries, say
    from metaalign_cli.dataset import build_data

    output = Path(cfg.output)
    check_output_dir(output, cfg.overwrite, cfg.inputs)
    quiet_libraries(cfg.quiet)
    with cli_errors():
        try:
            opts = build_options(cfg)
        except ValueError as e:
            raise fail(str(e))
        # `kill` (SIGTERM) cleans up like Ctrl-C: the half-built dataset is removed.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        try:
            if not cfg.quiet and sys.stderr.isatty():
                with console.status("reading rows...") as status:
                    def on_row(n: int) -> None:
                        if n % 1000 == 0:
                            status.update(f"read {n} rows")

                    stats = build_data(cfg.inputs, output, opts, on_row, keep_empty=False)
            else:
                stats = build_data(cfg.inputs, output, opts, keep_empty=False)
        except OSError as e:
            raise fail(f"{output}: cannot write the dataset: {e.strerror or e}")
        except KeyboardInterrupt:  # Ctrl-C: build_data has removed its half-written build
            say(f"interrupted; nothing was written to {output} (a build is written whole or not at all)")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    if not cfg.quiet:
        print_summary(stats.to_dict(), output, console)
        for w in stats.repairs[:3]:  # (lone surrogates; every one is counted in stats.json)
            say(f"warning: {w}")
        if len(stats.repairs) > 3:
            say(f"warning: ... and {len(stats.repairs) - 3} more field(s) repaired (stats.json: repaired_fields)")
    total = sum(stats.to_dict()["items_total"].values())
    train = sum(stats.to_dict()["items"].get("train", {}).values())
    if total and not train and not cfg.quiet:  # (e.g. --validation-ratio 1: every query held out)
        say(f"warning: the train split is empty: every query went to validation or test "
            f"(--validation-ratio {cfg.validation_ratio}, --test-ratio {cfg.test_ratio}); `metaalign train` "
            "reads the train split")
    if total == 0:
        d = stats.to_dict()
        if not d["rows"]:
            why = "the input holds no rows"
        elif cfg.quiet:
            why = (f"{sum(d['bad_records'].values())} bad record(s), {sum(d['dropped_pairs'].values())} dropped "
                   "pair(s): rerun without -q for the reasons")
        else:
            why = "see the bad records and dropped pairs above"
        raise fail(f"no items were built ({why}); nothing was written to {output}", EXIT_FAILED)


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
