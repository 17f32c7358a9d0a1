"""Reading judge answers and placing candidates (paper Algorithm 2, Appendix C.1 and E.1).

Answers are parsed strictly: only a bare answer is read, so text inside a candidate response
can never become the verdict. A candidate's position in prompt E is drawn from a seeded RNG.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any, NamedTuple

PARSER_VERSION = "strict-1"


class ParsedAnswer(NamedTuple):
    """A parsed judge answer: ``value`` (verdict 0/1/2 or score 0-10) or None with ``reason``."""

    value: int | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None


# The whole answer must be the verdict: a bare digit, or the declared "[[n]]" form;
# surrounding whitespace and one trailing period are tolerated, nothing else.
_VERDICT = re.compile(r"(?:([012])|\[\[([012])\]\])\.?")
_SCORE = re.compile(r"(?:(10|[0-9])|\[\[(10|[0-9])\]\])\.?")
_ECHO = re.compile(r"RESPONSE\s*\d?\s*:|QUERY\s*:|\| RESPONSE")  # the prompt's own markers
_MAX_ANSWER_CHARS = 12


def _parse_strict(text: str | None, pattern: re.Pattern, expected: str) -> ParsedAnswer:
    if text is None:
        return ParsedAnswer(None, "no answer")
    s = text.strip()
    if not s:
        return ParsedAnswer(None, "empty answer")
    if _ECHO.search(s):
        return ParsedAnswer(None, "answer echoes the prompt instead of giving " + expected)
    if len(s) > _MAX_ANSWER_CHARS:
        return ParsedAnswer(None, f"answer is {len(s)} characters of text, not {expected}")
    m = pattern.fullmatch(s)
    if m is None:
        return ParsedAnswer(None, f"answer {s!r} is not {expected}")
    return ParsedAnswer(int(m.group(1) or m.group(2)))


def parse_verdict(text: str | None) -> ParsedAnswer:
    """Read a pairwise verdict from a judge answer (prompt E, Appendix C.1: "You must only
    return 1, 2, or 0").

    Accepted, after stripping whitespace: exactly ``1``, ``2`` or ``0`` (or ``[[1]]``,
    ``[[2]]``, ``[[0]]``), optionally followed by one period. Everything else is rejected
    with a reason: empty answers, sentences ("Response 1 is better than Response 2"),
    ``10``, ``1.0``, and any answer that echoes prompt text such as ``RESPONSE 1:``. Because
    the whole answer must be the verdict, a "2" or "[[2]]" inside a candidate response the
    judge repeats can never be read as the verdict. Returns a :class:`ParsedAnswer`.
    """
    return _parse_strict(text, _VERDICT, "a bare verdict 1, 2 or 0")


def parse_score(text: str | None) -> ParsedAnswer:
    """Read a 0-10 integer score (prompt S, Appendix E.1: "You must only return the assigned
    score"). Accepted: a bare integer 0..10 (or ``[[n]]``), optionally with one trailing
    period; rejected with a reason: ``7.5``, ``11``, ``-1``, ``7/10``, ``07``, sentences,
    empty answers. Returns a :class:`ParsedAnswer`."""
    return _parse_strict(text, _SCORE, "a bare integer score 0-10")


# --------------------------------------------------------------------------- position


def candidate_position(seed: int, record_id: Any, objective: str, candidate: str) -> int:
    """The candidate's position (1 or 2) in prompt E for one unit: Algorithm 2's
    ``random_shuffle(g_i, R_i)``, drawn from an RNG seeded by ``seed`` and a SHA-256 of
    (record id, objective, candidate), so reruns and resumed runs draw the same positions
    whatever the order or concurrency of the calls."""
    h = hashlib.sha256(json.dumps([seed, record_id, objective, candidate], ensure_ascii=False).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big")).choice((1, 2))


def verdict_outcome(verdict: int, cand_position: int) -> str:
    """Algorithm 2 lines 9-11 from the candidate's side: ``win`` when the judge picked the
    candidate's position, ``tie`` for 0, else ``loss``."""
    if verdict == 0:
        return "tie"
    return "win" if verdict == cand_position else "loss"


def combine_orders(outcomes: list[str]) -> tuple[str, bool]:
    """The unit's outcome from the verdicts of both orders (FastChat's rule): the common
    outcome when they agree, else ``tie``. Returns (outcome, consistent)."""
    if all(o == outcomes[0] for o in outcomes):
        return outcomes[0], True
    return "tie", False
