"""Score histograms like the paper's Figure 2."""

from __future__ import annotations

import os
import statistics
from pathlib import Path


def plot_scores(rows: list[dict], path: str | os.PathLike, objectives: list[str] | None = None,
                candidates: list[str] | None = None) -> Path:
    """Write a PNG with one histogram panel per objective (scores 0-10, one bar series per
    candidate), like the paper's Figure 2. Needs matplotlib (``pip install
    'metaalign-cli[plot]'``); raises MetaAlignError when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from metaalign_cli.errors import MetaAlignError

        raise MetaAlignError("--plot needs matplotlib: pip install 'metaalign-cli[plot]'") from None
    objectives = list(objectives or dict.fromkeys(r["objective"] for r in rows))
    candidates = list(candidates or dict.fromkeys(r["candidate"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(objectives)), figsize=(4 * max(1, len(objectives)), 3.2),
                             squeeze=False, sharey=True)
    width = 0.8 / max(1, len(candidates))
    for ax, o in zip(axes[0], objectives):
        for j, c in enumerate(candidates):
            s = [r["score"] for r in rows if r["objective"] == o and r["candidate"] == c and r["outcome"] == "scored"]
            counts = [s.count(k) / len(s) if s else 0 for k in range(11)]
            mean = f" (mean {statistics.fmean(s):.2f})" if s else ""
            ax.bar([k - 0.4 + width * (j + 0.5) for k in range(11)], counts, width=width, label=f"{c}{mean}")
        ax.set_title(o)
        ax.set_xlabel("score")
        ax.set_xticks(range(11))
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("fraction of responses")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
