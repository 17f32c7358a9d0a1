"""Running a judge: asking each unit's prompt(s) (cache first, re-asks after unparsable
answers), rows in plan order, a rate limit, and the dry run's cost estimate."""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from metaalign_cli import __version__
from metaalign_cli.backends.base import Backend, BackendError, Generation, GenerationSettings
from metaalign_cli.errors import InputError
from metaalign_cli.judging.cache import JudgeCache, cache_key
from metaalign_cli.judging.plan import Ask, JudgeOptions, JudgeUnit
from metaalign_cli.judging.verdicts import (PARSER_VERSION, combine_orders, parse_score,
                                            parse_verdict, verdict_outcome)


class RateLimiter:
    """At most ``rpm`` call starts per minute across threads (evenly spaced); None: no cap."""

    def __init__(self, rpm: float | None):
        self.interval = 60.0 / rpm if rpm else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


@dataclass
class JudgeReport:
    """Counts of a run: ``units`` planned, ``resumed`` (already in the output), ``judged``
    now, ``calls`` made to the judge, ``cache_hits``, ``invalid`` units (of those judged now),
    ``call_failures`` (judge calls that failed after the client's retries), ``seconds``."""

    units: int = 0
    resumed: int = 0
    judged: int = 0
    calls: int = 0
    cache_hits: int = 0
    invalid: int = 0
    call_failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


def judge_info(backend: Backend, opts: JudgeOptions) -> dict:
    """What goes into every row: the judge's identity (backend, model, server, LoRA,
    re-quantization, dtype, device: :meth:`~metaalign_cli.backends.base.Backend.identity`,
    never secrets), template, prompt format, generation settings, seed, order policy, parser
    and metaalign version."""
    return {**backend.identity(),
            "template": opts.template.name, "template_source": opts.template.source,
            "prompt_format": opts.prompt_format or opts.template.prompt_format,
            "settings": opts.settings.to_dict(), "seed": opts.seed,
            "both_orders": opts.both_orders, "retries": opts.retries, "parser": PARSER_VERSION,
            "version": __version__}


def max_attempts(backend: Backend, opts: JudgeOptions) -> int:
    """Calls one prompt may take: 1 + ``opts.retries`` re-asks of an unparsable answer, or 1
    for a local backend decoding greedily (a re-ask would decode the very same answer)."""
    return 1 if opts.settings.greedy and backend.local else 1 + max(0, opts.retries)


def _ask_many(asks: list[Ask], backend: Backend, cache: JudgeCache | None, opts: JudgeOptions,
              limiter: RateLimiter, report: JudgeReport) -> list[dict]:
    """Ask several prompts at once: each from the cache when it holds a parsed answer, the rest
    in one ``backend.generate`` call (a batch for local backends and vLLM, that many requests in
    flight for servers), then the unparsable ones again, up to :func:`max_attempts` calls each.
    A failed call (after the client's own retries) is not asked again. Returns one dict per ask,
    in order: order, position, exact prompt, cache key, raw answer(s), parsed value, attempts,
    cached, latency_s (of the call it was in), tokens, error."""
    parse = parse_score if opts.mode == "score" else parse_verdict
    judge = backend.identity()
    outs: list[dict] = []
    pending: list[int] = []
    for i, ask in enumerate(asks):
        key = cache_key(judge, opts.settings, ask.prompt)
        out: dict = {"order": ask.order}
        if ask.candidate_position is not None:
            out["candidate_position"] = ask.candidate_position
        out.update({"prompt": ask.prompt.text, "system": ask.prompt.system, "chat": ask.prompt.chat,
                    "cache_key": key, "raw_answers": [], "attempts": 0, "cached": False, "latency_s": 0.0,
                    "prompt_tokens": None, "completion_tokens": None, "error": None})
        outs.append(out)
        hit = cache.get(key) if cache is not None else None
        p = parse(hit.answer) if hit is not None else None
        if p is not None and p.ok:
            report.cache_hits += 1
            out.update(raw_answer=hit.answer, raw_answers=[hit.answer], value=p.value, invalid_reason=None,
                       cached=True, prompt_tokens=hit.prompt_tokens, completion_tokens=hit.completion_tokens)
        else:
            out.update(value=None, invalid_reason="no answer")
            pending.append(i)
    for attempt in range(max_attempts(backend, opts)):
        if not pending:
            break
        # A re-ask varies only the seed (identical under greedy decoding, useful when sampling).
        settings = opts.settings if attempt == 0 else _with_seed(opts.settings, opts.settings.seed + attempt)
        for _ in pending:
            limiter.wait()
        t0 = time.perf_counter()
        gens = backend.generate([asks[i].prompt for i in pending], settings)
        latency = time.perf_counter() - t0
        report.calls += len(pending)
        again = []
        for i, g in zip(pending, gens):
            out = outs[i]
            out["attempts"] += 1
            out["latency_s"] = round(out["latency_s"] + latency, 4)
            if not isinstance(g, Generation) or not isinstance(g.text, str):
                err = "the judge returned no text" if isinstance(g, Generation) else g
                out["error"] = (str(err) if isinstance(err, (BackendError, str)) else
                                f"{type(err).__name__}: {err}").splitlines()[0]
                out["invalid_reason"] = f"judge call failed: {out['error']}"
                report.call_failures += 1
                continue  # the client has already retried (backoff, Retry-After); re-asking is for bad answers
            out["raw_answers"].append(g.text)
            out["prompt_tokens"], out["completion_tokens"] = g.prompt_tokens, g.completion_tokens
            report.prompt_tokens += g.prompt_tokens or 0
            report.completion_tokens += g.completion_tokens or 0
            parsed = parse(g.text)
            out["value"], out["invalid_reason"] = parsed.value, parsed.reason
            if parsed.ok:
                if cache is not None:
                    cache.put(out["cache_key"], g.text, g.prompt_tokens, g.completion_tokens, backend.model_id)
            else:
                again.append(i)
        pending = again
    for out in outs:
        out.setdefault("raw_answer", out["raw_answers"][-1] if out["raw_answers"] else None)
    return outs


