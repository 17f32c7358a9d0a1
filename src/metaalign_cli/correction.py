"""The correction pipeline: records in, corrected records out, in order, nothing lost.

MetaAligner inference (paper section 3.4): for each record, render T(q, y, O, "better") with
the chosen template and objectives, let the corrector generate, and attach the text to the
record. Output is written record by record in input order; errors are handled per record
(``fail``/``skip``/``keep``); ``--resume`` skips what an output file already holds.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Literal

from metaalign_cli import __version__
from metaalign_cli.backends.base import Backend, Generation, GenerationSettings, Prompt, trim_loop
from metaalign_cli.errors import ConfigError, InputError, MetaAlignError, UnknownNameError
from metaalign_cli.objectives import Objective, ObjectiveSet, render_objectives
from metaalign_cli.records import (DoneRecords, JsonlWriter, SourceRecord, check_record_id, extract_query_response,
                                   input_digest, output_records, text_sha)
from metaalign_cli.templates import CorrectionTemplate

if TYPE_CHECKING:
    from metaalign_cli.config import CorrectConfig

OnError = Literal["fail", "skip", "keep"]
MAX_NEW_TOKENS = 1024  # the paper's cap: the ceiling of `--max-new-tokens auto`


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
    list overrides them); ``prompt_format``: None uses the template's (raw or chat);
    ``on_loop``: ``trim`` cuts a generation the loop guard stopped to what it said before it
    repeated (:func:`~metaalign_cli.backends.base.trim_loop`), ``keep`` leaves it as cut."""

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
    concurrency: int = 1
    scale_to_response: bool = False
    on_loop: Literal["trim", "keep"] = "trim"


@dataclass
class CorrectionReport:
    """Counts of a run: ``written`` records (corrected or kept with ``error``), ``failed``
    (errors under skip/keep), ``resumed`` (skipped as already done), ``truncated`` (context
    cut from the start of the query), ``looped`` (stopped by the loop guard), ``capped``
    (stopped by ``max_new_tokens``: finish reason ``length``), ``empty``
    (corrected to an empty text: flagged ``"empty": true`` in the provenance),
    ``generated_tokens``, ``seconds``; ``trimmed``: loops cut back by ``--on-loop trim``;
    ``prompts``: prompts written by ``--dry-run``; ``unchanged``: corrections equal to the
    response (whitespace at the ends aside: an answer already good is kept); ``retried``: records an earlier
    ``--on-error keep`` run kept as failed, redone by ``--resume``; ``markers_cut``: corrections
    cut at the prompt's own field labels (:meth:`~metaalign_cli.templates.CorrectionTemplate.cut_markers`)."""

    written: int = 0
    corrected: int = 0
    unchanged: int = 0
    failed: int = 0
    resumed: int = 0
    truncated: int = 0
    looped: int = 0
    trimmed: int = 0
    capped: int = 0
    empty: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    retried: int = 0
    markers_cut: int = 0
    errors: list[str] = field(default_factory=list)
    model: str = ""
    prompts: int = 0

    @property
    def exit_code(self) -> int:
        """0 when every record was corrected, 1 when some failed."""
        return 1 if self.failed else 0

    def to_dict(self) -> dict:
        """The counts as JSON (what ``--summary`` would write), with records/s and tokens/s."""
        s = self.seconds
        return {"written": self.written, "corrected": self.corrected, "unchanged": self.unchanged, "failed": self.failed,
                "resumed": self.resumed, "retried": self.retried, "truncated": self.truncated,
                "looped": self.looped, "trimmed": self.trimmed, "capped": self.capped, "empty": self.empty,
                "markers_cut": self.markers_cut,
                "generated_tokens": self.generated_tokens,
                "seconds": round(s, 3), "records_per_s": round(self.written / s, 3) if s else None,
                "tokens_per_s": round(self.generated_tokens / s, 2) if s else None, "model": self.model}


