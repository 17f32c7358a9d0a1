"""Planning a judge run: every (record, objective, candidate) unit with its exact prompt(s)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from metaalign_cli.backends.base import GenerationSettings, Prompt
from metaalign_cli.judging.items import JudgeItem, Mode
from metaalign_cli.judging.verdicts import candidate_position
from metaalign_cli.objectives import Objective
from metaalign_cli.records import text_sha


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

    @property
    def texts_sha(self) -> str:
        """First 16 hex digits of the SHA-256 of what is judged (query, the candidate's text, the
        golden response, the objective's text): a row's ``texts_sha``, which ``--resume``
        compares, so a verdict is never kept for text edited since."""
        texts = [self.item.question, self.item.candidates[self.candidate], self.item.golden,
                 aspect_text(self.objective)]
        return text_sha(json.dumps(texts, ensure_ascii=False))


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
    ``concurrency``: requests in flight (servers); ``batch_size``: prompts per generate call of
    a local judge (llama-cpp decodes greedy ones together, transformers pads them into one batch);
    ``rpm``: cap on judge calls per minute (None: no cap)."""

    template: Any
    mode: Mode = "pairwise"
    settings: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=16))
    seed: int = 0
    both_orders: bool = False
    retries: int = 2
    concurrency: int = 4
    batch_size: int = 1
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
