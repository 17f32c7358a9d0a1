"""``metaalign judge`` as a library call: :func:`run_judge` (an LLM judge) and
:func:`run_blind_import` (verdicts of people or any outside judge), both returning a
:class:`JudgeRun` whose ``summary`` is the summary file."""

from __future__ import annotations

import json

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from metaalign_cli.backends.base import Backend, GenerationSettings
from metaalign_cli.errors import InputError
from metaalign_cli.judging.cache import JudgeCache, default_cache_path
from metaalign_cli.judging.items import CORRECTED_FIELD, JudgeItem, load_judge_items
from metaalign_cli.judging.plan import JudgeOptions, JudgeUnit, plan_units, unit_key
from metaalign_cli.judging.run import JudgeReport, dry_run, judge_info, judge_units, load_done_rows
from metaalign_cli.judging.stats import summarize

if TYPE_CHECKING:
    from metaalign_cli.config import JudgeConfig


@dataclass
class JudgePlan:
    """A judge run planned, nothing called: the checked input ``items``, the judge ``options``
    and every ``unit`` with its exact prompt(s)."""

    items: list[JudgeItem]
    options: JudgeOptions
    units: list[JudgeUnit]
    warnings: list[str] = field(default_factory=list)
    failed_records: int = 0  # records `correct --on-error keep` kept as failed: left out

    @property
    def candidates(self) -> list[str]:
        return list(self.items[0].candidates) if self.items else []

    @property
    def objectives(self) -> list[str]:
        return list(dict.fromkeys(o.name for it in self.items for o in it.objectives))


@dataclass
class JudgeRun:
    """A finished judge run: every row in plan order, the run's counts and the ``summary``
    (win rates, intervals, advantage; what ``--summary`` writes)."""

    rows: list[dict]
    summary: dict
    report: JudgeReport | None = None
    dry_run: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def exit_code(self, max_invalid: float) -> int:
        """1 when the share of invalid judgments is above ``max_invalid``, else 0."""
        return 1 if self.summary and self.summary["invalid_rate"] > max_invalid else 0


def plan_judge(cfg: "JudgeConfig") -> JudgePlan:
    """Read and check ``cfg.input`` (every record, before any judge loads) and plan the
    units. Raises InputError/ConfigError/UnknownNameError on bad input, objectives or template."""
    from metaalign_cli.objectives import load_objectives
    from metaalign_cli.records import read_records
    from metaalign_cli.templates import load_template

    objset = load_objectives(dirs=cfg.objectives_dir, files=cfg.objective_file)
    objs = objset.resolve(cfg.objectives) if cfg.objectives else None
    kind = "judge-pairwise" if cfg.mode == "pairwise" else "judge-score"
    tpl = load_template(cfg.template or kind, kind=kind)
    failed: list = []
    repairs: list[str] = []
    ids_seen = False

    def noting(recs):  # the repairs made when reading (lone surrogates), said as `correct` says them
        nonlocal ids_seen
        for r in recs:
            repairs.extend(r.warnings)
            ids_seen = ids_seen or (isinstance(r.data, dict) and r.data.get(cfg.id_field) not in (None, ""))
            yield r

    items = load_judge_items(noting(read_records(cfg.input, cfg.input_format)), objset, objs, cfg.mode,
                             cfg.golden_field, cfg.candidate_field or None, cfg.query_field, cfg.id_field,
                             failed=failed)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                  stop=tuple(cfg.stop or ()))
    opts = JudgeOptions(template=tpl, mode=cfg.mode, settings=settings, seed=cfg.seed, both_orders=cfg.both_orders,
                        retries=cfg.retries, concurrency=cfg.concurrency, batch_size=cfg.batch_size,
                        rpm=cfg.rpm or None,
                        prompt_format=cfg.prompt_format, system=cfg.system)
    plan = JudgePlan(items, opts, plan_units(items, opts))
    plan.failed_records = len(failed)
    used = list({o.name: o for it in items for o in it.objectives}.values())
    plan.warnings += repairs + objset.notes(used, tpl.name)
    if cfg.id_field != "id" and items and not ids_seen:
        plan.warnings.append(f"no record has the --id-field '{cfg.id_field}': records are aligned by line number")
    if failed:
        plan.warnings.append(f"{len(failed)} record(s) failed in `correct` (an 'error' field and no "
                             f"'{CORRECTED_FIELD}'; first: {failed[0].source}:{failed[0].line}): not judged")
    empty = [it for it in items if it.golden is not None and not it.golden.strip()]
    if empty:
        plan.warnings.append(f"{len(empty)} record(s) have an empty golden response (first: {empty[0].source}:"
                             f"{empty[0].line}); they are judged against empty text")
    blank = [(it, n) for it in items for n, t in it.candidates.items() if not t.strip()]
    if blank:
        it, n = blank[0]
        plan.warnings.append(f"{len(blank)} candidate response(s) are empty (first: {it.source}:{it.line}, field "
                             f"'{n}'); they are judged as empty text")
    return plan


