"""Per-query splits and the queries kept out of a build (``--exclude-queries``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from metaalign_cli.dataset.reading import ReadOptions, source_rows
from metaalign_cli.dataset.stats import BuildStats
from metaalign_cli.errors import InputError

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
        for rec in source_rows(path):
            if rec.error is not None:
                raise rec.error
            v = rec.data.get(field_name)
            if not isinstance(v, str):
                raise InputError(f"missing text field '{field_name}' in an --exclude-queries file",
                                 rec.source, rec.line, field_name)
            out.add(normalize_query(v))
    return frozenset(out)


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
