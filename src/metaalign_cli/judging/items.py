"""Judge input: records with a query, a golden response, candidates and objectives, checked
before any judge call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal

from metaalign_cli.errors import ConfigError, InputError, UnknownNameError
from metaalign_cli.objectives import Objective, ObjectiveSet
from metaalign_cli.records import (QUERY_FIELDS, RESPONSE_FIELDS, SourceRecord, check_record_id,
                                   extract_query_response, id_problem, string_field)

Mode = Literal["pairwise", "score"]

GOLDEN_FIELDS = ("golden", "goldens")
CORRECTED_FIELD = "corrected"


@dataclass
class JudgeItem:
    """One input record ready for judging: ``record_id`` (its ``id`` or, when no record has
    one, its line number), the query, the golden response (None in score mode when absent),
    ``candidates`` (name -> text, in the order given) and its objectives."""

    record_id: Any
    line: int
    source: str
    question: str
    golden: str | None
    candidates: dict[str, str]
    objectives: list[Objective]


def load_judge_items(records: Iterable[SourceRecord], objective_set: ObjectiveSet,
                     objectives: list[Objective] | None, mode: Mode = "pairwise",
                     golden_field: str | None = None, candidate_fields: list[str] | None = None,
                     query_field: str | None = None, id_field: str = "id",
                     failed: list[SourceRecord] | None = None) -> list[JudgeItem]:
    """Read and check every record before any judge call.

    Query: ``query_field`` or the first of :data:`~metaalign_cli.records.QUERY_FIELDS` (or an
    OpenAI ``messages`` history). Golden: ``golden_field`` or ``golden``/``goldens`` (required
    in pairwise mode). Candidates: ``candidate_fields``, default the original response (first
    of :data:`~metaalign_cli.records.RESPONSE_FIELDS`, or the last assistant turn of
    ``messages``) and ``corrected``. Objectives: ``objectives``, else the record's own
    ``objectives`` or ``metaalign.objectives`` (what ``correct`` wrote).

    Records are aligned by ``id_field``: when any record has one, every record must, and ids
    must be unique; when none has one, the line number is the id. Raises InputError naming
    source, line and field for any bad record (unparsable line, missing/duplicate id,
    missing or non-string field, unknown objective). Empty candidates and goldens are kept (a
    weak response can be empty; the paper's samples hold a few empty goldens).

    A record that ``correct --on-error keep`` kept as failed (an ``error`` field and a
    ``metaalign`` object, no ``corrected`` field) has nothing to judge: it is left out and
    appended to ``failed`` when that list is given (else it is an error like any record
    missing its candidate).
    """
    recs = list(records)
    for r in recs:
        if r.error is not None:
            raise r.error
    kept_failed = [r for r in recs if _kept_as_failed(r, candidate_fields)] if failed is not None else []
    left_out = {id(r) for r in kept_failed}
    judged = [r for r in recs if id(r) not in left_out]
    for r in judged:
        check_record_id(r, id_field)
    bad = id_problem(judged, id_field)
    if bad is not None:
        raise InputError(bad[1], bad[0].source, bad[0].line, id_field)
    has_ids = any(r.data.get(id_field) not in (None, "") for r in judged)
    items: list[JudgeItem] = []
    names: list[str] | None = list(candidate_fields) if candidate_fields else None
    if kept_failed:
        failed.extend(kept_failed)
    for r in judged:
        d = r.data
        rid = check_record_id(r, id_field) if has_ids else r.line

        messages_text = None
        if query_field is None and not any(f in d for f in QUERY_FIELDS) and "messages" in d:
            question, last = extract_query_response(r)
            messages_text = last
        else:
            qf = query_field or next((f for f in QUERY_FIELDS if f in d), None)
            if qf is None or qf not in d:
                raise InputError("missing query", r.source, r.line, qf or "/".join(QUERY_FIELDS))
            question = string_field(r, qf, allow_empty=False)

        gf = golden_field or next((f for f in GOLDEN_FIELDS if f in d), None)
        golden = None
        if gf is not None and gf in d:
            golden = string_field(r, gf, allow_empty=True)  # the reference data has a few empty goldens
        elif mode == "pairwise":
            raise InputError("missing golden response", r.source, r.line, gf or "/".join(GOLDEN_FIELDS))

        if names is None:
            orig = next((f for f in RESPONSE_FIELDS if f in d), None)
            if orig is None and messages_text is None:
                raise InputError("missing original response", r.source, r.line, "/".join(RESPONSE_FIELDS))
            names = [orig or "response", CORRECTED_FIELD]
        cands: dict[str, str] = {}
        missing = []  # every missing piece of this record in one error, not one per run
        for n in names:
            if n not in d and n == "response" and messages_text is not None:
                cands[n] = messages_text
                continue
            if n not in d:
                hint = " (not corrected yet? name the fields to judge with --candidate-field)" \
                    if n == CORRECTED_FIELD and not candidate_fields else ""
                missing.append(f"field '{n}': missing candidate response{hint}")
                continue
            cands[n] = string_field(r, n, allow_empty=True)

        objs = objectives
        own = None
        if not objs:
            own = d.get("objectives")
            if own is None and isinstance(d.get("metaalign"), dict):
                own = d["metaalign"].get("objectives")
            if own is None:
                missing.append("field 'objectives': no objectives: pass --objectives or give the record an "
                               "'objectives' list")
        if missing:
            raise InputError("; ".join(missing), r.source, r.line)
        if not objs:
            try:
                objs = objective_set.resolve(own)
            except (UnknownNameError, ConfigError, ValueError) as e:
                raise InputError(str(e), r.source, r.line, "objectives") from None
        items.append(JudgeItem(rid, r.line, r.source, question, golden, cands, list(objs)))
    return items


def _kept_as_failed(r: SourceRecord, candidate_fields: list[str] | None) -> bool:
    """A record ``correct --on-error keep`` kept as failed (an ``error`` field and a
    ``metaalign`` object, no ``corrected`` field), when ``corrected`` is among the candidates."""
    d = r.data
    return isinstance(d.get("error"), str) and isinstance(d.get("metaalign"), dict) and CORRECTED_FIELD not in d \
        and (not candidate_fields or CORRECTED_FIELD in candidate_fields)