def _with_seed(s: GenerationSettings, seed: int) -> GenerationSettings:
    from dataclasses import replace

    return replace(s, seed=seed)


def unit_row(unit: JudgeUnit, asks: list[dict], opts: JudgeOptions, info: dict) -> dict:
    """The output row of one unit from its asks' results (see :func:`judge_unit`; blind
    verdicts too, :func:`metaalign_cli.judging.blind.blind_rows`): each ask a dict with
    ``value`` (the parsed verdict or score, None when invalid) and, pairwise, ``order`` and
    ``candidate_position``; the asks are changed in place into the row's ``judgments``."""
    row: dict = {"record_id": unit.item.record_id, "input_line": unit.item.line, "objective": unit.objective.name,
                 "candidate": unit.candidate, "mode": opts.mode, "texts_sha": unit.texts_sha}
    bad = next((a for a in asks if a["value"] is None), None)
    if opts.mode == "score":
        row["outcome"] = "invalid" if bad else "scored"
        row["score"] = None if bad else asks[0]["value"]
        for a in asks:
            a["score"] = a.pop("value")
    else:
        per = []
        for a in asks:
            a["verdict"] = a.pop("value")
            a["outcome"] = None if a["verdict"] is None else verdict_outcome(a["verdict"], a["candidate_position"])
            per.append(a["outcome"])
        if bad:
            row["outcome"] = "invalid"
        elif len(per) == 1:
            row["outcome"] = per[0]
        else:
            row["outcome"], row["consistent"] = combine_orders(per)
        if len(asks) == 1:
            row["verdict"] = asks[0]["verdict"]
            row["candidate_position"] = asks[0]["candidate_position"]
        elif "consistent" not in row:
            row["consistent"] = None
    row["invalid_reason"] = (f"{bad['order']}: {bad['invalid_reason']}" if len(asks) > 1 else bad["invalid_reason"]) if bad else None
    row["judgments"] = asks
    row["judge"] = info
    return row


def judge_unit(unit: JudgeUnit, backend: Backend, cache: JudgeCache | None, opts: JudgeOptions,
               info: dict, limiter: RateLimiter | None = None, report: JudgeReport | None = None) -> dict:
    """Judge one unit and return its output row (never raises on a judge failure: the row's
    ``outcome`` is then ``invalid`` with ``invalid_reason``).

    Row: ``record_id, input_line, objective, candidate, mode, outcome`` (pairwise: ``win``,
    ``tie``, ``loss`` or ``invalid``; score: ``scored`` or ``invalid``), ``verdict`` (pairwise,
    single order: 0/1/2), ``score`` (score mode), ``consistent`` (both orders),
    ``invalid_reason``, ``judgments`` (one per ask: order, candidate_position, exact prompt,
    raw answer(s), parsed value, attempts, cached, latency_s, tokens), and ``judge``.
    """
    asks = _ask_many(unit.asks, backend, cache, opts, limiter or RateLimiter(None), report or JudgeReport())
    return unit_row(unit, asks, opts, info)


