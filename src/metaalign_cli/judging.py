"""Judging: win rates (paper Algorithm 2, Appendix C.1) and 0-10 scores (Appendix E.1)
that can be trusted and audited.

A *judgment unit* is one (record, objective, candidate). In ``pairwise`` mode the judge
compares the candidate with the record's golden response using prompt E(q, r1, r2, <r>);
the candidate's position (RESPONSE 1 or 2) is drawn from an RNG seeded by ``seed`` and a
hash of (record id, objective, candidate), so reruns are identical; ``both_orders`` asks
both positions and turns a disagreement into a tie. In ``score`` mode the judge gives the
candidate a 0-10 score with prompt S(q, a, <r>).

Every unit becomes one JSONL row holding the exact prompt(s), every raw answer, the parsed
verdict, the position order, latency, tokens and the judge's model/template/settings.
Answers are parsed strictly (:func:`parse_verdict`, :func:`parse_score`): only a bare
answer is read, so text inside a candidate response can never become the verdict. Parsed
answers are cached on disk (:class:`JudgeCache`, SQLite in WAL mode) by (backend, model,
settings, exact prompt); failures and unparsable answers are never cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sqlite3
import statistics
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, NamedTuple

from metaalign_cli import __version__
from metaalign_cli.backends.base import (WEIGHT_OPTIONS, Backend, BackendError, Generation, GenerationSettings,
                                         Prompt)
from metaalign_cli.errors import InputError, MetaAlignError, UnknownNameError
from metaalign_cli.objectives import Objective, ObjectiveSet
from metaalign_cli.records import (QUERY_FIELDS, RESPONSE_FIELDS, SourceRecord, extract_query_response,
                                   string_field)

Mode = Literal["pairwise", "score"]

GOLDEN_FIELDS = ("golden", "goldens")
CORRECTED_FIELD = "corrected"
PARSER_VERSION = "strict-1"
Z95 = 1.959963984540054  # two-sided 95% normal quantile

# --------------------------------------------------------------------------- parsing


class ParsedAnswer(NamedTuple):
    """A parsed judge answer: ``value`` (verdict 0/1/2 or score 0-10) or None with ``reason``."""

    value: int | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None


# The whole answer must be the verdict: a bare digit, or the declared "[[n]]" form;
# surrounding whitespace and one trailing period are tolerated, nothing else.
_VERDICT = re.compile(r"(?:([012])|\[\[([012])\]\])\.?")
_SCORE = re.compile(r"(?:(10|[0-9])|\[\[(10|[0-9])\]\])\.?")
_ECHO = re.compile(r"RESPONSE\s*\d?\s*:|QUERY\s*:|\| RESPONSE")  # the prompt's own markers
_MAX_ANSWER_CHARS = 12


def _parse_strict(text: str | None, pattern: re.Pattern, expected: str) -> ParsedAnswer:
    if text is None:
        return ParsedAnswer(None, "no answer")
    s = text.strip()
    if not s:
        return ParsedAnswer(None, "empty answer")
    if _ECHO.search(s):
        return ParsedAnswer(None, "answer echoes the prompt instead of giving " + expected)
    if len(s) > _MAX_ANSWER_CHARS:
        return ParsedAnswer(None, f"answer is {len(s)} characters of text, not {expected}")
    m = pattern.fullmatch(s)
    if m is None:
        return ParsedAnswer(None, f"answer {s!r} is not {expected}")
    return ParsedAnswer(int(m.group(1) or m.group(2)))


def parse_verdict(text: str | None) -> ParsedAnswer:
    """Read a pairwise verdict from a judge answer (prompt E, Appendix C.1: "You must only
    return 1, 2, or 0").

    Accepted, after stripping whitespace: exactly ``1``, ``2`` or ``0`` (or ``[[1]]``,
    ``[[2]]``, ``[[0]]``), optionally followed by one period. Everything else is rejected
    with a reason: empty answers, sentences ("Response 1 is better than Response 2"),
    ``10``, ``1.0``, and any answer that echoes prompt text such as ``RESPONSE 1:``. Because
    the whole answer must be the verdict, a "2" or "[[2]]" inside a candidate response the
    judge repeats can never be read as the verdict. Returns a :class:`ParsedAnswer`.
    """
    return _parse_strict(text, _VERDICT, "a bare verdict 1, 2 or 0")


def parse_score(text: str | None) -> ParsedAnswer:
    """Read a 0-10 integer score (prompt S, Appendix E.1: "You must only return the assigned
    score"). Accepted: a bare integer 0..10 (or ``[[n]]``), optionally with one trailing
    period; rejected with a reason: ``7.5``, ``11``, ``-1``, ``7/10``, ``07``, sentences,
    empty answers. Returns a :class:`ParsedAnswer`."""
    return _parse_strict(text, _SCORE, "a bare integer score 0-10")


# --------------------------------------------------------------------------- position


def candidate_position(seed: int, record_id: Any, objective: str, candidate: str) -> int:
    """The candidate's position (1 or 2) in prompt E for one unit: Algorithm 2's
    ``random_shuffle(g_i, R_i)``, drawn from an RNG seeded by ``seed`` and a SHA-256 of
    (record id, objective, candidate), so reruns and resumed runs draw the same positions
    whatever the order or concurrency of the calls."""
    h = hashlib.sha256(json.dumps([seed, record_id, objective, candidate], ensure_ascii=False).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big")).choice((1, 2))


def verdict_outcome(verdict: int, cand_position: int) -> str:
    """Algorithm 2 lines 9-11 from the candidate's side: ``win`` when the judge picked the
    candidate's position, ``tie`` for 0, else ``loss``."""
    if verdict == 0:
        return "tie"
    return "win" if verdict == cand_position else "loss"


def combine_orders(outcomes: list[str]) -> tuple[str, bool]:
    """The unit's outcome from the verdicts of both orders (FastChat's rule): the common
    outcome when they agree, else ``tie``. Returns (outcome, consistent)."""
    if all(o == outcomes[0] for o in outcomes):
        return outcomes[0], True
    return "tie", False


# --------------------------------------------------------------------------- cache


def default_cache_path() -> Path:
    """``$METAALIGN_HOME/cache/judge.sqlite`` when METAALIGN_HOME is set, else
    ``~/.cache/metaalign/judge.sqlite``."""
    from metaalign_cli.models import cache_dir

    return cache_dir() / "judge.sqlite"


def cache_key(backend: str, model: str, settings: GenerationSettings, prompt: Prompt) -> str:
    """SHA-256 (hex) of the judge backend, model (``Backend.weights_id``: with its LoRA and
    re-quantization), generation settings and the exact prompt
    (text, chat/raw, system message)."""
    payload = json.dumps({"backend": backend, "model": model, "settings": settings.to_dict(),
                          "prompt": prompt.text, "chat": prompt.chat, "system": prompt.system},
                         ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class CachedAnswer:
    answer: str
    prompt_tokens: int | None
    completion_tokens: int | None


class JudgeCache:
    """Parsed judge answers on disk: one SQLite table in WAL mode, so several runs (and the
    threads of one run) can read and write it at once. The first answer stored for a key is
    kept (``INSERT OR IGNORE``). ``hits``/``misses`` count look-ups. Only answers that
    parsed are ever stored (the caller's job, see :func:`judge_units`)."""

    def __init__(self, path: str | os.PathLike):
        """Open (creating when needed) the cache at ``path``. Raises MetaAlignError when the
        path is a directory, not an SQLite file, or cannot be created."""
        self.path = Path(path)
        if self.path.is_dir():
            raise MetaAlignError(f"{self.path}: --cache is a directory; give a file path")
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA busy_timeout=60000")
            self.conn.execute("CREATE TABLE IF NOT EXISTS judge_answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL, "
                              "prompt_tokens INTEGER, completion_tokens INTEGER, model TEXT, created REAL)")
        except (sqlite3.Error, OSError) as e:
            raise MetaAlignError(f"{self.path}: cannot use as the judge cache: {e}") from None
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            row = self.conn.execute("SELECT answer, prompt_tokens, completion_tokens FROM judge_answers WHERE key = ?",
                                    (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            return CachedAnswer(*row)

    def contains(self, key: str) -> bool:
        """Look-up that does not touch the hit counters (for ``--dry-run``)."""
        with self._lock:
            return self.conn.execute("SELECT 1 FROM judge_answers WHERE key = ?", (key,)).fetchone() is not None

    def put(self, key: str, answer: str, prompt_tokens: int | None, completion_tokens: int | None,
            model: str = "") -> None:
        with self._lock:
            self.conn.execute("INSERT OR IGNORE INTO judge_answers VALUES (?, ?, ?, ?, ?, ?)",
                              (key, answer, prompt_tokens, completion_tokens, model, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT COUNT(*) FROM judge_answers").fetchone()[0]

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- input


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
                     query_field: str | None = None, id_field: str = "id") -> list[JudgeItem]:
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
    """
    recs = list(records)
    for r in recs:
        if r.error is not None:
            raise r.error
    has_ids = any(id_field in r.data and r.data[id_field] not in (None, "") for r in recs)
    items: list[JudgeItem] = []
    seen: dict[str, int] = {}
    names: list[str] | None = list(candidate_fields) if candidate_fields else None
    for r in recs:
        d = r.data
        if has_ids:
            if d.get(id_field) in (None, ""):
                raise InputError("missing id (other records have one: alignment is by id)", r.source, r.line, id_field)
            rid = d[id_field]
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise InputError(f"expected a string or integer id, got {type(rid).__name__}", r.source, r.line, id_field)
        else:
            rid = r.line
        k = json.dumps(rid)
        if k in seen:
            raise InputError(f"duplicate id {rid!r} (first on line {seen[k]})", r.source, r.line, id_field)
        seen[k] = r.line

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
            if isinstance(own, str):
                own = own.split(",")
            if not isinstance(own, list) or not all(isinstance(o, str) for o in own):
                raise InputError("expected a list of objective names", r.source, r.line, "objectives")
            try:
                objs = objective_set.resolve(own)
            except (UnknownNameError, ValueError) as e:
                raise InputError(str(e), r.source, r.line, "objectives") from None
        items.append(JudgeItem(rid, r.line, r.source, question, golden, cands, list(objs)))
    return items


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Ask:
    """One prompt to the judge: ``order`` (``candidate-first``/``golden-first``, or
    ``single`` in score mode) and the candidate's position (1/2; None in score mode)."""

    order: str
    candidate_position: int | None
    prompt: Prompt


@dataclass
class JudgeUnit:
    """One (record, objective, candidate) to judge, with its one or two asks."""

    item: JudgeItem
    objective: Objective
    candidate: str
    asks: list[Ask]

    @property
    def key(self) -> tuple[str, str, str]:
        return unit_key(self.item.record_id, self.objective.name, self.candidate)


def unit_key(record_id: Any, objective: str, candidate: str) -> tuple[str, str, str]:
    """Identity of a unit in an output file (resume): (JSON of the record id, objective, candidate)."""
    return (json.dumps(record_id), objective, candidate)


def aspect_text(objective: Objective) -> str:
    """<r>, "the text description of the target objective" (Appendix C.1): ``Label: description``."""
    return objective.render(None)


@dataclass
class JudgeOptions:
    """How to judge. ``template``: a :class:`~metaalign_cli.templates.JudgeTemplate` of kind
    ``judge-pairwise`` (mode pairwise) or ``judge-score``; ``prompt_format`` overrides the
    template's (chat by default); ``retries``: re-asks after an unparsable answer (with the
    seed + 1, + 2, ...; none for a local backend decoding greedily, whose answer cannot change);
    ``concurrency``: units in flight (remote backends only; local ones run one at a time);
    ``rpm``: cap on judge calls per minute (None: no cap)."""

    template: Any
    mode: Mode = "pairwise"
    settings: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=16))
    seed: int = 0
    both_orders: bool = False
    retries: int = 2
    concurrency: int = 4
    rpm: float | None = None
    prompt_format: Literal["raw", "chat"] | None = None
    system: str | None = None


def plan_units(items: list[JudgeItem], opts: JudgeOptions) -> list[JudgeUnit]:
    """Every unit, record by record, objective by objective, candidate by candidate, with
    its exact prompt(s): E(q, r1, r2, <r>) with the golden and the candidate in their drawn
    (or both) positions, or S(q, a, <r>)."""
    chat = (opts.prompt_format or opts.template.prompt_format) == "chat"
    system = opts.system if opts.system is not None else opts.template.system
    units: list[JudgeUnit] = []
    for it in items:
        for obj in it.objectives:
            aspect = aspect_text(obj)
            for cname, ctext in it.candidates.items():
                asks: list[Ask] = []
                if opts.mode == "score":
                    text = opts.template.render(question=it.question, response=ctext, aspect=aspect)
                    asks.append(Ask("single", None, Prompt(text, chat=chat, system=system)))
                else:
                    positions = [1, 2] if opts.both_orders else [candidate_position(opts.seed, it.record_id, obj.name, cname)]
                    for pos in positions:
                        r1, r2 = (ctext, it.golden) if pos == 1 else (it.golden, ctext)
                        text = opts.template.render(question=it.question, response_1=r1, response_2=r2, aspect=aspect)
                        asks.append(Ask("candidate-first" if pos == 1 else "golden-first", pos,
                                        Prompt(text, chat=chat, system=system)))
                units.append(JudgeUnit(it, obj, cname, asks))
    return units


# --------------------------------------------------------------------------- running

LOCAL_BACKENDS = ("llama-cpp", "transformers")


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
    """What goes into every row: the judge backend and model, template, prompt format,
    generation settings, seed, order policy, parser and metaalign version."""
    info = backend.info()
    return {"backend": info.get("backend", backend.name), "model": backend.model_id,
            **({"base_url": info["base_url"]} if info.get("base_url") else {}),
            **{k: info[k] for k in WEIGHT_OPTIONS if info.get(k)},
            "template": opts.template.name, "template_source": opts.template.source,
            "prompt_format": opts.prompt_format or opts.template.prompt_format,
            "settings": opts.settings.to_dict(), "seed": opts.seed,
            "both_orders": opts.both_orders, "retries": opts.retries, "parser": PARSER_VERSION,
            "version": __version__}


def max_attempts(backend: Backend, opts: JudgeOptions) -> int:
    """Calls one prompt may take: 1 + ``opts.retries`` re-asks of an unparsable answer, or 1
    for a local backend decoding greedily (a re-ask would decode the very same answer)."""
    return 1 if opts.settings.greedy and backend.local else 1 + max(0, opts.retries)


def _ask_judge(ask: Ask, backend: Backend, cache: JudgeCache | None, opts: JudgeOptions,
               limiter: RateLimiter, report: JudgeReport, lock: threading.Lock) -> dict:
    """Ask one prompt: from the cache, else up to :func:`max_attempts` calls until the answer
    parses."""
    parse = parse_score if opts.mode == "score" else parse_verdict
    key = cache_key(backend.name, backend.weights_id, opts.settings, ask.prompt)
    out: dict = {"order": ask.order}
    if ask.candidate_position is not None:
        out["candidate_position"] = ask.candidate_position
    out.update({"prompt": ask.prompt.text, "system": ask.prompt.system, "chat": ask.prompt.chat,
                "cache_key": key})
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        p = parse(hit.answer)
        if p.ok:
            with lock:
                report.cache_hits += 1
            out.update(raw_answer=hit.answer, raw_answers=[hit.answer], value=p.value, invalid_reason=None,
                       attempts=0, cached=True, latency_s=0.0, prompt_tokens=hit.prompt_tokens,
                       completion_tokens=hit.completion_tokens, error=None)
            return out
    raws: list[str | None] = []
    latency = 0.0
    last: ParsedAnswer = ParsedAnswer(None, "no answer")
    error = None
    ptoks = ctoks = None
    attempts = 0
    for attempt in range(max_attempts(backend, opts)):
        # A re-ask varies only the seed (identical under greedy decoding, useful when sampling).
        settings = opts.settings if attempt == 0 else _with_seed(opts.settings, opts.settings.seed + attempt)
        limiter.wait()
        t0 = time.perf_counter()
        g = backend.generate([ask.prompt], settings)[0]
        latency += time.perf_counter() - t0
        attempts += 1
        with lock:
            report.calls += 1
        if not isinstance(g, Generation):
            error = (str(g) if isinstance(g, BackendError) else f"{type(g).__name__}: {g}").splitlines()[0]
            last = ParsedAnswer(None, f"judge call failed: {error}")
            with lock:
                report.call_failures += 1
            break  # the client has already retried (backoff, Retry-After); re-asking is for bad answers
        raws.append(g.text)
        ptoks, ctoks = g.prompt_tokens, g.completion_tokens
        with lock:
            report.prompt_tokens += g.prompt_tokens or 0
            report.completion_tokens += g.completion_tokens or 0
        last = parse(g.text)
        if last.ok:
            if cache is not None:
                cache.put(key, g.text, g.prompt_tokens, g.completion_tokens, backend.model_id)
            break
    out.update(raw_answer=raws[-1] if raws else None, raw_answers=raws, value=last.value,
               invalid_reason=last.reason, attempts=attempts, cached=False, latency_s=round(latency, 4),
               prompt_tokens=ptoks, completion_tokens=ctoks, error=error)
    return out


def _with_seed(s: GenerationSettings, seed: int) -> GenerationSettings:
    from dataclasses import replace

    return replace(s, seed=seed)


def judge_unit(unit: JudgeUnit, backend: Backend, cache: JudgeCache | None, opts: JudgeOptions,
               info: dict, limiter: RateLimiter | None = None, report: JudgeReport | None = None,
               lock: threading.Lock | None = None) -> dict:
    """Judge one unit and return its output row (never raises on a judge failure: the row's
    ``outcome`` is then ``invalid`` with ``invalid_reason``).

    Row: ``record_id, input_line, objective, candidate, mode, outcome`` (pairwise: ``win``,
    ``tie``, ``loss`` or ``invalid``; score: ``scored`` or ``invalid``), ``verdict`` (pairwise,
    single order: 0/1/2), ``score`` (score mode), ``consistent`` (both orders),
    ``invalid_reason``, ``judgments`` (one per ask: order, candidate_position, exact prompt,
    raw answer(s), parsed value, attempts, cached, latency_s, tokens), and ``judge``.
    """
    limiter = limiter or RateLimiter(None)
    report = report or JudgeReport()
    lock = lock or threading.Lock()
    asks = [_ask_judge(a, backend, cache, opts, limiter, report, lock) for a in unit.asks]
    row: dict = {"record_id": unit.item.record_id, "input_line": unit.item.line, "objective": unit.objective.name,
                 "candidate": unit.candidate, "mode": opts.mode}
    bad = next((a for a in asks if a["value"] is None), None)
    if opts.mode == "score":
        row["outcome"] = "invalid" if bad else "scored"
        row["score"] = None if bad else asks[0]["value"]
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
    if opts.mode == "score":
        for a in asks:
            a["score"] = a.pop("value")
    row["invalid_reason"] = (f"{bad['order']}: {bad['invalid_reason']}" if len(asks) > 1 else bad["invalid_reason"]) if bad else None
    row["judgments"] = asks
    row["judge"] = info
    return row


def judge_units(units: list[JudgeUnit], backend: Backend, cache: JudgeCache | None, opts: JudgeOptions,
                emit: Callable[[dict], None], skip: set | None = None,
                on_progress: Callable[[int, JudgeReport], None] | None = None) -> JudgeReport:
    """Judge ``units`` and pass each row to ``emit`` in plan order, as soon as it and every
    unit before it are done (so an output file grows record by record and a killed run loses
    only units in flight, whose parsed answers are already cached).

    ``skip``: unit keys already done (resume). ``opts.concurrency`` units run in flight for
    remote backends (``openai``, ``anthropic``); local backends run one call at a time.
    Returns a :class:`JudgeReport`. A failing judge call only makes its own unit ``invalid``.
    """
    report = JudgeReport(units=len(units))
    limiter = RateLimiter(opts.rpm)
    lock = threading.Lock()
    info = judge_info(backend, opts)
    todo = [u for u in units if not (skip and u.key in skip)]
    report.resumed = len(units) - len(todo)
    t0 = time.perf_counter()

    def run(u: JudgeUnit) -> dict:
        return judge_unit(u, backend, cache, opts, info, limiter, report, lock)

    def done(row: dict) -> None:
        report.judged += 1
        if row["outcome"] == "invalid":
            report.invalid += 1
        emit(row)
        if on_progress:
            on_progress(report.judged, report)

    # One engine in this process (llama-cpp, transformers, vllm) is never called from threads.
    workers = 1 if backend.local or backend.name in LOCAL_BACKENDS else max(1, opts.concurrency)
    try:
        if workers == 1:
            for u in todo:
                done(run(u))
        else:
            with ThreadPoolExecutor(workers) as ex:
                pending: deque = deque()
                for u in todo:
                    pending.append(ex.submit(run, u))
                    while len(pending) >= 2 * workers or (pending and pending[0].done()):
                        done(pending.popleft().result())
                while pending:
                    done(pending.popleft().result())
    finally:
        report.seconds = time.perf_counter() - t0
    return report


def load_done_rows(path: str | os.PathLike) -> list[dict]:
    """Complete rows of an existing judge output file (for resume); a partial last line,
    left by a kill, is ignored. Raises InputError on a line that is not a judge row."""
    p = Path(path)
    rows: list[dict] = []
    if not p.exists():
        return rows
    with open(p, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                break
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                raise InputError("not a JSON judge row", str(p), n) from None
            if not isinstance(row, dict) or not {"record_id", "objective", "candidate", "outcome"} <= row.keys():
                raise InputError("not a judge row (needs record_id, objective, candidate, outcome)", str(p), n)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- dry run


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
    for a in asks:
        key = cache_key(backend.name, backend.weights_id, opts.settings, a.prompt)
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


# --------------------------------------------------------------------------- statistics


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion k/n (95% by default); None when n == 0."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float, float] | None:
    """(mean, low, high): the normal-approximation 95% interval mean +- z * sd / sqrt(n)
    (sample sd with n - 1); None when n < 2."""
    n = len(values)
    if n < 2:
        return None
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(n)
    return (m, m - z * se, m + z * se)


_SCORE_OF = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def _r(x: float | None, nd: int = 4):
    return None if x is None else round(x, nd)


def win_rate_stats(rows: list[dict]) -> dict:
    """Win-rate statistics of one (objective, candidate) from its rows' ``outcome``s.

    ``n`` valid units (W + T + L), ``wins``/``ties``/``losses``/``invalid`` counts,
    ``win_rate`` = W / n as the paper reports it (Algorithm 2 lines 22-23) with a Wilson 95%
    interval ``win_rate_ci``, ``win_rate_ties_half`` = (W + 0.5 T) / n with a normal 95%
    interval on the per-unit score (1 / 0.5 / 0) ``win_rate_ties_half_ci``; and with both
    orders ``consistent``/``position_consistency`` (agreeing pairs / pairs with two valid
    verdicts). Invalid units are excluded from every rate.
    """
    w = sum(r["outcome"] == "win" for r in rows)
    t = sum(r["outcome"] == "tie" for r in rows)
    l = sum(r["outcome"] == "loss" for r in rows)
    inv = sum(r["outcome"] == "invalid" for r in rows)
    n = w + t + l
    out = {"n": n, "wins": w, "ties": t, "losses": l, "invalid": inv,
           "win_rate": _r(w / n) if n else None,
           "win_rate_ci": [_r(x) for x in wilson_interval(w, n)] if n else None,
           "win_rate_ties_half": _r((w + 0.5 * t) / n) if n else None}
    mi = mean_interval([_SCORE_OF[r["outcome"]] for r in rows if r["outcome"] in _SCORE_OF])
    out["win_rate_ties_half_ci"] = [_r(max(0.0, mi[1])), _r(min(1.0, mi[2]))] if mi else None
    pairs = [r for r in rows if "consistent" in r and r["outcome"] != "invalid"]
    if pairs:
        c = sum(bool(r["consistent"]) for r in pairs)
        out["consistent"] = c
        out["position_consistency"] = _r(c / len(pairs))
    return out


def paired_advantage(rows_c: list[dict], rows_b: list[dict], value: Callable[[dict], float | None],
                     bound: float = 1.0) -> dict:
    """The paper's advantage (Algorithm 2 line 24, Table 2 "+"): value(candidate) minus
    value(baseline), paired by record.

    ``value(row)`` gives a unit's number (win indicator, half-tie score, or 0-10 score) or
    None when invalid. ``advantage`` is mean(candidate) - mean(baseline), each over its own
    valid units (the paper's difference of win rates); the interval is
    ``advantage_paired`` +- 1.96 * sd(d) / sqrt(m) with d the per-record differences over
    the ``paired_n`` = m records where both are valid (equal to ``advantage`` when nothing is
    invalid), clipped to [-bound, bound] (1 for rates, 10 for scores).
    """
    vc = {json.dumps(r["record_id"]): value(r) for r in rows_c}
    vb = {json.dumps(r["record_id"]): value(r) for r in rows_b}
    c_vals = [v for v in vc.values() if v is not None]
    b_vals = [v for v in vb.values() if v is not None]
    adv = statistics.fmean(c_vals) - statistics.fmean(b_vals) if c_vals and b_vals else None
    diffs = [vc[k] - vb[k] for k in vc if k in vb and vc[k] is not None and vb[k] is not None]
    mi = mean_interval(diffs)
    return {"advantage": _r(adv), "advantage_paired": _r(statistics.fmean(diffs)) if diffs else None,
            "advantage_ci": [_r(max(-bound, mi[1])), _r(min(bound, mi[2]))] if mi else None,
            "paired_n": len(diffs)}


def score_stats(rows: list[dict]) -> dict:
    """Score statistics of one (objective, candidate) (Appendix E, Figure 2): ``n`` valid,
    ``invalid``, ``mean`` with a normal 95% interval ``mean_ci``, ``median``, ``sd`` and
    ``distribution`` (count of each score 0..10)."""
    s = [r["score"] for r in rows if r["outcome"] == "scored"]
    inv = sum(r["outcome"] == "invalid" for r in rows)
    mi = mean_interval([float(x) for x in s])
    return {"n": len(s), "invalid": inv, "mean": _r(statistics.fmean(s)) if s else None,
            "mean_ci": [_r(max(0.0, mi[1])), _r(min(10.0, mi[2]))] if mi else None,
            "median": statistics.median(s) if s else None,
            "sd": _r(statistics.stdev(s)) if len(s) > 1 else None,
            "distribution": {str(k): s.count(k) for k in range(11)}}


def summarize(rows: list[dict], mode: Mode, candidates: list[str] | None = None,
              objectives: list[str] | None = None) -> dict:
    """Per-objective, per-candidate statistics of a run's rows, plus totals.

    Pairwise: :func:`win_rate_stats` for each (objective, candidate) and, for every candidate
    after the first (the baseline, by default the original response), the paper's advantage
    over the baseline for wins/N (``advantage``...) and (W + 0.5 T)/N (``advantage_ties_half``...)
    from :func:`paired_advantage`. Score: :func:`score_stats` and ``mean_difference`` vs the
    baseline (paired the same way). Orders follow ``objectives``/``candidates`` (else first
    appearance). Returns ``{"mode", "units", "invalid", "invalid_rate", "baseline",
    "results": [{objective, candidate, ...}]}``.
    """
    objectives = list(objectives or dict.fromkeys(r["objective"] for r in rows))
    candidates = list(candidates or dict.fromkeys(r["candidate"] for r in rows))
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by.setdefault((r["objective"], r["candidate"]), []).append(r)
    base = candidates[0] if candidates else None
    results = []
    for o in objectives:
        for c in candidates:
            rs = by.get((o, c), [])
            if not rs:
                continue
            entry = {"objective": o, "candidate": c}
            if mode == "score":
                entry.update(score_stats(rs))
                if c != base and by.get((o, base)):
                    d = paired_advantage(rs, by[(o, base)], lambda r: float(r["score"]) if r["outcome"] == "scored" else None, 10.0)
                    entry.update({"mean_difference": d["advantage"], "mean_difference_paired": d["advantage_paired"],
                                  "mean_difference_ci": d["advantage_ci"], "paired_n": d["paired_n"]})
            else:
                entry.update(win_rate_stats(rs))
                if c != base and by.get((o, base)):
                    entry.update(paired_advantage(
                        rs, by[(o, base)], lambda r: None if r["outcome"] not in _SCORE_OF else float(r["outcome"] == "win")))
                    h = paired_advantage(rs, by[(o, base)], lambda r: _SCORE_OF.get(r["outcome"]))
                    entry.update({"advantage_ties_half": h["advantage"], "advantage_ties_half_paired": h["advantage_paired"],
                                  "advantage_ties_half_ci": h["advantage_ci"]})
            results.append(entry)
    inv = sum(r["outcome"] == "invalid" for r in rows)
    out = {"mode": mode, "units": len(rows), "invalid": inv,
           "invalid_rate": _r(inv / len(rows)) if rows else 0.0, "baseline": base, "results": results}
    reasons: dict[str, int] = {}
    for r in rows:
        if r["outcome"] == "invalid":
            reason = _reason_kind(r.get("invalid_reason") or "")
            reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        out["invalid_reasons"] = reasons
    pairs = [r for r in rows if "consistent" in r and r["outcome"] != "invalid"]
    if pairs:
        out["position_consistency"] = _r(sum(bool(r["consistent"]) for r in pairs) / len(pairs))
    return out


def _reason_kind(reason: str) -> str:
    """A short class of an invalid reason for the summary (the full text stays in the row)."""
    reason = reason.split(": ", 1)[1] if reason.startswith(("candidate-first: ", "golden-first: ")) else reason
    if reason.startswith("judge call failed"):
        return "judge call failed"
    if reason.startswith("answer '") or reason.startswith('answer "'):
        return "not a bare answer"
    if reason.startswith("answer is "):
        return "long text"
    return reason.split(" instead")[0]


# --------------------------------------------------------------------------- plot


def plot_scores(rows: list[dict], path: str | os.PathLike, objectives: list[str] | None = None,
                candidates: list[str] | None = None) -> Path:
    """Write a PNG with one histogram panel per objective (scores 0-10, one bar series per
    candidate), like the paper's Figure 2. Needs matplotlib (``pip install
    'metaalign-cli[plot]'``); raises MetaAlignError when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from metaalign_cli.errors import MetaAlignError

        raise MetaAlignError("--plot needs matplotlib: pip install 'metaalign-cli[plot]'") from None
    objectives = list(objectives or dict.fromkeys(r["objective"] for r in rows))
    candidates = list(candidates or dict.fromkeys(r["candidate"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(objectives)), figsize=(4 * max(1, len(objectives)), 3.2),
                             squeeze=False, sharey=True)
    width = 0.8 / max(1, len(candidates))
    for ax, o in zip(axes[0], objectives):
        for j, c in enumerate(candidates):
            s = [r["score"] for r in rows if r["objective"] == o and r["candidate"] == c and r["outcome"] == "scored"]
            counts = [s.count(k) / len(s) if s else 0 for k in range(11)]
            mean = f" (mean {statistics.fmean(s):.2f})" if s else ""
            ax.bar([k - 0.4 + width * (j + 0.5) for k in range(11)], counts, width=width, label=f"{c}{mean}")
        ax.set_title(o)
        ax.set_xlabel("score")
        ax.set_xticks(range(11))
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("fraction of responses")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
