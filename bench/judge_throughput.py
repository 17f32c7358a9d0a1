"""Judge throughput: 64 judgments against a local OpenAI-compatible server at concurrency 1
and 8, then a fully cached rerun. Prints calls/s and the ratios side by side.

    python bench/judge_throughput.py                 # starts llama-cpp-python's server with SmolLM2
    python bench/judge_throughput.py --base-url http://127.0.0.1:8080/v1 --model NAME

Input: the 32 shortest of the first 300 rows of
``../shared/data/metaaligner-samples/hh-rlhf/Claude-3.csv`` (query, goldens, generated_text;
short rows keep a CPU run brief) judged on 2 objectives (harmless, helpful) = 64 judgments,
temperature 0, 4 answer tokens. The prompt is a short raw pairwise template that
SmolLM2-135M answers with a bare digit (it almost never does with the paper's prompt E,
and unparsable answers are never cached); ``--paper-template`` uses E. Each pass uses its own fresh cache, so
the first two passes call the server for every judgment (plus re-asks for unparsable
answers); the third pass reuses the concurrency-8 cache.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from metaalign_cli import judging  # noqa: E402
from metaalign_cli.backends import create_backend, default_model_path  # noqa: E402
from metaalign_cli.backends.base import GenerationSettings  # noqa: E402
from metaalign_cli.objectives import load_objectives  # noqa: E402
from metaalign_cli.records import read_records  # noqa: E402
from metaalign_cli.templates import JudgeTemplate, load_template  # noqa: E402

TINY = JudgeTemplate(name="tiny-raw", kind="judge-pairwise", prompt_format="raw",
                     prompt="Query: {question}\nResponse 1: {response_1}\nResponse 2: {response_2}\n"
                            "Which response is better? Aspect: {aspect}. Reply 1, 2 or 0.\nBetter response number:")

DATA = REPO.parent / "shared" / "data" / "metaaligner-samples" / "hh-rlhf" / "Claude-3.csv"


def start_server() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from metaalign_cli.backends.llamacpp import server_command

    proc = subprocess.Popen(server_command(default_model_path(), "smollm2", port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            return proc, url
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit("llama-cpp server did not start")
            time.sleep(0.5)


def one_pass(url: str, model: str, units: list, opts: judging.JudgeOptions, concurrency: int,
             cache_path: Path) -> tuple[judging.JudgeReport, list[dict]]:
    """Judge ``units`` with ``concurrency`` calls in flight; returns the report and the rows."""
    from dataclasses import replace

    backend = create_backend("openai", model, base_url=url, concurrency=concurrency, retries=2, timeout=120)
    cache = judging.JudgeCache(cache_path)
    rows: list[dict] = []
    try:
        rep = judging.judge_units(units, backend, cache, replace(opts, concurrency=concurrency), rows.append)
    finally:
        cache.close()
        backend.close()
    return rep, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--paper-template", action="store_true", help="Use the paper's prompt E (judge-pairwise).")
    args = ap.parse_args()

    objset = load_objectives()
    # The shortest rows of the first 300 keep a CPU run short; the judging work is the same.
    pool = list(read_records(DATA))[:300]
    recs = sorted(pool, key=lambda r: sum(len(v or "") for v in r.data.values()))[: args.records]
    recs.sort(key=lambda r: r.line)
    items = judging.load_judge_items(recs, objset, objset.resolve("harmless,helpful"),
                                     candidate_fields=["generated_text"])
    tpl = load_template("judge-pairwise") if args.paper_template else TINY
    opts = judging.JudgeOptions(template=tpl,
                                settings=GenerationSettings(max_new_tokens=4), retries=1)
    units = judging.plan_units(items, opts)
    print(f"{len(units)} judgments ({len(items)} records x 2 objectives), judge {args.model}, template {tpl.name}", file=sys.stderr)

    proc = None
    url = args.base_url
    if url is None:
        proc, url = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = []
            for label, conc, cache in (("concurrency 1", 1, "c1.sqlite"), ("concurrency 8", 8, "c8.sqlite"),
                                       ("cached rerun (8)", 8, "c8.sqlite")):
                rep, rows = one_pass(url, args.model, units, opts, conc, Path(tmp) / cache)
                results.append((label, rep, rows))
                print(f"  {label}: {rep.seconds:.2f}s", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)

    base = results[0][1]
    base_rate = len(units) / base.seconds
    print(f"{'pass':<18} {'judgments':>9} {'calls':>6} {'cache hits':>10} {'invalid':>8} {'seconds':>8} "
          f"{'calls/s':>8} {'judgments/s':>11} {'speed-up':>8}")
    for label, rep, rows in results:
        rate = len(rows) / rep.seconds if rep.seconds else float("inf")
        cps = rep.calls / rep.seconds if rep.seconds else 0.0
        print(f"{label:<18} {len(rows):>9} {rep.calls:>6} {rep.cache_hits:>10} {rep.invalid:>8} {rep.seconds:>8.2f} "
              f"{cps:>8.2f} {rate:>11.1f} {rate / base_rate:>7.1f}x")
    same = [(r["outcome"], r.get("verdict")) for r in results[1][2]] == [(r["outcome"], r.get("verdict")) for r in results[2][2]]
    print(f"cached rerun identical to its source run: {same}")


if __name__ == "__main__":
    main()
