"""Writing a build: the split/stage JSONL files (and ShareGPT arrays) of the output layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from metaalign_cli.dataset.algorithm import SPLITS, STAGES, DatasetItem

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
