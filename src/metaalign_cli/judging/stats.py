"""Win rates (Algorithm 2 lines 22-24), score statistics (Appendix E) and their intervals."""

from __future__ import annotations

import json
import math
import statistics
from typing import Callable

from metaalign_cli.judging.items import Mode

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion k/n (95% by default); None when n == 0."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float, float] | None:
    """(mean, low, high): the normal-approximation 95% interval mean +- z * sd / sqrt(n)
    (sample sd with n - 1); None when n < 2."""
    n = len(values)
    if n < 2:
        return None
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(n)
    return (m, m - z * se, m + z * se)


_SCORE_OF = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def _r(x: float | None, nd: int = 4):
    return None if x is None else round(x, nd)


def win_rate_stats(rows: list[dict]) -> dict:
    """Win-rate statistics of one (objective, candidate) from its rows' ``outcome``s.

    ``n`` valid units (W + T + L), ``wins``/``ties``/``losses``/``invalid`` counts,
    ``win_rate`` = W / n as the paper reports it (Algorithm 2 lines 22-23) with a Wilson 95%
    interval ``win_rate_ci``, ``win_rate_ties_half`` = (W + 0.5 T) / n with the Wilson 95%
    interval of W + 0.5 T successes in n ``win_rate_ties_half_ci`` (``shared/quality``'s
    protocol; never zero-width, as a normal interval on the scores is when all units agree);
    and with both
    orders ``consistent``/``position_consistency`` (agreeing pairs / pairs with two valid
    verdicts). Invalid units are excluded from every rate.
    """
    w = sum(r["outcome"] == "win" for r in rows)
    t = sum(r["outcome"] == "tie" for r in rows)
    l = sum(r["outcome"] == "loss" for r in rows)
    inv = sum(r["outcome"] == "invalid" for r in rows)
    n = w + t + l
    out = {"n": n, "wins": w, "ties": t, "losses": l, "invalid": inv,
           "win_rate": _r(w / n) if n else None,
           "win_rate_ci": [_r(x) for x in wilson_interval(w, n)] if n else None,
           "win_rate_ties_half": _r((w + 0.5 * t) / n) if n else None,
           "win_rate_ties_half_ci": [_r(x) for x in wilson_interval(w + 0.5 * t, n)] if n else None}
    pairs = [r for r in rows if "consistent" in r and r["outcome"] != "invalid"]
    if pairs:
        c = sum(bool(r["consistent"]) for r in pairs)
        out["consistent"] = c
        out["position_consistency"] = _r(c / len(pairs))
    return out


def paired_advantage(rows_c: list[dict], rows_b: list[dict], value: Callable[[dict], float | None],
                     bound: float = 1.0) -> dict:
    """The paper's advantage (Algorithm 2 line 24, Table 2 "+"): value(candidate) minus
    value(baseline), paired by record.

    ``value(row)`` gives a unit's number (win indicator, half-tie score, or 0-10 score) or
    None when invalid. ``advantage`` is mean(candidate) - mean(baseline), each over its own
    valid units (the paper's difference of win rates); the interval is
    ``advantage_paired`` +- 1.96 * sd(d) / sqrt(m) with d the per-record differences over
    the ``paired_n`` = m records where both are valid (equal to ``advantage`` when nothing is
    invalid), clipped to [-bound, bound] (1 for rates, 10 for scores).
    """
    vc = {json.dumps(r["record_id"]): value(r) for r in rows_c}
    vb = {json.dumps(r["record_id"]): value(r) for r in rows_b}
    c_vals = [v for v in vc.values() if v is not None]
    b_vals = [v for v in vb.values() if v is not None]
    adv = statistics.fmean(c_vals) - statistics.fmean(b_vals) if c_vals and b_vals else None
    diffs = [vc[k] - vb[k] for k in vc if k in vb and vc[k] is not None and vb[k] is not None]
    mi = mean_interval(diffs)
    return {"advantage": _r(adv), "advantage_paired": _r(statistics.fmean(diffs)) if diffs else None,
            "advantage_ci": [_r(max(-bound, mi[1])), _r(min(bound, mi[2]))] if mi else None,
            "paired_n": len(diffs)}


