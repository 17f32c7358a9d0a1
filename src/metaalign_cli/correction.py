"""The correction pipeline: records in, corrected records out, in order, nothing lost.

MetaAligner inference (paper section 3.4): for each record, render T(q, y, O, "better") with
the chosen template and objectives, let the corrector generate, and attach the text to the
record. Output is written record by record in input order; errors are handled per record
(``fail``/``skip``/``keep``); ``--resume`` skips what an output file already holds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Literal

from metaalign_cli import __version__
from metaalign_cli.backends.base import WEIGHT_OPTIONS, Backend, Generation, GenerationSettings, Prompt
from metaalign_cli.errors import InputError, MetaAlignError, UnknownNameError
from metaalign_cli.objectives import Objective, ObjectiveSet, render_objectives
from metaalign_cli.records import JsonlWriter, SourceRecord, extract_query_response, output_records
from metaalign_cli.templates import CorrectionTemplate

OnError = Literal["fail", "skip", "keep"]


class RecordFailed(MetaAlignError):
    """A record failed under ``on_error='fail'``; ``cause`` is the InputError or backend error.
    Everything before that record has been written."""

    def __init__(self, cause: Exception, is_input: bool):
        self.cause = cause
        self.is_input = is_input
        super().__init__(str(cause))


@dataclass
class CorrectionOptions:
    """How to correct. ``objectives``: the default objectives (a record's own ``objectives``
    list overrides them); ``prompt_format``: None uses the template's (raw or chat)."""

    template: CorrectionTemplate
    objective_set: ObjectiveSet
    objectives: list[Objective] | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    prompt_format: Literal["raw", "chat"] | None = None
    system: str | None = None
    query_field: str | None = None
    response_field: str | None = None
    output_field: str = "corrected"
    on_error: OnError = "fail"
    batch_size: int = 1


@dataclass
class CorrectionReport:
    """Counts of a run: ``written`` records (corrected or kept with ``error``), ``failed``
    (errors under skip/keep), ``resumed`` (skipped as already done), ``truncated`` (context
    cut from the start of the query), ``looped`` (stopped by the loop guard), ``empty``
    (corrected to an empty text: flagged ``"empty": true`` in the provenance), ``generated_tokens``, ``seconds``."""

    written: int = 0
    corrected: int = 0
    failed: int = 0
    resumed: int = 0
    truncated: int = 0
    looped: int = 0
    empty: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


@dataclass
class _Item:
    rec: SourceRecord
    prompt: Prompt | None = None
    objectives: list[str] = field(default_factory=list)
    truncated_chars: int = 0
    error: Exception | None = None


def record_objectives(rec: SourceRecord, opts: CorrectionOptions) -> list[Objective]:
    """The record's own ``objectives`` (list or comma string) if present, else the default.

    Raises InputError (field ``objectives``) for an unknown name or a bad value, or when
    neither the record nor the options give objectives.
    """
    own = rec.data.get("objectives") if rec.data else None
    if own is None:
        if not opts.objectives:
            raise InputError("no objectives: pass --objectives or give the record an 'objectives' list",
                             rec.source, rec.line, "objectives")
        return opts.objectives
    if isinstance(own, str):
        own = own.split(",")
    if not isinstance(own, list) or not all(isinstance(o, str) for o in own):
        raise InputError("expected a list of objective names", rec.source, rec.line, "objectives")
    try:
        return opts.objective_set.resolve(own)
    except (UnknownNameError, ValueError) as e:
        raise InputError(str(e), rec.source, rec.line, "objectives") from None


def build_prompt(question: str, answer: str, objectives: list[Objective], opts: CorrectionOptions) -> Prompt:
    """The corrector's input for one record: T(q, y, O, "better") (section 3.1), raw or in the
    model's chat template as the template (or ``opts.prompt_format``) says."""
    text = opts.template.render(question, answer, render_objectives(objectives, opts.template.name), "better")
    fmt = opts.prompt_format or opts.template.prompt_format
    return Prompt(text, chat=(fmt == "chat"), system=opts.system)


