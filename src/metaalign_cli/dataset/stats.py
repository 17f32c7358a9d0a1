"""The counts of one build (``stats.json``): items per split and stage, bad records and
dropped pairs per reason, objective frequencies, token lengths."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from metaalign_cli.dataset.algorithm import SPLITS, STAGES
from metaalign_cli.errors import InputError

# Reasons a row (or one response inside a row) is skipped; the order is the report order.
BAD_RECORD_REASONS = ("invalid_json", "missing_field", "bad_value", "empty_response",
                      "identical_responses", "non_numeric_score", "unknown_objective")
# Reasons a response pair yields no item: a bad-record reason, or one of these.
PAIR_DROP_REASONS = BAD_RECORD_REASONS + ("no_comparable_objective", "excluded_query")


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
    repairs: list = field(default_factory=list)  # "<file>:<line>: field 'x': lone surrogate replaced ..."

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
            **({"repaired_fields": len(self.repairs), "repaired_example": self.repairs[0]} if self.repairs else {}),
        }