def score_stats(rows: list[dict]) -> dict:
    """Score statistics of one (objective, candidate) (Appendix E, Figure 2): ``n`` valid,
    ``invalid``, ``mean`` with a normal 95% interval ``mean_ci``, ``median``, ``sd`` and
    ``distribution`` (count of each score 0..10)."""
    s = [r["score"] for r in rows if r["outcome"] == "scored"]
    inv = sum(r["outcome"] == "invalid" for r in rows)
    mi = mean_interval([float(x) for x in s])
    return {"n": len(s), "invalid": inv, "mean": _r(statistics.fmean(s)) if s else None,
            "mean_ci": [_r(max(0.0, mi[1])), _r(min(10.0, mi[2]))] if mi else None,
            "median": statistics.median(s) if s else None,
            "sd": _r(statistics.stdev(s)) if len(s) > 1 else None,
            "distribution": {str(k): s.count(k) for k in range(11)}}


def summarize(rows: list[dict], mode: Mode, candidates: list[str] | None = None,
              objectives: list[str] | None = None) -> dict:
    """Per-objective, per-candidate statistics of a run's rows, plus totals.

    Pairwise: :func:`win_rate_stats` for each (objective, candidate) and, for every candidate
    after the first (the baseline, by default the original response), the paper's advantage
    over the baseline for wins/N (``advantage``...) and (W + 0.5 T)/N (``advantage_ties_half``...)
    from :func:`paired_advantage`. Score: :func:`score_stats` and ``mean_difference`` vs the
    baseline (paired the same way). Orders follow ``objectives``/``candidates`` (else first
    appearance). Returns ``{"mode", "units", "invalid", "invalid_rate", "baseline",
    "results": [{objective, candidate, ...}]}``.
    """
    objectives = list(objectives or dict.fromkeys(r["objective"] for r in rows))
    candidates = list(candidates or dict.fromkeys(r["candidate"] for r in rows))
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by.setdefault((r["objective"], r["candidate"]), []).append(r)
    base = candidates[0] if candidates else None
    results = []
    for o in objectives:
        for c in candidates:
            rs = by.get((o, c), [])
            if not rs:
                continue
            entry = {"objective": o, "candidate": c}
            if mode == "score":
                entry.update(score_stats(rs))
                if c != base and by.get((o, base)):
                    d = paired_advantage(rs, by[(o, base)], lambda r: float(r["score"]) if r["outcome"] == "scored" else None, 10.0)
                    entry.update({"mean_difference": d["advantage"], "mean_difference_paired": d["advantage_paired"],
                                  "mean_difference_ci": d["advantage_ci"], "paired_n": d["paired_n"]})
            else:
                entry.update(win_rate_stats(rs))
                if c != base and by.get((o, base)):
                    entry.update(paired_advantage(
                        rs, by[(o, base)], lambda r: None if r["outcome"] not in _SCORE_OF else float(r["outcome"] == "win")))
                    h = paired_advantage(rs, by[(o, base)], lambda r: _SCORE_OF.get(r["outcome"]))
                    entry.update({"advantage_ties_half": h["advantage"], "advantage_ties_half_paired": h["advantage_paired"],
                                  "advantage_ties_half_ci": h["advantage_ci"]})
            results.append(entry)
    inv = sum(r["outcome"] == "invalid" for r in rows)
    out = {"mode": mode, "units": len(rows), "invalid": inv,
           "invalid_rate": _r(inv / len(rows)) if rows else 0.0, "baseline": base, "results": results}
    reasons: dict[str, int] = {}
    for r in rows:
        if r["outcome"] == "invalid":
            reason = _reason_kind(r.get("invalid_reason") or "")
            reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        out["invalid_reasons"] = reasons
    pairs = [r for r in rows if "consistent" in r and r["outcome"] != "invalid"]
    if pairs:
        out["position_consistency"] = _r(sum(bool(r["consistent"]) for r in pairs) / len(pairs))
    return out


def _reason_kind(reason: str) -> str:
    """A short class of an invalid reason for the summary (the full text stays in the row)."""
    reason = reason.split(": ", 1)[1] if reason.startswith(("candidate-first: ", "golden-first: ")) else reason
    if reason.startswith("judge call failed"):
        return "judge call failed"
    if reason.startswith("answer '") or reason.startswith('answer "'):
        return "not a bare answer"
    if reason.startswith("answer is "):
        return "long text"
    return reason.split(" instead")[0]