def is_failed_call(row: dict) -> bool:
    """Whether a row is ``invalid`` because a judge call failed (a server down, a timeout), not
    because the judge's answer did not parse: such units are asked again by ``--resume``."""
    return row.get("outcome") == "invalid" and "judge call failed" in (row.get("invalid_reason") or "")


def resumed_rows(path: str | os.PathLike, plan: JudgePlan) -> list[dict]:
    """The rows of an earlier run in ``path``, checked against ``plan`` before any judge loads.
    Raises InputError when the file is not judge output, holds rows this plan does not have
    (another input or flags) or rows of another mode. :func:`kept_rows` checks their judge."""
    rows = load_done_rows(path)
    planned = {u.key: u for u in plan.units}
    for r in rows:
        unit = planned.get(unit_key(r["record_id"], r["objective"], r["candidate"]))
        if unit is None:
            raise InputError(f"resumed rows do not match this run (record {r['record_id']!r}, objective "
                             f"'{r['objective']}', candidate '{r['candidate']}' is not planned); use the same input "
                             "and flags", source=str(path))
        if r.get("texts_sha") not in (None, unit.texts_sha):  # (rows written before it was recorded: none)
            raise InputError(f"resumed rows do not match this run: record {r['record_id']!r}'s texts changed since "
                             f"its row was judged (objective '{r['objective']}', candidate '{r['candidate']}'); "
                             "judge into another file, or --overwrite", source=str(path))
        if r.get("mode", plan.options.mode) != plan.options.mode:
            raise InputError("holds rows of another --mode; cannot resume", source=str(path))
    return rows


def kept_rows(rows: list[dict], judge: dict, path: str | os.PathLike) -> tuple[dict, int]:
    """The resumed ``rows`` (from :func:`resumed_rows`) to keep, by unit key (every row but
    failed calls), and how many failed calls were left out. Raises InputError when they were
    judged with another judge than ``judge`` (identity, template, prompt format, settings,
    seed, order policy: see :func:`metaalign_cli.resume.provenance_mismatch`)."""
    from metaalign_cli.resume import provenance_mismatch

    if rows:
        then = rows[0].get("judge") or {}
        now = {k: v for k, v in judge.items() if k not in ("template_source", "retries", "parser", "version")
               and (k != "weights_sha" or k in then)}  # (a file judged before weights were fingerprinted)
        why = provenance_mismatch(then, now)
        if why:
            raise InputError(f"its rows were judged with another judge ({why}); cannot resume (use the same judge "
                             "flags, or a new -o file)", source=str(path))
    kept = {unit_key(r["record_id"], r["objective"], r["candidate"]): r for r in rows if not is_failed_call(r)}
    return kept, len(rows) - len(kept)


def run_judge(cfg: "JudgeConfig", plan: JudgePlan | None = None, backend: Backend | None = None,
              emit: Callable[[dict], None] | None = None,
              on_progress: Callable[[int, JudgeReport], None] | None = None,
              on_model: Callable[[str], None] | None = None,
              warn: Callable[[str], None] | None = None) -> JudgeRun:
    """Judge ``cfg.input`` with an LLM judge (Algorithm 2 pairwise win rates, or Appendix E
    scores) and write one row per unit to ``cfg.output`` (``emit`` also sees each row).

    Order: plan (:func:`plan_judge`: input checked), resolve the judge model (nothing loaded),
    read ``--resume``'s rows, load the judge (``backend`` given: used as it is), check the
    resumed rows' judge, then ask (cache first; failed calls of the resumed file are asked
    again and the file is rewritten in plan order). ``cfg.dry_run``: count calls, cached calls
    and input tokens, call nothing. ``warn`` gets the loaded judge's warnings (a local server
    that lists another model than the one named). Returns the :class:`JudgeRun`. Raises InputError,
    ConfigError, MetaAlignError as :func:`plan_judge` and the model resolver do.
    """
    from metaalign_cli.models import resolve_config
    from metaalign_cli.records import JsonlWriter

    plan = plan or plan_judge(cfg)
    resolved = None if backend is not None else resolve_config(cfg, "judge")
    earlier = resumed_rows(cfg.output, plan) if cfg.resume and Path(cfg.output).exists() else []
    if resolved is not None and on_model:
        on_model(resolved.label)
    own = backend is None
    if backend is not None:
        be = backend
    elif cfg.dry_run:  # counts calls and tokens, calls nothing: an API judge needs no key for it
        from metaalign_cli.backends.server import api_key_optional

        with api_key_optional():
            be = resolved.load()
    else:
        be = resolved.load()
    store = None
    for w in be.warnings if warn else ():  # (a local server that lists another model, a quant fallback)
        warn(w)
    try:
        info = judge_info(be, plan.options)
        kept, failed = kept_rows(earlier, info, cfg.output)
        cache = Path(cfg.cache or default_cache_path())
        # a dry run spends nothing and writes nothing: no cache file is made for it
        store = None if cfg.no_cache or (cfg.dry_run and not cache.exists()) else JudgeCache(cache)
        if cfg.dry_run:
            out = dry_run(plan.units, be, store, plan.options, set(kept))
            out["cache"] = None if cfg.no_cache else str(cache)  # (the file the real run would use)
            return JudgeRun([], {}, dry_run=out)
        rows = dict(kept)
        if failed:  # failed calls are asked again: keep only the good rows, then append
            _rewrite_rows(cfg.output, [rows[u.key] for u in plan.units if u.key in rows])
        with JsonlWriter(cfg.output, append=cfg.resume) as writer:
            def write(row: dict) -> None:
                writer.write(row)
                rows[unit_key(row["record_id"], row["objective"], row["candidate"])] = row
                if emit:
                    emit(row)

            report = judge_units(plan.units, be, store, plan.options, write, set(kept), on_progress)
    finally:
        if own:
            be.close()
        if store is not None:
            store.close()
    ordered = [rows[u.key] for u in plan.units if u.key in rows]
    if failed:  # back in plan order, as an uninterrupted run writes them
        _rewrite_rows(cfg.output, ordered)
    return JudgeRun(ordered, run_summary(ordered, plan, info, report), report)


