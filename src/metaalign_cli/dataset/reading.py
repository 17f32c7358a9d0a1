"""Reading build-data input: rows of JSONL/CSV/JSON files as records, their text fields and
ratings, and the options that turn source aspects into objectives."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from metaalign_cli.dataset.algorithm import Relation
from metaalign_cli.dataset.stats import BuildStats
from metaalign_cli.errors import InputError, UnknownNameError
from metaalign_cli.objectives import Objective, ObjectiveSet
from metaalign_cli.records import (MAX_DEPTH, QUERY_FIELDS, READ_ERRORS, SourceRecord, depth_error, read_csv,
                                   read_error, read_jsonl, text_value, too_deep)

UNKNOWN_RATINGS = frozenset({"", "n/a", "na", "none", "null", "unknown", "-"})

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


def source_rows(path: str | os.PathLike) -> Iterator[SourceRecord]:
    """Rows of a .jsonl/.jsonl.gz/.csv file (streamed, as :func:`metaalign_cli.records.read_jsonl`
    and ``read_csv`` read them) or a .json array (loaded whole; its ``line`` is the item
    number). Parse errors become records with ``error`` set."""
    p = str(path)
    low = p.lower()
    if low.endswith(".csv") or low.endswith(".csv.gz"):
        return read_csv(p)
    if low.endswith(".json") or low.endswith(".json.gz"):
        return _json_array_rows(p)
    return read_jsonl(p)


def _json_array_rows(path: str) -> Iterator[SourceRecord]:
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
    except RecursionError:  # nested too deep for Python's parser: no item can be told apart
        raise InputError(f"invalid JSON: nested deeper than Python's parser can read "
                         f"(records may nest {MAX_DEPTH} levels)", source=path) from None
    except UnicodeDecodeError as e:
        raise InputError(f"invalid UTF-8 at byte {e.start}", source=path) from None
    except READ_ERRORS as e:
        raise read_error(path, e) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InputError(f"expected a JSON array of objects, got {type(data).__name__}", source=path)
    for i, d in enumerate(data, start=1):
        if isinstance(d, dict) and too_deep(d):
            yield SourceRecord(path, i, None, depth_error(path, i))
        elif isinstance(d, dict):
            yield SourceRecord(path, i, d)
        else:
            yield SourceRecord(path, i, None, InputError(f"expected a JSON object, got {type(d).__name__}",
                                                         source=path, line=i))


def _err(r: SourceRecord, message: str, field_name: str | None = None) -> InputError:
    return InputError(message, r.source, r.line, field_name)



def _check_text(r: SourceRecord, d: dict, key: str, label: str,
                response: bool) -> tuple[str | None, str, InputError | None]:
    """(text, "", None) for a non-empty string field ``d[key]`` (``d``: the row or an object
    inside it; ``label``: the field's path in messages), else (None, reason, error) with the
    bad-record reason: ``missing_field``, ``bad_value`` or ``empty_response``."""
    if d.get(key) is None:
        return None, "missing_field", _err(r, "missing", label)
    try:
        return text_value(d[key], r.source, r.line, label), "", None
    except InputError as e:
        empty = isinstance(d[key], str)
        return None, ("empty_response" if response else "missing_field") if empty else "bad_value", e


def _query(r: SourceRecord, d: dict, stats: BuildStats, pairs_lost: int) -> str | None:
    key = next((f for f in QUERY_FIELDS if f in d), "query")
    q, reason, err = _check_text(r, d, key, key, response=False)
    if q is None:
        stats.pairs += pairs_lost
        stats.problem(reason, err, pairs_lost)
    return q


def parse_rating(value) -> float | None | str:
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