def judge_units(units: list[JudgeUnit], backend: Backend, cache: JudgeCache | None, opts: JudgeOptions,
                emit: Callable[[dict], None], skip: set | None = None,
                on_progress: Callable[[int, JudgeReport], None] | None = None) -> JudgeReport:
    """Judge ``units`` and pass each row to ``emit`` in plan order, chunk by chunk.

    Units go to the judge in chunks of ``backend.chunk_size(opts.batch_size,
    opts.concurrency)`` (a batch for local backends and vLLM; ``opts.concurrency`` requests in flight for servers, through
    the backend's own pool): every ask of a chunk not answered by the cache is sent in one
    ``generate`` call, the unparsable ones re-asked in the next. A killed run loses only the
    chunk in flight, whose parsed answers are already cached. ``skip``: unit keys already done
    (resume). Returns a :class:`JudgeReport`. A failing judge call only makes its own unit
    ``invalid``.
    """
    report = JudgeReport(units=len(units))
    limiter = RateLimiter(opts.rpm)
    info = judge_info(backend, opts)
    todo = [u for u in units if not (skip and u.key in skip)]
    report.resumed = len(units) - len(todo)
    size = max(1, backend.chunk_size(opts.batch_size, opts.concurrency))
    t0 = time.perf_counter()
    try:
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            asks = _ask_many([a for u in chunk for a in u.asks], backend, cache, opts, limiter, report)
            k = 0
            for u in chunk:
                row = unit_row(u, asks[k:k + len(u.asks)], opts, info)
                k += len(u.asks)
                report.judged += 1
                report.invalid += row["outcome"] == "invalid"
                emit(row)
                if on_progress:
                    on_progress(report.judged, report)
    finally:
        report.seconds = time.perf_counter() - t0
    return report


def load_done_rows(path: str | os.PathLike) -> list[dict]:
    """Complete rows of an existing judge output file (for resume); a partial last line,
    left by a kill, is ignored. Raises InputError on a line that is not a judge row."""
    from metaalign_cli.records import output_records

    p = Path(path)
    if not p.exists():
        return []
    rows: list[dict] = []
    for n, row in output_records(p):
        if row is None:
            raise InputError("not a JSON judge row", str(p), n)
        if not isinstance(row, dict) or not {"record_id", "objective", "candidate", "outcome"} <= row.keys():
            raise InputError("not a judge row (needs record_id, objective, candidate, outcome)", str(p), n)
        rows.append(row)
    return rows


def dry_run(units: list[JudgeUnit], backend: Backend, cache: JudgeCache | None, opts: JudgeOptions,
            skip: set | None = None) -> dict:
    """What a run would cost, without calling the judge: ``units``, ``calls`` (asks not yet
    done), ``cached`` (asks the cache already answers), ``to_call`` (calls on first try),
    ``max_calls`` (if every answer needed all re-asks), ``input_tokens`` for ``to_call``
    (exact from the backend's tokenizer when local, else characters / 4) and ``token_count``
    (``tokenizer`` or ``chars/4``)."""
    asks = [a for u in units if not (skip and u.key in skip) for a in u.asks]
    cached = 0
    tokens = 0
    method = "tokenizer"
    judge = backend.identity()
    for a in asks:
        key = cache_key(judge, opts.settings, a.prompt)
        if cache is not None and cache.contains(key):
            cached += 1
            continue
        n = backend.count_prompt_tokens(a.prompt)
        if n is None:
            method = "chars/4"
            n = math.ceil((len(a.prompt.text) + len(a.prompt.system or "")) / 4)
        tokens += n
    to_call = len(asks) - cached
    return {"units": len(units), "resumed": len(units) - len({u.key for u in units if not (skip and u.key in skip)}),
            "calls": len(asks), "cached": cached, "to_call": to_call,
            "max_calls": to_call * max_attempts(backend, opts), "input_tokens": tokens,
            "max_new_tokens": opts.settings.max_new_tokens, "token_count": method}