@dataclass
class PreparedRecord:
    """One input record read and checked before any model loads: the query, the response to
    correct and the objectives (``error`` set instead when the record is bad); ``prompt`` is
    built once the backend's tokenizer can fit it to the context."""

    rec: SourceRecord
    question: str = ""
    answer: str = ""
    objectives: list[Objective] = field(default_factory=list)
    prompt: Prompt | None = None
    settings: GenerationSettings | None = None
    truncated_chars: int = 0
    error: Exception | None = None

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]


def record_objectives(rec: SourceRecord, opts: CorrectionOptions) -> list[Objective]:
    """The record's own ``objectives`` (list or comma string) if present, else the default.

    Raises InputError (field ``objectives``) for an unknown name, a bad value or an objective
    whose user file does not load, or when neither the record nor the options give objectives.
    """
    own = rec.data.get("objectives") if rec.data else None
    if own is None:
        if not opts.objectives:
            raise InputError("no objectives: pass --objectives or give the record an 'objectives' list",
                             rec.source, rec.line, "objectives")
        return opts.objectives
    try:
        return opts.objective_set.resolve(own)
    except (UnknownNameError, ConfigError, ValueError) as e:
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


def response_cap(response_tokens: int, ceiling: int) -> int:
    """The token cap of one correction with ``--max-new-tokens auto``: 64 + 1.5 x the
    response's tokens, at least 128, at most ``ceiling`` (the paper's 1,024). A corrector
    rewrites an answer at about its length; a cap far above it only gives a loop room to run."""
    return max(1, min(ceiling, max(128, 64 + (3 * response_tokens) // 2)))


def record_settings(it: "PreparedRecord", settings: GenerationSettings, backend: Backend,
                    opts: CorrectionOptions) -> GenerationSettings:
    """The generation settings of one record: ``settings``, with the response-scaled cap of
    :func:`response_cap` when ``opts.scale_to_response`` (the response counted by the
    backend's tokenizer, else as characters / 4)."""
    if not opts.scale_to_response:
        return settings
    from dataclasses import replace

    n = backend.count_prompt_tokens(Prompt(it.answer))
    n = n if n is not None else -(-len(it.answer) // 4)
    return replace(settings, max_new_tokens=response_cap(n, settings.max_new_tokens))


def effective_settings(settings: GenerationSettings, backend: Backend) -> GenerationSettings:
    """Cap ``max_new_tokens`` at half the model's context so a prompt always has room."""
    ctx = backend.context_length()
    if ctx and settings.max_new_tokens > ctx // 2:
        from dataclasses import replace

        return replace(settings, max_new_tokens=ctx // 2)
    return settings


def prepare_records(records: Iterable[SourceRecord], opts: CorrectionOptions,
                    skip_keys: "Counter[str] | None" = None,
                    done: "DoneRecords | None" = None) -> tuple[list[PreparedRecord], int]:
    """Read every record and check it (query, response, objectives), before any model loads.

    ``skip_keys``: how many records of each key are already done (``--resume``, see
    :func:`metaalign_cli.records.done_records`); those are left out, consumed as they are
    met. ``done`` (what :func:`~metaalign_cli.records.done_records` read; its keys are then
    the skip keys) also checks that each done row was made from this input's record
    (:func:`~metaalign_cli.records.input_digest`) and that the output holds no record the
    input lacks. Returns (the records to correct, in input order, each with ``error`` set when
    it is bad; how many were skipped as done). Memory: every record to correct is held.

    Raises InputError (with ``done``) naming the input line whose done row holds another
    record, or the output line of a record the input does not have: resuming from another
    input would mix two inputs' corrections in one file.
    """
    out: list[PreparedRecord] = []
    resumed = 0
    if done is not None:
        skip_keys = done.keys
    for rec in records:
        if skip_keys and skip_keys.get(rec.key, 0) > 0:
            rows = done.rows.get(rec.key, []) if done is not None else []
            i = len(rows) - skip_keys[rec.key]  # this record's done row: the first not yet met
            skip_keys[rec.key] -= 1  # a count: records may repeat an id
            if rec.data is not None and 0 <= i < len(rows) and rows[i][0] != input_digest(rec.data, opts.output_field):
                what = f"id {rec.data['id']!r}" if rec.key.startswith("id:") else f"line {rec.line}"
                raise InputError(f"--resume: output line {rows[i][1]} ({done.source}) holds another "
                                 f"record for {what}: the output was made from another input; use that input, "
                                 "or another output file", rec.source, rec.line)
            resumed += 1
            continue
        it = PreparedRecord(rec)
        if rec.error is not None:
            it.error = rec.error
        else:
            try:
                check_record_id(rec)
                it.question, it.answer = extract_query_response(rec, opts.query_field, opts.response_field)
            except InputError as e:
                it.error = e
            try:  # resolved even for a bad record, so a kept failure names what it asked for
                it.objectives = record_objectives(rec, opts)
            except InputError as e:
                it.error = it.error or e
        out.append(it)
    left = [k for k, n in (skip_keys or {}).items() if n > 0] if done is not None else []
    if left:
        n = sum(skip_keys[k] for k in left)
        rows = done.rows[left[0]]
        line = rows[len(rows) - skip_keys[left[0]]][1]
        raise InputError(f"--resume: the output holds {n} record(s) this input does not have (first at output line "
                         f"{line}): it was made from another input; use that input, or another output file",
                         source=done.source)
    return out, resumed


def template_sha(template: CorrectionTemplate) -> str:
    """Fingerprint of a correction template's text (its variants, format, system message,
    when not ``as-is`` how it frames a plain query, and its ``markers`` when it has some)."""
    framing = [template.plain_query] if template.plain_query != "as-is" else []
    markers = [list(template.markers)] if template.markers else []  # (they change what is written)
    return text_sha(json.dumps([template.better, template.equal, template.prompt_format, template.system]
                               + framing + markers))


def objectives_sha(objectives: list[Objective], opts: CorrectionOptions) -> str:
    """Fingerprint of the objective text a record's prompt carries (O of section 3.1, as the
    template renders it): an objective YAML edited between runs changes it."""
    return text_sha(render_objectives(objectives, opts.template.name))


def first_input_error(items: list[PreparedRecord]) -> InputError | None:
    """The first bad record's error (what ``--on-error fail`` stops on), or None."""
    return next((it.error for it in items if isinstance(it.error, InputError)), None)


def provenance(backend: Backend, opts: CorrectionOptions) -> dict:
    """The ``metaalign`` object every output record carries (before its per-record keys):
    backend info (model, load options, dtype/device where known; never secrets), template,
    prompt format, generation settings, version."""
    return {**backend.info(), **settings_provenance(backend, opts), "version": __version__}


def settings_provenance(backend: Backend, opts: CorrectionOptions) -> dict:
    """The part of :func:`provenance` that ``--resume`` compares: the backend's identity
    (model, server, LoRA, re-quantization, dtype...), template and its fingerprint, prompt
    format, generation settings."""
    return {**backend.identity(), **prompt_provenance(opts), "generation": generation_record(opts, backend)}


def prompt_provenance(opts: CorrectionOptions) -> dict:
    """The part of :func:`settings_provenance` known before a model loads: template, its
    fingerprint and the prompt format."""
    return {"template": opts.template.name, "template_sha": template_sha(opts.template),
            "prompt_format": opts.prompt_format or opts.template.prompt_format}


def generation_record(opts: CorrectionOptions, backend: Backend) -> dict:
    """The generation settings as recorded (and compared by ``--resume``): with a
    response-scaled cap, ``max_new_tokens`` is ``"auto"`` and ``max_new_tokens_ceiling`` the
    ceiling (each record's own cap is in its provenance)."""
    d = effective_settings(opts.settings, backend).to_dict()
    if opts.settings.loop_guard:  # what the output keeps of a loop (nothing to keep without the guard)
        d["on_loop"] = opts.on_loop
    if opts.scale_to_response:
        d["max_new_tokens_ceiling"] = d["max_new_tokens"]
        d["max_new_tokens"] = "auto"
    return d


def correct_prepared(items: list[PreparedRecord], backend: Backend, opts: CorrectionOptions,
                     writer: JsonlWriter, on_progress: Callable[[int, int], None] | None = None,
                     warn: Callable[[str], None] | None = None) -> CorrectionReport:
    """Correct prepared records and write each (plus ``opts.output_field`` and a ``metaalign``
    provenance object) to ``writer``, one flushed line per record, in input order.

    Records go to ``backend.generate`` in chunks of ``backend.chunk_size(batch_size,
    concurrency)`` (a batch for local backends, that many requests in flight for servers).
    ``on_progress(records, generated_tokens)`` after each written record; ``warn(msg)`` for
    repairs and per-record errors under skip/keep. Raises RecordFailed at the first failing
    record when ``opts.on_error == 'fail'``, after writing everything before it.
    """
    settings = effective_settings(opts.settings, backend)
    ctx = backend.context_length()
    report = CorrectionReport(model=backend.model_id)
    t0 = time.perf_counter()
    provenance_base = provenance(backend, opts)
    warn = warn or (lambda m: None)
    if settings.max_new_tokens < opts.settings.max_new_tokens and not opts.scale_to_response:
        warn(f"--max-new-tokens {opts.settings.max_new_tokens} is more than half the model's context "
             f"({ctx} tokens): using {settings.max_new_tokens}")
    chunk: list[PreparedRecord] = []
    size = backend.chunk_size(opts.batch_size, opts.concurrency)
    replaced: set[str] = set()

    def flush() -> None:
        todo = [it for it in chunk if it.error is None]  # each with its own settings (cap)
        by_id = {id(it): g for it, g in zip(todo, backend.generate_each([it.prompt for it in todo],
                                                                         [it.settings for it in todo]))}
        for it in chunk:
            g = by_id.get(id(it), it.error)
            if isinstance(g, Generation) and not isinstance(g.text, str):
                g = MetaAlignError("the model returned no text")
            if isinstance(g, Generation):
                emit_ok(it, g)
            else:
                emit_error(it, g)
        chunk.clear()

    def emit_ok(it: PreparedRecord, g: Generation) -> None:
        out = dict(it.rec.data)
        for f in (opts.output_field, "metaalign"):
            if f in out and f not in replaced:
                replaced.add(f)
                warn(f"{it.rec.source}:{it.rec.line}: the input already has a '{f}' field; the output replaces it "
                     "(choose another with --output-field)")
        if "error" in out and isinstance(out.get("metaalign"), dict):
            del out["error"]  # a failure recorded by an earlier `--on-error keep` run of ours, now fixed
        text = g.text.strip()
        trimmed = False
        if g.finish_reason == "loop" and opts.on_loop == "trim":
            cut = trim_loop(text)
            trimmed = cut != text
            text = cut
        unmarked = opts.template.cut_markers(text)
        marked = unmarked != text
        text = unmarked
        out[opts.output_field] = text
        prov = {**provenance_base, "objectives": it.objective_names,
                "objectives_sha": objectives_sha(it.objectives, opts), "input_line": it.rec.line,
                "finish_reason": g.finish_reason}
        if trimmed:
            prov["loop_trimmed"] = True
            report.trimmed += 1
        if marked:
            prov["markers_cut"] = True
            report.markers_cut += 1
        if opts.scale_to_response:
            prov["max_new_tokens"] = it.settings.max_new_tokens
        if not text:
            prov["empty"] = True
            report.empty += 1
        if it.truncated_chars:
            prov["truncated_query_chars"] = it.truncated_chars
        out["metaalign"] = prov
        writer.write(out)
        report.written += 1
        report.corrected += 1
        report.unchanged += text == it.answer.strip()
        report.looped += g.finish_reason == "loop"
        report.capped += g.finish_reason == "length"
        report.generated_tokens += g.completion_tokens or 0
        if on_progress:
            on_progress(report.written + report.failed, report.generated_tokens)

    def emit_error(it: PreparedRecord, err: Exception) -> None:
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
            out["metaalign"] = {**provenance_base, "objectives": it.objective_names, "input_line": it.rec.line}
            writer.write(out)
            report.written += 1
        if on_progress:
            on_progress(report.written + report.failed, report.generated_tokens)

    try:
        for it in items:
            for w in it.rec.warnings:
                warn(w)
            if it.error is None:
                try:
                    it.settings = record_settings(it, settings, backend, opts)
                    room = ctx - it.settings.max_new_tokens if ctx else None
                    it.prompt, it.truncated_chars = fit_to_context(it.question, it.answer, it.objectives, opts,
                                                                   backend, room)
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


def correct_records(records: Iterable[SourceRecord], backend: Backend, opts: CorrectionOptions,
                    writer: JsonlWriter, skip_keys: "Counter[str] | None" = None,
                    on_progress: Callable[[int, int], None] | None = None,
                    warn: Callable[[str], None] | None = None) -> CorrectionReport:
    """:func:`prepare_records` then :func:`correct_prepared` on a loaded backend (the
    library's one-call pipeline; ``skip_keys`` as in ``prepare_records``)."""
    items, resumed = prepare_records(records, opts, skip_keys)
    report = correct_prepared(items, backend, opts, writer, on_progress, warn)
    report.resumed = resumed
    return report


def resume_mismatch(path: str | os.PathLike, backend: Backend | None, opts: CorrectionOptions) -> str | None:
    """Why the records already in ``path`` were corrected with other settings than ``opts``
    on ``backend`` (:meth:`~metaalign_cli.backends.base.Backend.identity`: model, server, LoRA,
    re-quantization, dtype, device...; template, prompt format, generation settings; or the
    objectives of a record that has no own list), or None when they match or the file holds
    none (see :func:`metaalign_cli.resume.provenance_mismatch`). `--resume` refuses to mix
    settings in one output file. With ``backend`` None, only what is known before a model
    loads is compared (:func:`prompt_provenance` and the objectives), so a run can refuse
    before it loads one."""
    from metaalign_cli.resume import provenance_mismatch

    p = Path(path)
    if not p.is_file():
        return None
    now = settings_provenance(backend, opts) if backend is not None else prompt_provenance(opts)
    flag = [o.name for o in opts.objectives] if opts.objectives else None
    checked_objectives = flag is None
    checked_settings = False
    for _, rec in output_records(p):
        prov = rec.get("metaalign") if isinstance(rec, dict) else None
        if not isinstance(prov, dict):
            continue
        if not checked_settings:
            for key in ("template_sha", "weights_sha"):  # written before these were fingerprinted
                if key not in prov:
                    now.pop(key, None)
            gen = prov.get("generation")
            if isinstance(gen, dict) and gen.get("loop_guard") and "on_loop" not in gen:
                prov = {**prov, "generation": {**gen, "on_loop": "keep"}}  # written before --on-loop: kept loops
            why = provenance_mismatch(prov, now) or objective_text_mismatch(rec, prov, opts, path)
            if why:
                return why
            checked_settings = True
        if not checked_objectives and "objectives" not in rec and "objectives" in prov:
            if prov["objectives"] != flag:
                return f"objectives {prov['objectives']!r} there, {flag!r} now"
            checked_objectives = True
        if checked_objectives:
            return None
    return None


def _refuse_mixed(why: str | None, output: str) -> None:
    if why:
        raise InputError(f"--resume would mix settings in one file ({why}); rerun with the same settings, "
                         "or write to another file", source=output)


def objective_text_mismatch(rec: dict, prov: dict, opts: CorrectionOptions, path: str) -> str | None:
    """Whether a corrected record's objective text (``objectives_sha`` in its provenance) differs
    from what the same objectives render to now (an objective YAML edited between runs); None
    when they agree, the record names objectives no longer known, or the file is older."""
    if "objectives_sha" not in prov:
        return None
    try:
        objs = record_objectives(SourceRecord(str(path), 0, rec), opts) if "objectives" in rec else \
            opts.objective_set.resolve(prov.get("objectives") or [])
    except (InputError, UnknownNameError, ConfigError, ValueError):
        return None
    if objectives_sha(objs, opts) != prov["objectives_sha"]:
        return f"the text of objectives {[o.name for o in objs]!r} differs from what the file was corrected toward"
    return None


def correction_options(cfg: "CorrectConfig", objective_set: ObjectiveSet, template: CorrectionTemplate,
                       prompt_format: str | None, card_repeat_penalty: float | None = None) -> CorrectionOptions:
    """The pipeline options of a ``correct`` config (objectives resolved in ``objective_set``).
    ``--repeat-penalty`` when given, else ``card_repeat_penalty`` (the corrector card's), else 1.0."""
    auto = str(cfg.max_new_tokens).lower() == "auto"
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS if auto else int(cfg.max_new_tokens),
                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                  top_k=cfg.top_k, seed=cfg.seed,
                                  repeat_penalty=next(x for x in (cfg.repeat_penalty, card_repeat_penalty, 1.0)
                                                      if x is not None),
                                  loop_guard=cfg.loop_guard)
    objs = objective_set.resolve(cfg.objectives) if cfg.objectives else None
    return CorrectionOptions(template=template, objective_set=objective_set, objectives=objs, settings=settings,
                             prompt_format=prompt_format, system=cfg.system, query_field=cfg.query_field,
                             response_field=cfg.response_field, output_field=cfg.output_field,
                             on_error=cfg.on_error, batch_size=cfg.batch_size, concurrency=cfg.concurrency,
                             scale_to_response=auto, on_loop=cfg.on_loop)


def write_prompts(items: list[PreparedRecord], opts: CorrectionOptions, output: str, model: str,
                  warn: Callable[[str], None]) -> CorrectionReport:
    """``correct --dry-run``: one line per good record, ``{"id", "line", "prompt", "chat",
    "system", "objectives"}``, ``prompt`` being T(q, y, O, "better") as :func:`build_prompt`
    renders it for the model (before any cut to fit the context, which needs the model's
    tokenizer). Bad records are warned and counted as failed (under ``on_error='keep'`` also
    written as ``{"id", "line", "error"}``). Returns the report (``prompts`` = prompts written)."""
    report = CorrectionReport(model=model)
    with JsonlWriter(output) as writer:
        for it in items:
            for w in it.rec.warnings:  # repairs made when reading (lone surrogates), as a real run reports them
                warn(w)
            where = {"id": (it.rec.data or {}).get("id"), "line": it.rec.line}
            if it.error is not None:
                report.failed += 1
                report.errors.append(str(it.error))
                warn(str(it.error))
                if opts.on_error == "keep":
                    writer.write({**where, "error": str(it.error)})
                continue
            p = build_prompt(it.question, it.answer, it.objectives, opts)
            writer.write({**where, "prompt": p.text, "chat": p.chat, "system": p.system,
                          "objectives": it.objective_names})
            report.prompts += 1
    return report


def run_correct(cfg: "CorrectConfig", backend: Backend | None = None,
                on_progress: Callable[[int, int], None] | None = None,
                warn: Callable[[str], None] | None = None,
                on_model: Callable[[str], None] | None = None) -> CorrectionReport:
    """``metaalign correct`` as a library call: correct ``cfg.input`` into ``cfg.output``.

    In this order, so that nothing slow happens before a mistake is found: objectives,
    template and model are resolved (:func:`metaalign_cli.models.resolve_model`, nothing
    loaded), every input record is read and checked (under ``on_error='fail'`` the first bad
    record stops the run here, before the model loads), ``--resume``'s output file is read,
    then the model loads unless the input holds no record at all (``backend`` given: used as it
    is, e.g. a test's scripted backend) and its settings are checked against the file's, then
    records are corrected and written one line each. ``on_model(label)`` is told which model
    is used (not for an input with no record, where none is); ``warn(msg)`` gets repairs, load
    notes and per-record errors; ``on_progress(records, tokens)``.

    Returns the :class:`CorrectionReport` (``to_dict()`` is the summary, ``exit_code`` the
    process's). Raises RecordFailed (a bad record under ``fail``; everything before it
    written when it is a generation failure), ConfigError/UnknownNameError (bad objectives,
    template, model or options), InputError (unreadable input, a resume file of another run),
    MetaAlignError (a model that cannot load).
    """
    from metaalign_cli.models import resolve_config
    from metaalign_cli.objectives import load_objectives
    from metaalign_cli.records import (done_records, drop_lines, id_warning, messages_warning, read_records,
                                       restore_input_order)
    from metaalign_cli.templates import load_template

    warn = warn or (lambda m: None)
    objset = load_objectives(dirs=cfg.objectives_dir, files=cfg.objective_file)
    resolved = None if backend is not None else resolve_config(cfg, "corrector")
    tpl = load_template(cfg.template or (resolved.template if resolved else None) or "ultrafeedback",
                        kind="correction")
    opts = correction_options(cfg, objset, tpl, cfg.prompt_format or (resolved.prompt_format if resolved else None),
                              resolved.repeat_penalty if resolved else None)
    done = done_records(cfg.output, cfg.output_field) if cfg.resume else None
    items, resumed = prepare_records(read_records(cfg.input, cfg.input_format), opts, done=done)
    bad = first_input_error(items) if opts.on_error == "fail" else None
    if bad is not None:
        raise RecordFailed(bad, True)
    good = [it.rec for it in items if it.error is None]
    used = list({o.name: o for it in items if it.error is None for o in it.objectives}.values())
    for w in (id_warning(good), messages_warning(good, cfg.query_field, cfg.response_field),
              *objset.notes(used, tpl.name)):
        if w:
            warn(w)
    if not items and not resumed:
        warn(f"{'<stdin>' if cfg.input == '-' else cfg.input}: no records to correct")
    generates = bool(items) or cfg.resume  # else nothing to generate: no model loads
    if cfg.resume and not cfg.dry_run:  # refuse before a model loads where that can tell
        _refuse_mixed(resume_mismatch(cfg.output, None, opts), cfg.output)
    if resolved is not None and on_model and (generates or cfg.dry_run):
        on_model(resolved.label)
    if resolved is not None and resolved.hub_note and (generates or cfg.dry_run):
        warn(resolved.hub_note)
    if resolved is not None and (note := resolved.prompt_note(tpl.name, opts.prompt_format or tpl.prompt_format)):
        warn(note)
    label = resolved.label if resolved is not None else backend.model_id
    if cfg.dry_run:
        return write_prompts(items, opts, cfg.output, label, warn)
    if not generates:  # (the output file still exists)
        with JsonlWriter(cfg.output):
            pass
        return CorrectionReport(model=label)
    own = backend is None
    be = backend if backend is not None else resolved.load()
    try:
        for w in be.warnings:
            warn(w)
        if cfg.resume:
            _refuse_mixed(resume_mismatch(cfg.output, be, opts), cfg.output)
        if done is not None and done.failed_lines:  # kept failures are redone, never kept as results
            drop_lines(cfg.output, done.failed_lines)
        with JsonlWriter(cfg.output, append=cfg.resume) as writer:
            report = correct_prepared(items, be, opts, writer, on_progress, warn)
        if done is not None:  # (redone records, and any a failed earlier resume left, were appended)
            restore_input_order(cfg.output)
    finally:
        if own:
            be.close()
    report.resumed = resumed
    report.retried = done.kept_failures if done else 0
    return report