def fit_to_context(question: str, answer: str, objectives: list[Objective], opts: CorrectionOptions,
                   backend: Backend, budget: int | None) -> tuple[Prompt, int]:
    """Build the prompt; when it exceeds ``budget`` tokens, drop text from the start of the
    question (keeping the newest dialogue turns and the whole response).

    Returns (prompt, characters dropped). Raises InputError (field ``response``) when the
    response alone does not fit: nothing is cut from the response.
    """
    prompt = build_prompt(question, answer, objectives, opts)
    if budget is None:
        return prompt, 0
    n = backend.count_prompt_tokens(prompt)
    if n is None or n <= budget:
        return prompt, 0
    bare = build_prompt("", answer, objectives, opts)
    nb = backend.count_prompt_tokens(bare)
    if nb > budget:
        raise InputError(f"the response does not fit in the model's context ({nb} prompt tokens with an empty "
                         f"query > {budget} = context - max_new_tokens)", field="response")
    lo, hi = 1, len(question)  # smallest cut that fits; hi always fits
    while lo < hi:
        mid = (lo + hi) // 2
        if backend.count_prompt_tokens(build_prompt(question[mid:], answer, objectives, opts)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    cut = lo
    turn = question.find("\n\nHuman:", cut)
    if turn != -1:
        cut = turn  # start at a whole turn: keep the newest turns intact
    return build_prompt(question[cut:], answer, objectives, opts), cut


def effective_settings(settings: GenerationSettings, backend: Backend) -> GenerationSettings:
    """Cap ``max_new_tokens`` at half the model's context so a prompt always has room."""
    ctx = backend.context_length()
    if ctx and settings.max_new_tokens > ctx // 2:
        from dataclasses import replace

        return replace(settings, max_new_tokens=ctx // 2)
    return settings


def correct_records(records: Iterable[SourceRecord], backend: Backend, opts: CorrectionOptions,
                    writer: JsonlWriter, skip_keys: "Counter[str] | None" = None,
                    on_progress: Callable[[int, int], None] | None = None,
                    warn: Callable[[str], None] | None = None) -> CorrectionReport:
    """Correct every record and write it (plus ``opts.output_field`` and a ``metaalign``
    provenance object) to ``writer``, one line per input record, in input order.

    ``skip_keys``: how many records of each key (``id:..``/``line:..``) are already done
    (resume; see :func:`metaalign_cli.records.done_records`); consumed as records are skipped.
    ``on_progress(records, generated_tokens)`` after each written record; ``warn(msg)`` for
    repairs and per-record errors under skip/keep.
    Raises RecordFailed at the first failing record when ``opts.on_error == 'fail'``, after
    writing everything before it.
    """
    settings = effective_settings(opts.settings, backend)
    ctx = backend.context_length()
    budget = ctx - settings.max_new_tokens if ctx else None
    report = CorrectionReport()
    t0 = time.perf_counter()
    provenance_base = {**backend.info(), "template": opts.template.name,
                       "prompt_format": opts.prompt_format or opts.template.prompt_format,
                       "generation": settings.to_dict(), "version": __version__}
    warn = warn or (lambda m: None)
    chunk: list[_Item] = []
    # Enough records per call to keep the backend busy: a server's requests in flight, vLLM's
    # batch. Lines are still written in input order, each once its chunk is done.
    size = max(1, opts.batch_size, backend.chunk_size)

    def flush() -> None:
        todo = [it for it in chunk if it.error is None]
        gens = backend.generate([it.prompt for it in todo], settings) if todo else []
        by_id = {id(it): g for it, g in zip(todo, gens)}
        for it in chunk:
            g = by_id.get(id(it), it.error)
            if isinstance(g, Generation):
                _emit_ok(it, g)
            else:
                _emit_error(it, g)
        chunk.clear()

    replaced: set[str] = set()

    def _emit_ok(it: _Item, g: Generation) -> None:
        out = dict(it.rec.data)
        for f in (opts.output_field, "metaalign"):
            if f in out and f not in replaced:
                replaced.add(f)
                warn(f"{it.rec.source}:{it.rec.line}: the input already has a '{f}' field; the output replaces it "
                     "(choose another with --output-field)")
        if "error" in out and isinstance(out.get("metaalign"), dict):
            del out["error"]  # a failure recorded by an earlier `--on-error keep` run of ours, now fixed
        out[opts.output_field] = g.text.strip()
        prov = {**provenance_base, "objectives": it.objectives, "input_line": it.rec.line,
                "finish_reason": g.finish_reason}
        if it.truncated_chars:
            prov["truncated_query_chars"] = it.truncated_chars
        if not out[opts.output_field]:
            prov["empty"] = True  # the model generated nothing (or only whitespace)
            report.empty += 1
        out["metaalign"] = prov
        writer.write(out)
        report.written += 1
        report.corrected += 1
        report.looped += g.finish_reason == "loop"
        report.generated_tokens += g.completion_tokens or 0
        if on_progress:
            on_progress(report.written + report.failed, report.generated_tokens)

    def _emit_error(it: _Item, err: Exception) -> None:
        is_input = isinstance(err, InputError)
        if is_input and err.source is None:
            err.source, err.line = it.rec.source, it.rec.line
        msg = str(err) if is_input else f"{it.rec.source}:{it.rec.line}: generation failed: {err}"
        if opts.on_error == "fail":
            raise RecordFailed(InputError(msg) if not is_input else err, is_input)
        report.failed += 1
        report.errors.append(msg)
        warn(msg)
        if opts.on_error == "keep":
            out = dict(it.rec.data) if it.rec.data is not None else {}
            out["error"] = msg
            out["metaalign"] = {**provenance_base, "objectives": it.objectives, "input_line": it.rec.line}
            writer.write(out)
            report.written += 1
        if on_progress:
            on_progress(report.written + report.failed, report.generated_tokens)

    try:
        for rec in records:
            if skip_keys and skip_keys.get(rec.key, 0) > 0:
                skip_keys[rec.key] -= 1  # a count: records may repeat an id
                report.resumed += 1
                continue
            for w in rec.warnings:
                warn(w)
            it = _Item(rec)
            if rec.error is not None:
                it.error = rec.error
            else:
                try:
                    q, a = extract_query_response(rec, opts.query_field, opts.response_field)
                    objs = record_objectives(rec, opts)
                    it.objectives = [o.name for o in objs]
                    it.prompt, it.truncated_chars = fit_to_context(q, a, objs, opts, backend, budget)
                    if it.truncated_chars:
                        report.truncated += 1
                except InputError as e:
                    it.error = e
            chunk.append(it)
            if it.error is not None and opts.on_error == "fail":
                flush()  # writes what precedes, then raises on this record
            elif len(chunk) >= size:
                flush()
        flush()
    finally:
        report.seconds = time.perf_counter() - t0
    return report


def resume_mismatch(path: str | os.PathLike, backend: Backend, opts: CorrectionOptions) -> str | None:
    """Why the records already in ``path`` were corrected with other settings than ``opts``
    on ``backend`` (model, LoRA, re-quantization, template, prompt format, generation
    settings, or the objectives of a record that has no own list), or None when they match or
    the file holds none. `--resume` refuses to mix settings in one output file."""
    p = Path(path)
    if not p.is_file():
        return None
    settings = effective_settings(opts.settings, backend)
    info = backend.info()
    now = {"model": info.get("model"), "template": opts.template.name,
           "prompt_format": opts.prompt_format or opts.template.prompt_format, "generation": settings.to_dict()}
    flag = [o.name for o in opts.objectives] if opts.objectives else None
    checked_objectives = flag is None
    for _, rec in output_records(p):
        prov = rec.get("metaalign") if isinstance(rec, dict) else None
        if not isinstance(prov, dict):
            continue
        for k in WEIGHT_OPTIONS:  # absent means none, in old and new files alike
            if prov.get(k) != info.get(k):
                return f"{k} {prov.get(k)!r} there, {info.get(k)!r} now"
        for k, v in now.items():
            if k in prov and prov[k] != v:
                if isinstance(v, dict) and isinstance(prov[k], dict):
                    diff = [f"{sub} {prov[k].get(sub)!r} there, {v.get(sub)!r} now"
                            for sub in sorted(set(v) | set(prov[k])) if prov[k].get(sub) != v.get(sub)]
                    return f"{k}: " + "; ".join(diff)
                return f"{k} {prov[k]!r} there, {v!r} now"
        if not checked_objectives and "objectives" not in rec and "objectives" in prov:
            if prov["objectives"] != flag:
                return f"objectives {prov['objectives']!r} there, {flag!r} now"
            checked_objectives = True
        if checked_objectives:
            return None
    return None
