"""The dynamic multi-objective dataset (paper section 3.1, Algorithm 1) for ``build-data``.

Input: rated response pairs (q, y1, y2, R) read from the formats people hold
(:data:`INPUT_FORMATS`): ``ultrafeedback`` (openbmb/UltraFeedback rows), ``scored`` (per-response
scores), ``pairwise`` (chosen/rejected with per-objective labels or ``--objectives``) and
``hh-rlhf`` (Anthropic's raw transcripts). Every reader is a generator: one input row is in
memory at a time, so memory stays flat however large the input.

For each pair, :func:`build_dynamic_dataset` applies Algorithm 1: O> (objectives where y1 is
better), O< (y2 better), O= (tie), each shuffled with a seeded RNG, giving

- a preference item T(q, y2, O>, better) -> y1 when O> is non-empty (preference subset D_p),
- a preference item T(q, y1, O<, better) -> y2 when O< is non-empty (D_p),
- an equal-preference item T(q, y2, O=, equal) -> y1 when O= is non-empty (D_e),
- with probability ``warmup_ratio``, a warm-up copy of that equal item whose target is the
  response in the prompt, y2 (identity mapping, section 3.3 step 1).

No item ever has an empty objective list. An objective whose rating is unknown ("N/A",
missing, non-numeric) for either response is left out of that pair; it is not a tie.

Output directory layout (read by ``metaalign train``)::

    OUT/stats.json
    OUT/{train,validation[,test]}/{warmup,equal,preference}.jsonl
    OUT/{split}/{stage}.sharegpt.json      (only with ``--format sharegpt``, FastChat layout)

Every split directory holds all three stage files (possibly empty). Each JSONL row has these
fields, stable across versions:

- ``id`` (str): ``"<input file stem>:<line>[:<i>-<j>]:<kind>"``, kind one of ``pref-y1``,
  ``pref-y2``, ``equal``, ``warmup``; unique within one build of distinct input files.
- ``stage`` (str): ``warmup`` | ``equal`` | ``preference``; ``split`` (str): ``train`` |
  ``validation`` | ``test``.
- ``query`` (str): q, the query or the dialogue context (``"\\n\\nHuman: ...\\n\\nAssistant:"``).
- ``response`` (str): the response inside the prompt (y0, the one to correct).
- ``objectives`` (list[str]): objective names, in the shuffled order used in the prompt.
- ``target`` (str): the training target.
- ``prompt`` (str): T(q, response, objectives, variant), rendered by
  :meth:`metaalign_cli.templates.CorrectionTemplate.render` (the code ``correct`` uses).
- ``variant`` (str): ``better`` | ``equal``; ``template`` (str): the template name.
- ``source`` (dict): ``file``, ``line`` (1-based line; item number for ``.json`` arrays),
  ``format``, and when the row held several responses ``pair`` ([i, j], 0-based) and
  ``models`` (the responses' ``model`` fields, when present); ``row_id`` when the row had an id.

The split is decided per query (whitespace-normalised text) by a hash salted with
``split_seed``, so no query is in two splits and no query list is held in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from metaalign_cli.errors import ConfigError, InputError, UnknownNameError
from metaalign_cli.objectives import Objective, ObjectiveSet, render_objectives
from metaalign_cli.records import QUERY_FIELDS, READ_ERRORS, RESPONSE_FIELDS, read_csv, read_error, read_jsonl
from metaalign_cli.templates import CorrectionTemplate

INPUT_FORMATS = ("ultrafeedback", "scored", "pairwise", "hh-rlhf")
STAGES = ("warmup", "equal", "preference")
SPLITS = ("train", "validation", "test")

# Reasons a row (or one response inside a row) is skipped; the order is the report order.
BAD_RECORD_REASONS = ("invalid_json", "missing_field", "bad_value", "empty_response",
                      "identical_responses", "non_numeric_score", "unknown_objective")
# Reasons a response pair yields no item: a bad-record reason, or one of these.
PAIR_DROP_REASONS = BAD_RECORD_REASONS + ("no_comparable_objective", "excluded_query")

UNKNOWN_RATINGS = frozenset({"", "n/a", "na", "none", "null", "unknown", "-"})
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"

Relation = str  # ">" (y1 better), "<" (y2 better) or "=" (tie)


# --------------------------------------------------------------------------------------------
# Data types


@dataclass(frozen=True)
class RatedPair:
    """One (q_i, y_i1, y_i2, R_i) of Algorithm 1's input.

    ``relations``: (objective name, relation) in source order, relation ``">"`` when y1 is
    better on that objective, ``"<"`` when y2 is, ``"="`` on a tie; objectives unknown for
    either response are absent. ``pair_id`` prefixes item ids; ``source`` is copied to rows.
    """

    query: str
    y1: str
    y2: str
    relations: tuple[tuple[str, Relation], ...]
    pair_id: str
    source: dict = field(default_factory=dict, compare=False)


@dataclass
class DatasetItem:
    """One training item (T(q, y, O, t), target) of the dynamic multi-objective dataset.

    ``stage``: ``preference`` (D_p), ``equal`` (D_e) or ``warmup`` (a D_e item with target = y0).
    """

    id: str
    stage: str
    query: str
    response: str
    objectives: list[str]
    target: str
    prompt: str
    variant: str
    template: str
    source: dict

    def to_row(self, split: str) -> dict:
        """The JSONL row (field order fixed, see the module docstring)."""
        return {"id": self.id, "stage": self.stage, "split": split, "query": self.query,
                "response": self.response, "objectives": self.objectives, "target": self.target,
                "prompt": self.prompt, "variant": self.variant, "template": self.template,
                "source": self.source}


@dataclass
class BuildStats:
    """Counts of one build; ``to_dict()`` is ``stats.json``.

    ``bad_records[reason]``: input rows, or single responses inside a multi-response row,
    skipped for that reason (first problem only); ``examples[reason]``: the first message.
    ``dropped_pairs[reason]``: response pairs that gave no item. ``unknown_ratings``: ratings
    that were "N/A"/missing (objective left out of the pairs of that response).
    ``items[split][stage]``, ``objective_frequency[stage][objective]`` (items listing it),
    ``token_lengths[stage][prompt|target|total]`` percentiles when a tokenizer was given.

    With ``strict`` set, :meth:`problem` raises the InputError instead of counting it.
    """

    strict: bool = False
    files: list[dict] = field(default_factory=list)
    rows: int = 0
    pairs: int = 0
    pairs_used: int = 0
    unknown_ratings: int = 0
    excluded_rows: int = 0
    excluded_queries: set = field(default_factory=set)
    bad_records: Counter = field(default_factory=Counter)
    dropped_pairs: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    items: dict = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    queries: Counter = field(default_factory=Counter)
    objective_frequency: dict = field(default_factory=lambda: {s: Counter() for s in STAGES})
    token_lengths: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def problem(self, reason: str, error: InputError, pairs_lost: int = 0) -> None:
        """Record a bad record (``reason`` in :data:`BAD_RECORD_REASONS`) that cost
        ``pairs_lost`` pairs. Raises ``error`` when strict."""
        if self.strict:
            raise error
        self.bad_records[reason] += 1
        self.examples.setdefault(reason, str(error))
        if pairs_lost:
            self.dropped_pairs[reason] += pairs_lost

    def to_dict(self) -> dict:
        def ordered(counter: Counter, keys: Sequence[str]) -> dict:
            return {k: counter[k] for k in keys if counter[k]}

        return {
            "settings": self.settings,
            "inputs": self.files,
            "rows": self.rows,
            "pairs": self.pairs,
            "pairs_used": self.pairs_used,
            "items": {sp: {st: self.items[sp][st] for st in STAGES} for sp in SPLITS
                      if sp in self.settings.get("splits", SPLITS)},
            "items_total": {st: sum(self.items[sp][st] for sp in SPLITS) for st in STAGES},
            "queries": {sp: self.queries[sp] for sp in SPLITS if sp in self.settings.get("splits", SPLITS)},
            "objective_frequency": {st: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
                                    for st, c in self.objective_frequency.items()},
            "bad_records": ordered(self.bad_records, BAD_RECORD_REASONS),
            "bad_record_examples": {k: self.examples[k] for k in BAD_RECORD_REASONS if k in self.examples},
            "dropped_pairs": ordered(self.dropped_pairs, PAIR_DROP_REASONS),
            "unknown_ratings": self.unknown_ratings,
            "excluded": {"rows": self.excluded_rows, "queries": len(self.excluded_queries)},
            "token_lengths": self.token_lengths,
        }


@dataclass
class ReadOptions:
    """How rows become rated pairs.

    ``objective_set``: known objectives (unknown names raise UnknownNameError, as in
    ``correct``); ``objectives``: for ``pairwise``/``hh-rlhf`` rows without labels, the
    objectives the chosen response wins on; for ``ultrafeedback``/``scored``, when given, only
    these are used. ``objective_map``: source aspect/score name -> objective name.
    ``tie_margin``: |s1 - s2| <= margin counts as a tie. ``exclude``: normalised queries to keep
    out (:func:`normalize_query`). ``limit``: rows read per file (None: all).
    """

    objective_set: ObjectiveSet
    objectives: list[Objective] | None = None
    objective_map: dict[str, str] = field(default_factory=dict)
    tie_margin: float = 0.0
    exclude: frozenset[str] = frozenset()
    limit: int | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def objective_name(self, aspect: str, source: str | None = None, line: int | None = None) -> str:
        """Canonical objective name of a source aspect (after ``objective_map``). Raises
        UnknownNameError naming the aspect and, when given, the file and line."""
        name = self._cache.get(aspect)
        if name is not None:
            return name
        mapped = self.objective_map.get(aspect, aspect)
        try:
            name = self.objective_set.get(mapped).name
        except UnknownNameError as e:
            at = f"{source}:{line}: " if source else ""
            raise UnknownNameError(f"{at}{e} (map it with --objective-map {aspect}=OBJECTIVE)") from None
        self._cache[aspect] = name
        return name

    def wanted(self, name: str) -> bool:
        return self.objectives is None or any(o.name == name for o in self.objectives)


# --------------------------------------------------------------------------------------------
# Algorithm 1


def pair_rng(seed: int, pair: RatedPair) -> random.Random:
    """The RNG of one pair: seeded by ``seed`` and the pair's content (q, y1, y2), so the same
    input and seed always give the same shuffles whatever the file order."""
    h = hashlib.sha256("\x00".join((str(seed), pair.query, pair.y1, pair.y2)).encode("utf-8",
                                                                                        "surrogatepass"))
    return random.Random(h.digest())


def build_dynamic_dataset(pairs: Iterable[RatedPair], objective_set: ObjectiveSet,
                          template: CorrectionTemplate, seed: int = 0,
                          warmup_ratio: float = 0.1) -> Iterator[DatasetItem]:
    """Algorithm 1 (paper section 3.1) plus the warm-up sample (section 3.3 step 1).

    For each pair: O> / O< / O= from its relations, each shuffled with :func:`pair_rng`
    (lines 14, 19, 24); yields, in this order, the y1-preferred item T(q, y2, O>, better) -> y1
    (line 16), the y2-preferred item T(q, y1, O<, better) -> y2 (line 21), the equal item
    T(q, y2, O=, equal) -> y1 (line 26) and, with probability ``warmup_ratio`` (drawn from the
    same RNG), its warm-up copy with target y2. Empty subsets give no item.

    Raises UnknownNameError for an objective name ``objective_set`` does not know, ValueError
    for ``warmup_ratio`` outside [0, 1].
    """
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], not {warmup_ratio}")
    objs: dict[str, Objective] = {}

    def objective(name: str) -> Objective:
        if name not in objs:
            objs[name] = objective_set.get(name)
        return objs[name]

    tname = template.name
    aspects_text: dict[tuple[str, ...], str] = {}  # {aspects} per objective order (bounded below)

    def aspects(names: list[str]) -> str:
        key = tuple(names)
        text = aspects_text.get(key)
        if text is None:
            text = render_objectives([objective(n) for n in names], tname)
            if len(aspects_text) < 4096:
                aspects_text[key] = text
        return text

    def item(p: RatedPair, kind: str, stage: str, y0: str, target: str, names: list[str],
             variant: str, prompt: str | None = None) -> DatasetItem:
        if prompt is None:
            prompt = template.render(p.query, y0, aspects(names), variant)
        return DatasetItem(f"{p.pair_id}:{kind}", stage, p.query, y0, list(names), target, prompt,
                           variant, tname, p.source)

    for p in pairs:
        better = [n for n, r in p.relations if r == ">"]
        worse = [n for n, r in p.relations if r == "<"]
        equal = [n for n, r in p.relations if r == "="]
        rng = pair_rng(seed, p)
        rng.shuffle(better)
        rng.shuffle(worse)
        rng.shuffle(equal)
        if better:
            yield item(p, "pref-y1", "preference", p.y2, p.y1, better, "better")
        if worse:
            yield item(p, "pref-y2", "preference", p.y1, p.y2, worse, "better")
        if equal:
            eq = item(p, "equal", "equal", p.y2, p.y1, equal, "equal")
            yield eq
            if rng.random() < warmup_ratio:
                yield item(p, "warmup", "warmup", p.y2, p.y2, equal, "equal", prompt=eq.prompt)


# --------------------------------------------------------------------------------------------
# Splits, queries, exclusion


def normalize_query(text: str) -> str:
    """Whitespace-collapsed text: the key for splits and ``--exclude-queries`` matching."""
    return " ".join(text.split())


def hash_query(query: str) -> int:
    """A 64-bit digest of the normalised query (for counting distinct queries)."""
    return int.from_bytes(hashlib.blake2b(normalize_query(query).encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big")


def split_for_query(query: str, validation_ratio: float, test_ratio: float = 0.0,
                    split_seed: int = 0) -> str:
    """``train``, ``validation`` or ``test`` for a query: u = sha256(seed, normalised query)
    as a number in [0, 1); u < test_ratio -> test, < test+validation -> validation, else train.
    Deterministic and per query, so no query is in two splits."""
    h = hashlib.sha256(f"{split_seed}\x00{normalize_query(query)}".encode("utf-8", "surrogatepass"))
    u = int.from_bytes(h.digest()[:8], "big") / 2.0 ** 64
    if u < test_ratio:
        return "test"
    if u < test_ratio + validation_ratio:
        return "validation"
    return "train"


def load_excluded_queries(paths: Iterable[str | os.PathLike], field_name: str = "query") -> frozenset[str]:
    """Normalised queries from the ``field_name`` column/field of CSV/JSONL files (e.g. the
    paper's test queries in ``metaaligner-samples/hh-rlhf/*.csv``); a path with ``*``/``?``
    that is not a file is a glob pattern.

    Raises InputError when a file is missing or a row lacks the field.
    """
    import glob

    out: set[str] = set()
    files: list[str] = []
    for path in map(str, paths):
        # A quoted pattern ('samples/*.csv') is expanded here; a plain path must exist.
        matched = sorted(glob.glob(path)) if any(c in path for c in "*?[") and not Path(path).exists() else [path]
        if not matched:
            raise InputError("no file matches this pattern", source=path)
        files += matched
    for path in files:
        for rec in _rows(path):
            if rec.error is not None:
                raise rec.error
            v = rec.data.get(field_name)
            if not isinstance(v, str):
                raise InputError(f"missing text field '{field_name}' in an --exclude-queries file",
                                 rec.source, rec.line, field_name)
            out.add(normalize_query(v))
    return frozenset(out)


# --------------------------------------------------------------------------------------------
# Reading rows


@dataclass
class _Row:
    source: str
    line: int
    data: dict | None
    error: InputError | None = None


def _rows(path: str | os.PathLike) -> Iterator[_Row]:
    """Rows of a .jsonl/.jsonl.gz/.csv file (streamed) or a .json array (loaded whole; its
    ``line`` is the item number). Parse errors become rows with ``error`` set."""
    p = str(path)
    low = p.lower()
    if low.endswith(".csv") or low.endswith(".csv.gz"):
        for r in read_csv(p):
            yield _Row(r.source, r.line, r.data, r.error)
        return
    if low.endswith(".json") or low.endswith(".json.gz"):
        yield from _json_array_rows(p)
        return
    for r in read_jsonl(p):
        yield _Row(r.source, r.line, r.data, r.error)


def _json_array_rows(path: str) -> Iterator[_Row]:
    if not Path(path).is_file():
        raise InputError("input file not found", source=path)
    opener = open
    if path.lower().endswith(".gz"):
        import gzip

        opener = gzip.open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})", source=path) from None
    except UnicodeDecodeError as e:
        raise InputError(f"invalid UTF-8 at byte {e.start}", source=path) from None
    except READ_ERRORS as e:
        raise read_error(path, e) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InputError(f"expected a JSON array of objects, got {type(data).__name__}", source=path)
    for i, d in enumerate(data, start=1):
        if isinstance(d, dict):
            yield _Row(path, i, d)
        else:
            yield _Row(path, i, None, InputError(f"expected a JSON object, got {type(d).__name__}",
                                                 source=path, line=i))


def guess_format(data: dict, source: str = "") -> str:
    """The input format of a row from its fields: ``completions`` -> ultrafeedback,
    ``responses`` -> scored, ``chosen``/``rejected`` with a query field -> pairwise, without ->
    hh-rlhf. Raises InputError when none fits."""
    if "completions" in data:
        return "ultrafeedback"
    if "responses" in data:
        return "scored"
    if "chosen" in data and "rejected" in data:
        return "pairwise" if any(f in data for f in QUERY_FIELDS) else "hh-rlhf"
    raise InputError(f"cannot guess the input format from the fields {sorted(data)[:8]}; "
                     f"use --format ({', '.join(INPUT_FORMATS)})", source=source)


def guess_file_format(path: str | os.PathLike) -> str | None:
    """The format of a file's first parsable row (:func:`guess_format`), None when it has none.
    Raises InputError (missing file, unguessable fields)."""
    for r in _rows(path):
        if r.data is not None:
            return guess_format(r.data, str(path))
    return None


def read_rated_pairs(paths: Sequence[str | os.PathLike], input_format: str | None, opts: ReadOptions,
                     stats: BuildStats, on_row: Callable[[int], None] | None = None) -> Iterator[RatedPair]:
    """Rated pairs from each file in turn (format given or guessed per file from its first
    parsable row). Bad rows go to ``stats.problem``; excluded queries to ``stats``.

    A row naming an objective that no objective file declares (after ``objective_map``) is a
    bad record, ``unknown_objective``, and gives no pair. Raises InputError (missing file,
    unguessable format, strict mode), UnknownNameError (strict mode).
    """
    if input_format is not None and input_format not in INPUT_FORMATS:
        raise ConfigError(f"unknown input format '{input_format}' (use {', '.join(INPUT_FORMATS)})")
    for path in paths:
        rows = _rows(path)
        if opts.limit is not None:
            rows = itertools.islice(rows, opts.limit)
        fmt = input_format
        if fmt is None:
            head: list[_Row] = []
            for r in rows:
                head.append(r)
                if r.data is not None:
                    fmt = guess_format(r.data, str(path))
                    break
            if fmt is None:
                fmt = "pairwise"  # no parsable row at all: every row is counted as invalid below
            rows = itertools.chain(head, rows)
        info = {"path": str(path), "format": fmt, "rows": 0}
        stats.files.append(info)
        reader = _READERS[fmt]
        default_objs = opts.objectives
        if fmt == "hh-rlhf" and default_objs is None:
            # Anthropic's helpful-base files rate helpfulness; everything else here, harmlessness.
            default_objs = [opts.objective_set.get("helpful" if "helpful" in Path(path).name else "harmless")]
        stem = Path(str(path)).name.split(".")[0]
        for r in rows:
            info["rows"] += 1
            stats.rows += 1
            if on_row is not None:
                on_row(stats.rows)
            if r.error is not None:
                stats.problem("invalid_json", r.error)
                continue
            try:
                pairs = list(reader(r, fmt, stem, opts, default_objs, stats))  # a row's pairs, all or none
            except UnknownNameError as e:
                # An objective no file declares: the whole row is a bad record (--strict: stop).
                stats.problem("unknown_objective", e)
                continue
            yield from pairs


def _err(r: _Row, message: str, field_name: str | None = None) -> InputError:
    return InputError(message, r.source, r.line, field_name)



def _check_text(r: _Row, d: dict, key: str, label: str, response: bool) -> tuple[str | None, str, InputError | None]:
    """(text, "", None) for a non-empty string field, else (None, reason, error)."""
    if key not in d or d[key] is None:
        return None, "missing_field", _err(r, "missing", label)
    v = d[key]
    if not isinstance(v, str):
        return None, "bad_value", _err(r, f"expected a string, got {type(v).__name__}", label)
    if not v.strip():
        return None, ("empty_response" if response else "missing_field"), _err(r, "empty text", label)
    return v, "", None


def _query(r: _Row, d: dict, stats: BuildStats, pairs_lost: int) -> str | None:
    key = next((f for f in QUERY_FIELDS if f in d), "query")
    q, reason, err = _check_text(r, d, key, key, response=False)
    if q is None:
        stats.pairs += pairs_lost
        stats.problem(reason, err, pairs_lost)
    return q


def _excluded(query: str, opts: ReadOptions, stats: BuildStats, pairs: int) -> bool:
    if not opts.exclude:
        return False
    q = normalize_query(query)
    if q in opts.exclude:
        stats.excluded_rows += 1
        stats.excluded_queries.add(q)
        stats.pairs += pairs
        stats.dropped_pairs["excluded_query"] += pairs
        return True
    return False


def parse_score(value) -> float | None | str:
    """A rating/score as float; None when unknown ("N/A", "", null); the string ``"bad"``
    when present but not a finite number (e.g. "high", true, a list)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bad"
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else "bad"
    if isinstance(value, str):
        s = value.strip()
        if s.lower() in UNKNOWN_RATINGS:
            return None
        try:
            f = float(s)
        except ValueError:
            return "bad"
        return f if math.isfinite(f) else "bad"
    return "bad"


def relation(s1: float, s2: float, tie_margin: float = 0.0) -> Relation:
    """``"="`` when |s1 - s2| <= tie_margin (plus float rounding), else ``">"`` if s1 > s2,
    else ``"<"`` (the r_ij of Algorithm 1 from two scores)."""
    d = s1 - s2
    if abs(d) <= tie_margin + 1e-9:
        return "="
    return ">" if d > 0 else "<"


@dataclass
class _Response:
    index: int
    text: str
    scores: dict[str, float]  # objective name -> score, in source order; unknown ones absent
    model: str | None


def _scores(r: _Row, c: dict, fmt: str, label: str, opts: ReadOptions, stats: BuildStats) -> dict[str, float]:
    """Known scores of one response by objective name. "N/A"/missing: unknown (counted in
    ``stats.unknown_ratings``); non-numeric: a ``non_numeric_score`` problem, also unknown."""
    key = "annotations" if fmt == "ultrafeedback" else "scores"
    raw = c.get(key)
    out: dict[str, float] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        stats.problem("bad_value", _err(r, "expected an object", f"{label}.{key}"))
        return out
    for aspect, v in raw.items():
        name = opts.objective_name(aspect, r.source, r.line)
        if not opts.wanted(name) or name in out:
            continue
        fld = f"{label}.{key}.{aspect}"
        if fmt == "ultrafeedback" and isinstance(v, dict):
            v = v.get("Rating")
            fld += ".Rating"
        s = parse_score(v)
        if s is None:
            stats.unknown_ratings += 1
        elif s == "bad":
            stats.problem("non_numeric_score", _err(r, f"not a number: {v!r}"[:120], fld))
        else:
            out[name] = s
    return out


def _read_multi(r: _Row, fmt: str, stem: str, opts: ReadOptions, default_objs, stats: BuildStats) -> Iterator[RatedPair]:
    """``ultrafeedback`` (``instruction``, ``completions[].response``,
    ``completions[].annotations.<aspect>.Rating``) and ``scored`` (``query``,
    ``responses[].text``, ``responses[].scores.<objective>``): every pair i < j."""
    d = r.data
    list_key = "completions" if fmt == "ultrafeedback" else "responses"
    items = d.get(list_key)
    if not isinstance(items, list):
        reason = "missing_field" if items is None else "bad_value"
        stats.problem(reason, _err(r, "missing" if items is None else "expected a list", list_key))
        return
    n = len(items)
    if n < 2:
        stats.problem("missing_field", _err(r, f"needs at least 2 responses to compare, found {n}", list_key))
        return
    all_pairs = n * (n - 1) // 2
    query = _query(r, d, stats, all_pairs)
    if query is None or _excluded(query, opts, stats, all_pairs):
        return
    usable: list[_Response] = []
    n_bad = 0
    for i, c in enumerate(items):
        label = f"{list_key}[{i}]"
        if not isinstance(c, dict):
            text, reason, err = None, "bad_value", _err(r, "expected an object", label)
        else:
            tkey = "response" if fmt == "ultrafeedback" else next(
                (k for k in ("text",) + RESPONSE_FIELDS if k in c), "text")
            text, reason, err = _check_text(r, c, tkey, f"{label}.{tkey}", response=True)
        if text is None:
            # This response's pairs not already charged to an earlier bad response.
            lost = n - 1 - n_bad
            n_bad += 1
            stats.pairs += lost
            stats.problem(reason, err, lost)
            continue
        scores = _scores(r, c, fmt, label, opts, stats)
        model = c.get("model") if isinstance(c.get("model"), str) else None
        usable.append(_Response(i, text, scores, model))
    for a, b in itertools.combinations(usable, 2):
        stats.pairs += 1
        if a.text.strip() == b.text.strip():
            stats.problem("identical_responses", _err(
                r, f"same text as {list_key}[{a.index}]", _resp_label(fmt, b.index)), 1)
            continue
        rel = tuple((name, relation(a.scores[name], b.scores[name], opts.tie_margin))
                    for name in a.scores if name in b.scores)
        if not rel:
            stats.dropped_pairs["no_comparable_objective"] += 1
            continue
        stats.pairs_used += 1
        src = {"file": r.source, "line": r.line, "format": fmt, "pair": [a.index, b.index]}
        if a.model is not None or b.model is not None:
            src["models"] = [a.model, b.model]
        if isinstance(d.get("id"), (str, int)):
            src["row_id"] = d["id"]
        yield RatedPair(query, a.text, b.text, rel, f"{stem}:{r.line}:{a.index}-{b.index}", src)


def _resp_label(fmt: str, i: int) -> str:
    return f"completions[{i}].response" if fmt == "ultrafeedback" else f"responses[{i}].text"


LABEL_RELATIONS = {"chosen": ">", "rejected": "<", "equal": "=", "tie": "=", "=": "="}


def _read_pairwise(r: _Row, fmt: str, stem: str, opts: ReadOptions, default_objs, stats: BuildStats) -> Iterator[RatedPair]:
    """``pairwise``: ``{query|prompt|..., chosen, rejected, labels?}``; y1 = chosen,
    y2 = rejected. ``labels`` maps objective -> ``chosen`` | ``rejected`` | ``equal``; without
    it, chosen is better on every objective of ``--objectives``."""
    d = r.data
    query = _query(r, d, stats, 1)
    if query is None or _excluded(query, opts, stats, 1):
        return
    texts = []
    for key in ("chosen", "rejected"):
        t, reason, err = _check_text(r, d, key, key, response=True)
        if t is None:
            stats.pairs += 1
            stats.problem(reason, err, 1)
            return
        texts.append(t)
    rel = _labels(r, d, opts, default_objs, stats)
    if rel is None:
        return
    yield from _one_pair(r, fmt, stem, query, texts[0], texts[1], rel, opts, stats, d)


def _labels(r: _Row, d: dict, opts: ReadOptions, default_objs, stats: BuildStats):
    labels = d.get("labels")
    if labels is None:
        if not default_objs:
            stats.pairs += 1
            stats.problem("missing_field", _err(r, "missing (or give --objectives)", "labels"), 1)
            return None
        return tuple((o.name, ">") for o in default_objs)
    if not isinstance(labels, dict):
        stats.pairs += 1
        stats.problem("bad_value", _err(r, "expected an object {objective: chosen|rejected|equal}", "labels"), 1)
        return None
    rel = []
    for aspect, v in labels.items():
        name = opts.objective_name(aspect, r.source, r.line)
        if not opts.wanted(name) or any(n == name for n, _ in rel):
            continue
        if v is None or (isinstance(v, str) and v.strip().lower() in UNKNOWN_RATINGS):
            stats.unknown_ratings += 1
            continue
        sym = LABEL_RELATIONS.get(v.strip().lower()) if isinstance(v, str) else None
        if sym is None:
            stats.pairs += 1
            stats.problem("bad_value", _err(r, f"expected chosen, rejected or equal, got {v!r}"[:120],
                                            f"labels.{aspect}"), 1)
            return None
        rel.append((name, sym))
    return tuple(rel)


def _one_pair(r: _Row, fmt: str, stem: str, query: str, y1: str, y2: str, rel, opts: ReadOptions,
              stats: BuildStats, d: dict) -> Iterator[RatedPair]:
    stats.pairs += 1
    if y1.strip() == y2.strip():
        stats.problem("identical_responses", _err(r, "same text as 'chosen'", "rejected"), 1)
        return
    if not rel:
        stats.dropped_pairs["no_comparable_objective"] += 1
        return
    stats.pairs_used += 1
    src = {"file": r.source, "line": r.line, "format": fmt}
    if isinstance(d.get("id"), (str, int)):
        src["row_id"] = d["id"]
    yield RatedPair(query, y1, y2, rel, f"{stem}:{r.line}", src)


def split_hh_transcripts(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(context, chosen reply, rejected reply) of two HH-RLHF transcripts: the context is their
    longest common prefix cut back to end with ``"\\n\\nAssistant:"`` (as the reference
    samples' queries do), the replies are the rest, stripped. None when there is no shared
    ``"\\n\\nAssistant:"`` boundary or the transcripts part before the final assistant turn."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(HH_ASSISTANT)
    a, b = chosen[end:], rejected[end:]
    if HH_HUMAN in a or HH_HUMAN in b:
        return None
    return chosen[:end], a.strip(), b.strip()


def _read_hh(r: _Row, fmt: str, stem: str, opts: ReadOptions, default_objs, stats: BuildStats) -> Iterator[RatedPair]:
    """``hh-rlhf``: Anthropic's ``{chosen, rejected}`` full transcripts; chosen is better on
    ``--objectives`` (default harmless; helpful for ``helpful-*`` files) unless ``labels``."""
    d = r.data
    texts = []
    for key in ("chosen", "rejected"):
        t, reason, err = _check_text(r, d, key, key, response=True)
        if t is None:
            stats.pairs += 1
            stats.problem(reason, err, 1)
            return
        texts.append(t)
    parts = split_hh_transcripts(*texts)
    if parts is None:
        stats.pairs += 1
        stats.problem("bad_value", _err(r, "the two transcripts share no dialogue prefix ending with "
                                           "'\\n\\nAssistant:'", "rejected"), 1)
        return
    context, y1, y2 = parts
    if _excluded(context, opts, stats, 1):
        return
    for key, t in (("chosen", y1), ("rejected", y2)):
        if not t:
            stats.pairs += 1
            stats.problem("empty_response", _err(r, "empty final assistant turn", key), 1)
            return
    rel = _labels(r, d, opts, default_objs, stats)
    if rel is None:
        return
    yield from _one_pair(r, fmt, stem, context, y1, y2, rel, opts, stats, d)


_READERS = {"ultrafeedback": _read_multi, "scored": _read_multi, "pairwise": _read_pairwise, "hh-rlhf": _read_hh}


# --------------------------------------------------------------------------------------------
# Writing


class DatasetWriter:
    """Writes ``OUT/{split}/{stage}.jsonl`` (all stages for every split in ``splits``, created
    even when empty) and, with ``sharegpt``, ``OUT/{split}/{stage}.sharegpt.json``: a JSON array
    of ``{"id", "conversations": [{"from": "human", "value": prompt}, {"from": "gpt",
    "value": target}]}`` (FastChat's layout), written as a stream."""

    def __init__(self, out_dir: str | os.PathLike, splits: Sequence[str], sharegpt: bool = False):
        from metaalign_cli.records import dumps

        self._dumps = dumps
        self.out = Path(out_dir)
        self.files: dict[tuple[str, str], object] = {}
        self.share: dict[tuple[str, str], list] = {}
        for sp in splits:
            (self.out / sp).mkdir(parents=True, exist_ok=True)
            for st in STAGES:
                self.files[(sp, st)] = open(self.out / sp / f"{st}.jsonl", "w", encoding="utf-8", newline="\n")
                if sharegpt:
                    fh = open(self.out / sp / f"{st}.sharegpt.json", "w", encoding="utf-8", newline="\n")
                    fh.write("[")
                    self.share[(sp, st)] = [fh, 0]
        self.paths = [self.out / sp / f"{st}.jsonl" for sp in splits for st in STAGES]

    def write(self, item: DatasetItem, split: str) -> None:
        self.files[(split, item.stage)].write(self._dumps(item.to_row(split)) + "\n")
        sh = self.share.get((split, item.stage))
        if sh is not None:
            conv = {"id": item.id, "conversations": [{"from": "human", "value": item.prompt},
                                                     {"from": "gpt", "value": item.target}]}
            sh[0].write(("\n" if sh[1] == 0 else ",\n") + self._dumps(conv))
            sh[1] += 1

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()
        for fh, n in self.share.values():
            fh.write("\n]\n" if n else "]\n")
            fh.close()


# --------------------------------------------------------------------------------------------
# Token lengths


def percentiles(values: Sequence[int], points: Sequence[int] = (50, 90, 95, 99, 100)) -> dict[str, int]:
    """Nearest-rank percentiles ``{"p50": .., ..., "max": ..}`` of integer lengths (tokens);
    {} for no values."""
    if not values:
        return {}
    v = sorted(values)
    out = {}
    for p in points:
        k = max(1, math.ceil(p / 100 * len(v)))
        out["max" if p == 100 else f"p{p}"] = v[k - 1]
    out["mean"] = round(sum(v) / len(v), 1)
    return out


def load_token_counter(tokenizer: str) -> Callable[[list[str]], list[int]]:
    """A function counting tokens of a batch of texts with a local tokenizer: a GGUF file
    (transformers ``gguf_file=``) or an HF tokenizer directory. Imports transformers lazily;
    never downloads. Raises ConfigError when it cannot load."""
    p = Path(tokenizer)
    if not p.exists():
        raise ConfigError(f"{tokenizer}: tokenizer not found (give a GGUF file or a local HF directory)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("--tokenizer needs transformers (pip install 'metaalign-cli[torch]')") from None
    try:
        if p.is_file():
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; report one line
        raise ConfigError(f"{tokenizer}: cannot load tokenizer: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def count(texts: list[str]) -> list[int]:
        enc = tok(texts, add_special_tokens=False)["input_ids"]
        return [len(e) for e in enc]

    return count


class _TokenStats:
    """Token lengths of prompts and targets per stage, counted in batches (4 bytes per item)."""

    def __init__(self, count: Callable[[list[str]], list[int]], batch: int = 256):
        self.count = count
        self.batch = batch
        self.pending: dict[str, list[DatasetItem]] = {s: [] for s in STAGES}
        self.prompt = {s: array("I") for s in STAGES}
        self.target = {s: array("I") for s in STAGES}

    def add(self, item: DatasetItem) -> None:
        buf = self.pending[item.stage]
        buf.append(item)
        if len(buf) >= self.batch:
            self._flush(item.stage)

    def _flush(self, stage: str) -> None:
        buf = self.pending[stage]
        if not buf:
            return
        self.prompt[stage].extend(self.count([i.prompt for i in buf]))
        self.target[stage].extend(self.count([i.target for i in buf]))
        buf.clear()

    def result(self) -> dict:
        out = {}
        for st in STAGES:
            self._flush(st)
            if not self.prompt[st]:
                continue
            total = [a + b for a, b in zip(self.prompt[st], self.target[st])]
            out[st] = {"prompt": percentiles(self.prompt[st]), "target": percentiles(self.target[st]),
                       "total": percentiles(total)}
        return out


# --------------------------------------------------------------------------------------------
# The whole build


@dataclass
class BuildOptions:
    """Everything ``build-data`` needs besides the inputs (one place, one default each).

    ``template``: correction template rendering T(q, y, O, t); ``seed``: objective shuffles
    and warm-up sample; ``split_seed``: the per-query split hash (kept apart from ``seed`` so
    another ``seed`` changes only order and warm-up); ``warmup_ratio``: share of equal items
    copied into the warm-up stage; ``validation_ratio``/``test_ratio``: shares of queries.
    """

    template: CorrectionTemplate
    read: ReadOptions
    input_format: str | None = None
    seed: int = 0
    split_seed: int = 0
    warmup_ratio: float = 0.1
    validation_ratio: float = 0.05
    test_ratio: float = 0.0
    sharegpt: bool = False
    strict: bool = False
    count_tokens: Callable[[list[str]], list[int]] | None = None

    def splits(self) -> tuple[str, ...]:
        return ("train", "validation", "test") if self.test_ratio > 0 else ("train", "validation")


def output_files(out_dir: str | os.PathLike) -> list[Path]:
    """Every file a build may write in ``out_dir`` (``stats.json`` and, per split and stage,
    ``.jsonl`` and ``.sharegpt.json``): what a new build replaces, and nothing else."""
    out = Path(out_dir)
    return [out / "stats.json"] + [out / sp / f"{st}{ext}" for sp in SPLITS for st in STAGES
                                   for ext in (".jsonl", ".sharegpt.json")]


def _install(work: Path, out: Path) -> None:
    """Replace the files of any earlier build in ``out`` by the finished build in ``work``."""
    for p in output_files(out):
        p.unlink(missing_ok=True)
    for sp in SPLITS:
        d = out / sp
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    for f in sorted(work.rglob("*")):
        if f.is_file():
            dst = out / f.relative_to(work)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dst)


def build_data(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, opts: BuildOptions,
               on_row: Callable[[int], None] | None = None, keep_empty: bool = True) -> BuildStats:
    """Read ``inputs``, build the dynamic multi-objective dataset (Algorithm 1 + warm-up),
    split by query and write ``out_dir`` (layout in the module docstring) and ``stats.json``.

    The build is written to a temporary directory inside ``out_dir`` and moved into place
    when done, replacing an earlier build's files (:func:`output_files`) and nothing else; a
    build that raises or is interrupted leaves ``out_dir`` as it was (and removes the
    directories it created). ``keep_empty=False``: a build with no item is not moved in.
    Memory: one input row at a time, plus 8 bytes per item for token lengths when counted.
    Raises InputError (strict mode, unreadable/unguessable input), UnknownNameError,
    ConfigError, ValueError (ratios out of range).
    """
    for name, v in (("warmup_ratio", opts.warmup_ratio), ("validation_ratio", opts.validation_ratio),
                    ("test_ratio", opts.test_ratio)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], not {v}")
    if opts.validation_ratio + opts.test_ratio > 1.0:
        raise ValueError("validation_ratio + test_ratio must be at most 1")
    splits = opts.splits()
    stats = BuildStats(strict=opts.strict)
    stats.settings = {
        "format": opts.input_format, "template": opts.template.name, "seed": opts.seed,
        "split_seed": opts.split_seed, "warmup_ratio": opts.warmup_ratio,
        "validation_ratio": opts.validation_ratio, "test_ratio": opts.test_ratio,
        "tie_margin": opts.read.tie_margin, "splits": list(splits),
        "objectives": [o.name for o in opts.read.objectives] if opts.read.objectives else None,
        "objective_map": dict(opts.read.objective_map),
    }
    tokens = _TokenStats(opts.count_tokens) if opts.count_tokens is not None else None
    out = Path(out_dir)
    made = [d for d in [out, *out.parents] if not d.exists()]  # directories this build creates
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=out))  # moved into place when done
    installed = False
    try:
        writer = DatasetWriter(work, splits, opts.sharegpt)
        seen_queries: set[int] = set()  # 8-byte digests: exact distinct-query counts, small memory
        last_query = split = None
        try:
            pairs = read_rated_pairs(inputs, opts.input_format, opts.read, stats, on_row)
            for item in build_dynamic_dataset(pairs, opts.read.objective_set, opts.template, opts.seed,
                                              opts.warmup_ratio):
                if item.query is not last_query:
                    split = split_for_query(item.query, opts.validation_ratio, opts.test_ratio, opts.split_seed)
                    key = hash_query(item.query)
                    if key not in seen_queries:
                        seen_queries.add(key)
                        stats.queries[split] += 1
                    last_query = item.query
                writer.write(item, split)
                stats.items[split][item.stage] += 1
                for n in item.objectives:
                    stats.objective_frequency[item.stage][n] += 1
                if tokens is not None:
                    tokens.add(item)
        finally:
            writer.close()
        if tokens is not None:
            stats.token_lengths = tokens.result()
        (work / "stats.json").write_text(json.dumps(stats.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        if keep_empty or any(sum(c.values()) for c in stats.items.values()):
            _install(work, out)
            installed = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not installed:  # failed, interrupted or empty: the directories it made go again
            for d in made:
                try:
                    d.rmdir()
                except OSError:
                    break  # not empty: it holds something that is not ours
    return stats