def run_summary(rows: list[dict], plan: JudgePlan, judge: dict, report: JudgeReport | None) -> dict:
    """The summary file: :func:`~metaalign_cli.judging.stats.summarize` of the rows, the judge
    and the run's counts."""
    summ = summarize(rows, plan.options.mode, plan.candidates, plan.objectives)
    summ["judge"] = judge
    if report is not None:
        summ["run"] = {"calls": report.calls, "cache_hits": report.cache_hits, "resumed": report.resumed,
                       "judged": report.judged, "call_failures": report.call_failures,
                       "prompt_tokens": report.prompt_tokens, "completion_tokens": report.completion_tokens,
                       "seconds": round(report.seconds, 3),
                       "calls_per_s": round(report.calls / report.seconds, 3) if report.seconds else None}
    return summ


def _rewrite_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Replace ``path`` by ``rows`` (written to a temporary file, then renamed: a kill leaves
    the old file or the new one, never half of either)."""
    import tempfile

    from metaalign_cli.records import dumps

    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    try:
        os.chmod(tmp, p.stat().st_mode & 0o777)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for r in rows:
                fh.write(dumps(r) + "\n")
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_blind_import(cfg: "JudgeConfig", plan: JudgePlan | None = None) -> JudgeRun:
    """``judge --blind-key K --blind-verdicts V...``: outside judges' verdicts on an export of
    this plan (:mod:`metaalign_cli.judging.blind`) as judgment rows written to ``cfg.output``,
    with the summary an LLM judge's run gets (win rates, intervals, advantage). Raises
    InputError for a key of another export or verdict files that do not match it (missing,
    extra or duplicate tasks, values other than 0, 1, 2); OSError when the output cannot be
    written."""
    from metaalign_cli import __version__
    from metaalign_cli.judging.blind import blind_rows, read_key, read_verdicts
    from metaalign_cli.records import JsonlWriter

    plan = plan or plan_judge(cfg)
    key = read_key(cfg.blind_key, plan.units, cfg.seed)
    verdicts = read_verdicts(cfg.blind_verdicts, key)
    judge = {"backend": "blind", "model": "outside judges", "export": key["export"],
             "verdict_files": [str(p) for p in cfg.blind_verdicts], "seed": key["seed"],
             "both_orders": plan.options.both_orders, "version": __version__}
    rows = blind_rows(plan.units, key, verdicts, judge, plan.options)
    with JsonlWriter(cfg.output) as w:
        for r in rows:
            w.write(r)
    run = JudgeRun(rows, run_summary(rows, plan, judge, None))
    # An unchanged correction shows the same pair as its uncorrected answer: two verdicts on one pair.
    same: dict[tuple, list] = {}
    for u, r in zip(plan.units, rows):
        same.setdefault((json.dumps(u.item.record_id), u.objective.name, u.item.candidates[u.candidate]),
                        []).append(r)
    split = [g for g in same.values() if len({r["outcome"] for r in g}) > 1]
    if split:
        r = split[0][0]
        run.warnings.append(f"{len(split)} pair(s) shown more than once (a candidate equal to another) got different "
                            f"verdicts (first: record {r['record_id']!r}, objective '{r['objective']}'): the change "
                            "between those candidates is the judges' disagreement, not the text's")
    return run
