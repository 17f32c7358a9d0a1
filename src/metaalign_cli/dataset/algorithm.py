"""Algorithm 1 (paper section 3.1) plus the warm-up sample (section 3.3 step 1): rated
response pairs in, preference, equal-preference and warm-up items out."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from metaalign_cli.objectives import Objective, ObjectiveSet, render_objectives
from metaalign_cli.stages import SPLITS, STAGES  # noqa: F401 (re-exported)
from metaalign_cli.templates import CorrectionTemplate

Relation = str  # ">" (y1 better), "<" (y2 better) or "=" (tie)


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
