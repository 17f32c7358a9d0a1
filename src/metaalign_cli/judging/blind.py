"""Blind judging by people or any outside judge: task export and verdict import.

The protocol of a human evaluation of Algorithm 2: each task shows one query, RESPONSE 1 and
RESPONSE 2 (a candidate and the golden response, in the position the LLM judge would draw:
:func:`~metaalign_cli.judging.verdicts.candidate_position`, or both orders) and one objective
with its description; no candidate names; tasks shuffled (seeded). The key that maps tasks back
to (record, objective, candidate, position) is written to a separate file, so whoever judges
never sees it. Verdicts come back as JSONL ``{"task": ID, "verdict": 1|2|0}`` (0 = tie; other
fields, such as a comment, are ignored) and
become the same judgment rows, summary, intervals and advantage an LLM judge gives.

An export is identified by a digest of its plan (records, objectives, candidates, positions
and the exact texts shown); task ids carry it, so verdicts or a key of another export are
refused, as are missing, extra or duplicate tasks and values other than 0, 1 and 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from metaalign_cli import __version__
from metaalign_cli.errors import InputError
from metaalign_cli.judging.plan import JudgeOptions, JudgeUnit, aspect_text

KEY_FORMAT = "metaalign-blind-key-1"


def export_id(units: list[JudgeUnit]) -> str:
    """A 12-hex digest of what the tasks show and how they map back (record id, objective,
    candidate, order, position, query, both responses): the same plan always gives the same id."""
    h = hashlib.sha256()
    for u in units:
        for a in u.asks:
            r1, r2 = _responses(u, a.candidate_position)
            h.update(json.dumps([u.item.record_id, u.objective.name, u.candidate, a.order, a.candidate_position,
                                 u.item.question, r1, r2, aspect_text(u.objective)], ensure_ascii=False).encode())
    return h.hexdigest()[:12]


def _responses(u: JudgeUnit, position: int) -> tuple[str, str]:
    cand = u.item.candidates[u.candidate]
    return (cand, u.item.golden) if position == 1 else (u.item.golden, cand)


def export_tasks(units: list[JudgeUnit], seed: int = 0) -> tuple[list[dict], dict]:
    """The blind tasks of pairwise ``units`` (one per ask: two per unit with both orders) and
    their key.

    Tasks: ``{"task", "query", "response_1", "response_2", "aspect"}``, shuffled with
    ``random.Random(seed)``; ids ``<export id>-<n>``. Key: ``{"format", "export", "seed",
    "tasks": [{"task", "record_id", "input_line", "objective", "candidate", "order",
    "candidate_position"}]}``. Raises InputError for score-mode units (no golden to compare).

    A pair shown twice (an unchanged correction shows the same pair as its uncorrected answer)
    is one task, in the order drawn first: the key maps both (record, candidate) entries to it,
    each with the position its candidate is shown in there, so one verdict gives both the same
    outcome and a judge never sees a pair twice (with ``--both-orders``, twice: once in each
    order).
    """
    if any(u.item.golden is None or u.asks[0].candidate_position is None for u in units):
        raise InputError("blind tasks are pairwise (candidate vs golden): use --mode pairwise")
    eid = export_id(units)
    entries = [(u, a) for u in units for a in u.asks]
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    tasks, key = [], []
    shown: dict[str, str] = {}  # (query, aspect, response 1, response 2) -> its task id
    width = len(str(len(entries)))
    for i in order:
        u, a = entries[i]
        pos, how = a.candidate_position, a.order
        r1, r2 = _responses(u, pos)
        aspect = aspect_text(u.objective)
        same, swapped = (json.dumps([u.item.question, aspect, *pair], ensure_ascii=False)
                         for pair in ((r1, r2), (r2, r1)))
        if same in shown:
            tid = shown[same]
        elif swapped in shown and len(u.asks) == 1:  # shown there with the candidate in the other position
            # (with both orders, the swapped pair is a task of its own: it is what both orders ask)
            tid, pos = shown[swapped], 3 - pos
            how = "golden-first" if how == "candidate-first" else "candidate-first"
        else:
            tid = shown[same] = f"{eid}-{len(tasks) + 1:0{width}d}"
            tasks.append({"task": tid, "query": u.item.question, "response_1": r1, "response_2": r2,
                          "aspect": aspect})
        key.append({"task": tid, "record_id": u.item.record_id, "input_line": u.item.line,
                    "objective": u.objective.name, "candidate": u.candidate, "order": how,
                    "candidate_position": pos})
    return tasks, {"format": KEY_FORMAT, "export": eid, "seed": seed, "version": __version__,
                   "tasks_sha": _tasks_sha(key), "tasks": key}


def _tasks_sha(tasks: list) -> str:
    """Digest of a key's task mapping (:func:`~metaalign_cli.records.text_sha`): an edited key
    (a flipped position) is refused."""
    from metaalign_cli.records import text_sha

    return text_sha(json.dumps(tasks, sort_keys=True, ensure_ascii=False))


def key_seed(path: str | os.PathLike, default: int) -> int:
    """The ``seed`` an export's key records (what drew its positions), so an import needs no
    ``--seed`` again; ``default`` when the file cannot be read as a key (:func:`read_key` then
    says why)."""
    try:
        seed = json.loads(Path(path).read_text(encoding="utf-8")).get("seed")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError, AttributeError):
        return default
    return seed if type(seed) is int else default


def read_key(path: str | os.PathLike, units: list[JudgeUnit], seed: int | None = None) -> dict:
    """The key file of an export, checked against the plan of this run (the same input and
    flags must give the same export id; ``seed``, this run's, is named when it is not the
    key's). Raises InputError naming the file."""
    p = Path(path)
    try:
        key = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read the key: {e.strerror or e}", source=str(p)) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"not a blind-task key (invalid JSON: {e})", source=str(p)) from None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT or not isinstance(key.get("tasks"), list):
        raise InputError("not a blind-task key written by `metaalign judge --blind-key`", source=str(p))
    if "tasks_sha" in key and key["tasks_sha"] != _tasks_sha(key["tasks"]):
        raise InputError("the key's tasks were edited since the export (its digest does not match): use the key "
                         "as `judge --blind-key` wrote it", source=str(p))
    if key.get("export") != export_id(units):
        why = f" (it was exported with --seed {key['seed']}, this run has --seed {seed})" \
            if seed is not None and key.get("seed") != seed else _difference(key["tasks"], units)
        raise InputError(f"the key is of export {key.get('export')!r}, not of this input and flags "
                         f"({export_id(units)!r}){why}: use the input and flags of the export", source=str(p))
    return key


def _difference(tasks: list, units: list[JudgeUnit]) -> str:
    """What differs between a key's tasks and this run's plan, as " (...)" for the refusal:
    the objectives, the candidates, the records or their lines, or both orders; else that the
    objectives' order or the texts differ."""
    def names(field: str) -> set:
        return {json.dumps(t.get(field)) if field == "record_id" else t.get(field) for t in tasks if isinstance(t, dict)}

    now = {"objective": {u.objective.name for u in units}, "candidate": {u.candidate for u in units},
           "record_id": {json.dumps(u.item.record_id) for u in units}}
    for field, flag in (("objective", "objectives"), ("candidate", "candidates")):
        if names(field) != now[field]:
            return (f" (its {flag} are {', '.join(sorted(map(str, names(field))))}; this run's are "
                    f"{', '.join(sorted(now[field]))})")
    if names("record_id") != now["record_id"]:
        return f" (it holds {len(names('record_id'))} records, this input {len(now['record_id'])} or other ids)"
    lines = {json.dumps(t.get("record_id")): t.get("input_line") for t in tasks if isinstance(t, dict)}
    if any(lines.get(json.dumps(u.item.record_id)) != u.item.line for u in units):
        return " (its records are in another order, or on other lines: use the exported input as it was)"
    per_unit = len(tasks) / max(1, len(units))
    if per_unit != (2 if units and len(units[0].asks) == 2 else 1):
        return " (--both-orders differs)"
    return (" (the same records, objectives and candidates: the order of the objectives, as -O gives them, or "
            "the texts differ)")


def read_verdicts(paths: list[str | os.PathLike], key: dict) -> dict[str, int]:
    """Task id -> verdict (0, 1 or 2) from one or more JSONL verdict files (each judge's part).

    Every task of ``key`` must have exactly one verdict across the files; other fields of a
    line (an annotator's name or comment) are left as they are. Raises InputError
    naming file and line for a line that is not ``{"task": ..., "verdict": 0|1|2}``, a task the
    key does not hold (of another export when its id prefix differs), a task given twice, and
    naming the first missing task when some have none; a file given twice (the same file by
    another name too) is named as such."""
    seen_files: dict[tuple[int, int], str] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue  # (read_jsonl names a missing file)
        first = seen_files.setdefault((st.st_dev, st.st_ino), str(path))
        if first != str(path) or list(map(str, paths)).count(str(path)) > 1:
            same = "" if first == str(path) else f" (the same file as {first})"
            raise InputError(f"given twice with --blind-verdicts{same}: give each judge's file once",
                             source=str(path))
    tasks = {t["task"] for t in key["tasks"]}
    prefix = key["export"] + "-"
    out: dict[str, int] = {}
    where: dict[str, str] = {}
    for path in paths:
        from metaalign_cli.records import read_jsonl

        for rec in read_jsonl(path):
            at = f"{rec.source}:{rec.line}"
            if rec.error is not None:
                if _raw_line(path, rec.line).lstrip().startswith("#"):
                    raise InputError("a comment line: a verdict file is JSONL, one {\"task\", \"verdict\"} object "
                                     "per line (put a comment in a field of its line)", rec.source, rec.line)
                raise rec.error
            d = rec.data
            tid, v = d.get("task"), d.get("verdict")
            if "response_1" in d and "verdict" not in d:
                raise InputError("a task, not a verdict: is this the tasks file? (--blind-verdicts reads "
                                 "{\"task\", \"verdict\"} lines)", rec.source, rec.line)
            if "verdict" not in d:
                like = next((k for k in d if isinstance(k, str) and k.strip().lower() == "verdict"), None)
                hint = f" (there is {json.dumps(like)}: the name is lower-case)" if like else ""
                raise InputError(f"no 'verdict' field{hint}", rec.source, rec.line, "verdict")
            if not isinstance(tid, str):
                raise InputError("expected a task id (string)", rec.source, rec.line, "task")
            if tid not in tasks:
                other = "" if tid.startswith(prefix) else f" (of another export: this key's tasks start '{prefix}')"
                raise InputError(f"task {tid!r} is not in the key{other}", rec.source, rec.line, "task")
            if type(v) is not int or v not in (0, 1, 2):  # (not true, 1.0 or "1": a verdict is an integer)
                raise InputError(f"verdict must be 1, 2 or 0 (tie), not {json.dumps(v)[:40]}", rec.source, rec.line,
                                 "verdict")
            if tid in out:
                raise InputError(f"task {tid!r} has a second verdict (first at {where[tid]})", rec.source, rec.line,
                                 "task")
            out[tid], where[tid] = v, at
    missing = [t["task"] for t in key["tasks"] if t["task"] not in out]
    if missing:
        raise InputError(f"{len(missing)} of {len(tasks)} task(s) have no verdict (first: {missing[0]})",
                         source=", ".join(map(str, paths)))
    return out


def _raw_line(path, line: int) -> str:
    """Line ``line`` (1-based) of a small text file, for a message; "" when unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, text in enumerate(fh, start=1):
                if n == line:
                    return text
    except OSError:
        pass
    return ""


def blind_rows(units: list[JudgeUnit], key: dict, verdicts: dict[str, int], judge: dict,
               opts: JudgeOptions) -> list[dict]:
    """Judgment rows (the rows an LLM judge writes, built by the same
    :func:`~metaalign_cli.judging.run.unit_row`: ``outcome``, ``verdict``, ``candidate_position``
    or ``consistent`` with both orders, ``judgments`` with each task id) from blind verdicts,
    in plan order. Algorithm 2 lines 9-11: win when the judge picked the candidate's position,
    tie for 0; with both orders a disagreement is a tie."""
    from metaalign_cli.judging.run import unit_row

    by_unit: dict[tuple, list[dict]] = {}
    for t in key["tasks"]:
        by_unit.setdefault((json.dumps(t["record_id"]), t["objective"], t["candidate"]), []).append(t)
    rows = []
    for u in units:
        asks = [{"order": t["order"], "candidate_position": t["candidate_position"], "task": t["task"],
                 "value": verdicts[t["task"]]}
                for t in sorted(by_unit[u.key], key=lambda t: t["order"] != "candidate-first")]
        rows.append(unit_row(u, asks, opts, judge))
    return rows
