"""Judging: win rates (paper Algorithm 2, Appendix C.1) and 0-10 scores (Appendix E.1)
that can be trusted and audited.

A *judgment unit* is one (record, objective, candidate). In ``pairwise`` mode the judge
compares the candidate with the record's golden response using prompt E(q, r1, r2, <r>);
the candidate's position (RESPONSE 1 or 2) is drawn from an RNG seeded by ``seed`` and a
hash of (record id, objective, candidate), so reruns are identical; ``both_orders`` asks
both positions and turns a disagreement into a tie. In ``score`` mode the judge gives the
candidate a 0-10 score with prompt S(q, a, <r>).

Every unit becomes one JSONL row holding the exact prompt(s), every raw answer, the parsed
verdict, the position order, latency, tokens and the judge's model/template/settings.

The parts, one module each: :mod:`.verdicts` (strict answer parsing, positions),
:mod:`.cache` (the SQLite answer cache), :mod:`.items` (reading judge input),
:mod:`.plan` (units and prompts), :mod:`.run` (asking the judge, dry run), :mod:`.stats`
(win rates, scores, intervals, advantage), :mod:`.plots` (score histograms) and
:mod:`.blind` (tasks for people or any outside judge, and their verdicts).
"""

from metaalign_cli.judging.cache import CachedAnswer, JudgeCache, cache_key, default_cache_path
from metaalign_cli.judging.items import CORRECTED_FIELD, GOLDEN_FIELDS, JudgeItem, Mode, load_judge_items
from metaalign_cli.judging.plan import Ask, JudgeOptions, JudgeUnit, aspect_text, plan_units, unit_key
from metaalign_cli.judging.plots import plot_scores
from metaalign_cli.judging.run import (JudgeReport, RateLimiter, dry_run, judge_info, judge_unit, judge_units,
                                       load_done_rows, max_attempts)
from metaalign_cli.judging.stats import (Z95, mean_interval, paired_advantage, score_stats, summarize,
                                         wilson_interval, win_rate_stats)
from metaalign_cli.judging.verdicts import (PARSER_VERSION, ParsedAnswer, candidate_position, combine_orders,
                                            parse_score, parse_verdict, verdict_outcome)

__all__ = [
    "Ask", "CORRECTED_FIELD", "CachedAnswer", "GOLDEN_FIELDS", "JudgeCache", "JudgeItem", "JudgeOptions",
    "JudgeReport", "JudgeUnit", "Mode", "PARSER_VERSION", "ParsedAnswer", "RateLimiter", "Z95", "aspect_text",
    "cache_key", "candidate_position", "combine_orders", "default_cache_path", "dry_run", "judge_info",
    "judge_unit", "judge_units", "load_done_rows", "load_judge_items", "max_attempts", "mean_interval",
    "paired_advantage", "parse_score", "parse_verdict", "plan_units", "plot_scores", "score_stats", "summarize",
    "unit_key", "verdict_outcome", "wilson_interval", "win_rate_stats",
]
