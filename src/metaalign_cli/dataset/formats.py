"""The input formats of build-data, one reader each (a new format is one function added to
:data:`READERS`): ``ultrafeedback`` and ``scored`` (several rated responses per row),
``pairwise`` (chosen/rejected with labels) and ``hh-rlhf`` (Anthropic's raw transcripts)."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from metaalign_cli.dataset.algorithm import RatedPair
from metaalign_cli.dataset.reading import (UNKNOWN_RATINGS, ReadOptions, _check_text, _err, _query, parse_rating,
                                           relation, source_rows)
from metaalign_cli.dataset.splits import _excluded
from metaalign_cli.dataset.stats import BuildStats
from metaalign_cli.errors import ConfigError, InputError, UnknownNameError
from metaalign_cli.records import QUERY_FIELDS, RESPONSE_FIELDS, SourceRecord

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"

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
    for r in source_rows(path):
        if r.data is not None:
            return guess_format(r.data, str(path))
    return None


def input_labels(paths: Sequence[str | os.PathLike]) -> dict[str, str]:
    """The name each input's item ids start with (``"<label>:<line>..."``): its file name up to
    the first dot (``hh.jsonl.gz`` -> ``hh``), or, where inputs share that name, as many of its
    parent folders as make it unique (``a/data``, ``b/data``). Raises InputError when one file
    is given twice (its rows would be read twice, under the same ids)."""
    from metaalign_cli.errors import InputError

    seen: dict[tuple, str] = {}
    for p in paths:
        try:
            st = os.stat(p)
            ident: tuple = (st.st_dev, st.st_ino)
        except OSError:
            ident = (str(Path(str(p)).resolve()),)
        if ident in seen and str(p) != "-":
            raise InputError(f"{p}: given twice as an input (as {seen[ident]} too): its rows would be read twice")
        seen[ident] = str(p)
    parts = {str(p): Path(str(p)).resolve().parts[:-1] + (Path(str(p)).name.split(".")[0],) for p in paths}
    out = {}
    for p, ps in parts.items():
        n = 1
        while n < len(ps) and any(q != p and qs[-n:] == ps[-n:] for q, qs in parts.items()):
            n += 1
        out[p] = "/".join(ps[-n:])
    return out


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
    labels = input_labels(paths)
    for path in paths:
        rows = source_rows(path)
        if opts.limit is not None:
            rows = itertools.islice(rows, opts.limit)
        fmt = input_format
        if fmt is None:
            head: list[SourceRecord] = []
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
        reader = READERS[fmt]
        default_objs = opts.objectives
        if fmt == "hh-rlhf" and default_objs is None:
            # Anthropic's helpful-base files rate helpfulness; everything else here, harmlessness.
            default_objs = [opts.objective_set.get("helpful" if "helpful" in Path(path).name else "harmless")]
        stem = labels[str(path)]
        for r in rows:
            info["rows"] += 1
            stats.rows += 1
            if on_row is not None:
                on_row(stats.rows)
            if r.error is not None:
                stats.problem("invalid_json", r.error)
                continue
            stats.repairs.extend(r.warnings)
            try:
                pairs = list(reader(r, fmt, stem, opts, default_objs, stats))  # a row's pairs, all or none
            except UnknownNameError as e:
                # An objective no file declares: the whole row is a bad record (--strict: stop).
                stats.problem("unknown_objective", e)
                continue
            yield from pairs


@dataclass
class _Response:
    index: int
    text: str
    scores: dict[str, float]  # objective name -> score, in source order; unknown ones absent
    model: str | None


def _scores(r: SourceRecord, c: dict, fmt: str, label: str, opts: ReadOptions, stats: BuildStats) -> dict[str, float]:
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
        s = parse_rating(v)
        if s is None:
            stats.unknown_ratings += 1
        elif s == "bad":
            stats.problem("non_numeric_score", _err(r, f"not a number: {v!r}"[:120], fld))
        else:
            out[name] = s
    return out


def _read_multi(r: SourceRecord, fmt: str, stem: str, opts: ReadOptions, default_objs, stats: BuildStats) -> Iterator[RatedPair]:
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


def _chosen_rejected(r: SourceRecord, d: dict, stats: BuildStats) -> list[str] | None:
    """The ``chosen`` and ``rejected`` texts of a row, or None (the row counted as a bad record
    that lost its one pair) when either is missing, not a string or empty."""
    texts = []
    for key in ("chosen", "rejected"):
        t, reason, err = _check_text(r, d, key, key, response=True)
        if t is None:
            stats.pairs += 1
            stats.problem(reason, err, 1)
            return None
        texts.append(t)
    return texts


def _read_pairwise(r: SourceRecord, fmt: str, stem: str, opts: ReadOptions, default_objs, stats: BuildStats) -> Iterator[RatedPair]:
    """``pairwise``: ``{query|prompt|..., chosen, rejected, labels?}``; y1 = chosen,
    y2 = rejected. ``labels`` maps objective -> ``chosen`` | ``rejected`` | ``equal``; without
    it, chosen is better on every objective of ``--objectives``."""
    d = r.data
    query = _query(r, d, stats, 1)
    if query is None or _excluded(query, opts, stats, 1):
        return
    texts = _chosen_rejected(r, d, stats)
    if texts is None:
        return
    rel = _labels(r, d, opts, default_objs, stats)
    if rel is None:
        return
    yield from _one_pair(r, fmt, stem, query, texts[0], texts[1], rel, opts, stats, d)


def _labels(r: SourceRecord, d: dict, opts: ReadOptions, default_objs, stats: BuildStats):
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


def _one_pair(r: SourceRecord, fmt: str, stem: str, query: str, y1: str, y2: str, rel, opts: ReadOptions,
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


def _read_hh(r: SourceRecord, fmt: str, stem: str, opts: ReadOptions, default_objs, stats: BuildStats) -> Iterator[RatedPair]:
    """``hh-rlhf``: Anthropic's ``{chosen, rejected}`` full transcripts; chosen is better on
    ``--objectives`` (default harmless; helpful for ``helpful-*`` files) unless ``labels``."""
    d = r.data
    texts = _chosen_rejected(r, d, stats)
    if texts is None:
        return
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


READERS = {"ultrafeedback": _read_multi, "scored": _read_multi, "pairwise": _read_pairwise, "hh-rlhf": _read_hh}

#: Input format names, as ``--format`` takes them.
INPUT_FORMATS = tuple(READERS)
