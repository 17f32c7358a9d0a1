"""The whole build: read, apply Algorithm 1, split by query, write, count (``build-data``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from metaalign_cli.dataset.algorithm import build_dynamic_dataset
from metaalign_cli.dataset.formats import read_rated_pairs
from metaalign_cli.dataset.reading import ReadOptions
from metaalign_cli.dataset.splits import hash_query, split_for_query
from metaalign_cli.dataset.stats import BuildStats
from metaalign_cli.dataset.tokens import _TokenStats
from metaalign_cli.dataset.writer import DatasetWriter, _install
from metaalign_cli.templates import CorrectionTemplate

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
