"""Throughput and memory of ``build-data``: streaming build vs a load-everything baseline.

Generates N rows (default 100,000) in the ``scored`` layout (2 responses, 3 objectives rated
1-5 at random, fixed seed), then runs, each in its own process so peak RSS is its own:

- ``streaming``: :func:`metaalign_cli.dataset.build_data` (one row in memory at a time);
- ``naive``: the same library steps, but every rated pair and every item is first collected
  in a list, then written (what a load-everything script does).

Prints rows/s, items/s and peak RSS (``resource.getrusage``, ru_maxrss) side by side with
ratios. Usage: ``python bench/build_data_throughput.py [--rows 100000] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
         "boxing matches near an old lighthouse by the sea").split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` scored rows: a ~12-word query, 2 responses of ~40 words, 3 objectives."""
    rng = random.Random(seed)
    objs = ("harmless", "helpful", "humor")
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            q = f"Q{i}: " + " ".join(rng.choices(WORDS, k=12)) + "?"
            resp = [{"text": f"R{i}.{k}: " + " ".join(rng.choices(WORDS, k=40)),
                     "scores": {o: rng.randint(1, 5) for o in objs}} for k in range(2)]
            fh.write(json.dumps({"query": q, "responses": resp}) + "\n")


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def run_mode(mode: str, inp: str, out: str) -> dict:
    from metaalign_cli.dataset import (BuildOptions, BuildStats, DatasetWriter, ReadOptions, build_data,
                                       build_dynamic_dataset, read_rated_pairs, split_for_query)
    from metaalign_cli.objectives import load_objectives
    from metaalign_cli.templates import load_template

    objset = load_objectives(include_user=False)
    tpl = load_template("ultrafeedback", kind="correction")
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    if mode == "streaming":
        stats = build_data([inp], out, BuildOptions(template=tpl, read=ReadOptions(objective_set=objset)))
        rows, items = stats.rows, sum(sum(c.values()) for c in stats.items.values())
    else:
        # Load everything first: the list of rows, then of pairs, then of items.
        stats = BuildStats()
        opts = ReadOptions(objective_set=objset)
        pairs = list(read_rated_pairs([inp], None, opts, stats))
        all_items = list(build_dynamic_dataset(pairs, objset, tpl, 0, 0.1))
        writer = DatasetWriter(out, ("train", "validation"))
        for it in all_items:
            writer.write(it, split_for_query(it.query, 0.05))
        writer.close()
        rows, items = stats.rows, len(all_items)
    secs = time.perf_counter() - t0
    return {"mode": mode, "rows": rows, "items": items, "seconds": secs, "rows_per_s": rows / secs,
            "items_per_s": items / secs, "peak_rss_mib": peak_rss_mib(), "rss_before_mib": rss0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--keep", help="Keep the generated input and outputs in this directory.")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:  # child process
        print(json.dumps(run_mode(a.mode, a.input, a.out)))
        return
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-build-data-"))
    work.mkdir(parents=True, exist_ok=True)
    inp = work / "scored.jsonl"
    t = time.perf_counter()
    generate(inp, a.rows)
    print(f"generated {a.rows} rows ({inp.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f}s",
          file=sys.stderr)
    results = {}
    try:
        for mode in ("naive", "streaming"):
            out = work / f"out-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            p = subprocess.run([sys.executable, __file__, "--mode", mode, "--input", str(inp), "--out", str(out)],
                               capture_output=True, text=True, check=True)
            results[mode] = json.loads(p.stdout.strip().splitlines()[-1])
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    s, n = results["streaming"], results["naive"]
    print(f"{'':22}{'streaming':>12}{'naive':>12}{'ratio':>10}")
    print(f"{'rows':22}{s['rows']:>12}{n['rows']:>12}")
    print(f"{'items':22}{s['items']:>12}{n['items']:>12}")
    print(f"{'rows/s':22}{s['rows_per_s']:>12.0f}{n['rows_per_s']:>12.0f}{s['rows_per_s'] / n['rows_per_s']:>9.2f}x")
    print(f"{'items/s':22}{s['items_per_s']:>12.0f}{n['items_per_s']:>12.0f}{s['items_per_s'] / n['items_per_s']:>9.2f}x")
    print(f"{'peak RSS MiB':22}{s['peak_rss_mib']:>12.1f}{n['peak_rss_mib']:>12.1f}"
          f"{n['peak_rss_mib'] / s['peak_rss_mib']:>9.2f}x less")
    print(f"{'RSS after imports MiB':22}{s['rss_before_mib']:>12.1f}{n['rss_before_mib']:>12.1f}")


if __name__ == "__main__":
    main()
