"""Token-length percentiles of a build's prompts and targets (``--tokenizer``)."""

from __future__ import annotations

import math
from array import array
from pathlib import Path
from typing import Callable, Sequence

from metaalign_cli.dataset.algorithm import STAGES, DatasetItem
from metaalign_cli.errors import ConfigError

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
