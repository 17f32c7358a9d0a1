"""Correcting at scale, side by side in one run (issue 11):

(a) a local OpenAI-compatible server with a fixed latency per request: records/s of the
    correction pipeline at --concurrency 1, 4, 16, 64, and the speed-up against linear;
(b) the same CPU model (SmolLM2-135M-Instruct, dequantized from the shipped GGUF) on the same
    inputs through the vllm, transformers and llama-cpp backends: records/s and generated
    tokens/s, greedy, and how many outputs equal the transformers backend's (fp32).

Run it in the vLLM environment (see docs/scale.md): ``/work/venvs/vllm/bin/python
bench/correct_scaling.py``; ``--skip-engines`` runs (a) alone (no vLLM needed). On a 2-core CPU
machine keep (b) small (``--rows``, ``--max-new-tokens``): it is the engines' own speed there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def pipeline(backend, records: list[dict], max_new_tokens: int, batch_size: int = 1, template: str = "hh-rlhf"):
    """Run :func:`correct_records` over ``records`` on ``backend``; returns (report, outputs)."""
    from metaalign_cli.backends import GenerationSettings
    from metaalign_cli.correction import CorrectionOptions, correct_records
    from metaalign_cli.objectives import load_objectives
    from metaalign_cli.records import JsonlWriter, read_records
    from metaalign_cli.templates import load_template

    objset = load_objectives(include_user=False)
    opts = CorrectionOptions(template=load_template(template), objective_set=objset,
                             objectives=objset.resolve(["harmless", "helpful"]), prompt_format="raw",
                             settings=GenerationSettings(max_new_tokens=max_new_tokens, loop_guard=False),
                             batch_size=batch_size)
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.jsonl", Path(d) / "out.jsonl"
        src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        with JsonlWriter(str(dst)) as w:
            report = correct_records(read_records(str(src)), backend, opts, w)
        out = [json.loads(l) for l in dst.read_text(encoding="utf-8").splitlines()]
    return report, out


def server_scaling(n: int, latency: float, levels: list[int]) -> list[tuple[int, float, float]]:
    """(concurrency, seconds, records/s) against a FaultServer answering after ``latency`` s."""
    from fault_server import FaultServer

    from metaalign_cli.backends import create_backend

    recs = [{"id": f"r{i}", "query": f"Question {i}?", "response": f"Answer {i}."} for i in range(n)]
    rows = []
    with FaultServer(lambda p: "A better answer.", delay_s=latency) as srv:
        for c in levels:
            be = create_backend("openai", None, base_url=srv.url, concurrency=c)
            t = time.perf_counter()
            report, out = pipeline(be, recs, 16)
            dt = time.perf_counter() - t
            be.close()
            assert report.corrected == n and [o["id"] for o in out] == [r["id"] for r in recs]
            rows.append((c, dt, n / dt))
    return rows


def claude_rows(rows: int) -> list[dict]:
    """The first ``rows`` rows of the reference samples (``$METAALIGN_SHARED`` or the shared/
    folder beside the checkout), as correct reads them; the example records without them."""
    from metaalign_cli.records import extract_query_response, read_records

    shared = Path(os.environ.get("METAALIGN_SHARED") or REPO.parent / "shared")
    csv = shared / "data" / "metaaligner-samples" / "hh-rlhf" / "Claude-3.csv"
    src = str(csv) if csv.is_file() else str(REPO / "examples" / "hh-rlhf.jsonl")
    out = []
    for rec in read_records(src):
        if rec.error is None:
            q, a = extract_query_response(rec, None, None)
            out.append({"id": f"row{rec.line}", "query": q, "response": a})
        if len(out) == rows:
            break
    return out


RUNS = {
    "vllm": ("vllm (fp32, prefix caching, whole input as one call)", "vllm",
             dict(dtype="fp32", max_model_len=4096, enforce_eager=True), 1),
    "transformers": ("transformers (fp32, batch 8)", "transformers", dict(dtype="fp32", device="cpu", batch_size=8), 8),
    "llama-cpp-f32": ("llama-cpp (f32 copy of the GGUF, batch 8)", "llama-cpp", dict(quant="f32", n_ctx=4096), 8),
    "llama-cpp-q8_0": ("llama-cpp (q8_0, the default, batch 8)", "llama-cpp", dict(quant="q8_0", n_ctx=4096), 8),
}


def engine_run(key: str, rows: int, max_new_tokens: int, threads: int) -> dict:
    """One run of (b) in this process: load, correct ``rows`` records, time it."""
    from metaalign_cli.backends import create_backend, default_model_path
    from metaalign_cli.backends.vllm_engine import hf_copy_of_gguf

    label, name, kw, bs = RUNS[key]
    if name == "llama-cpp":
        kw = dict(kw, threads=threads)
    model = str(hf_copy_of_gguf(default_model_path())) if name != "llama-cpp" else str(default_model_path())
    t0 = time.perf_counter()
    be = create_backend(name, model, **kw)
    load = time.perf_counter() - t0
    report, out = pipeline(be, claude_rows(rows), max_new_tokens, batch_size=bs)
    be.close()
    return dict(label=label, load=load, seconds=report.seconds, rps=len(out) / report.seconds,
                tps=report.generated_tokens / report.seconds, texts=[o.get("corrected") for o in out])


def engines(rows: int, max_new_tokens: int, threads: int) -> list[dict]:
    """Every run of (b), each in its own process (vLLM pins the threads of the process it runs in)."""
    import subprocess

    from metaalign_cli.backends import default_model_path
    from metaalign_cli.backends.vllm_engine import hf_copy_of_gguf

    hf_copy_of_gguf(default_model_path())  # made once, outside the timings
    results = []
    for key in RUNS:
        p = subprocess.run([sys.executable, __file__, "--one", key, "--rows", str(rows), "--max-new-tokens",
                            str(max_new_tokens), "--threads", str(threads)], capture_output=True, text=True)
        last = [l for l in p.stdout.splitlines() if l.startswith("{")]
        if p.returncode or not last:
            raise SystemExit(f"{key} failed:\n{p.stderr[-3000:]}")
        results.append(json.loads(last[-1]))
        r = results[-1]
        print(f"  done: {r['label']}: {r['seconds']:.1f} s (+{r['load']:.1f} s load)", file=sys.stderr, flush=True)
    ref = next(r["texts"] for r in results if r["label"].startswith("transformers"))
    for r in results:
        r["same"] = sum(a == b for a, b in zip(r["texts"], ref))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=96, help="records for (a)")
    ap.add_argument("--latency", type=float, default=0.25, help="seconds per request in (a)")
    ap.add_argument("--rows", type=int, default=8, help="records for (b)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="(b)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads in (b)")
    ap.add_argument("--skip-engines", action="store_true", help="run (a) only")
    ap.add_argument("--one", choices=list(RUNS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM binds its threads to all but one core by default; give it as many as the others.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, args.threads - 1)}")
    if args.one:
        print(json.dumps(engine_run(args.one, args.rows, args.max_new_tokens, args.threads)))
        return

    rows = server_scaling(args.records, args.latency, [1, 4, 16, 64])
    print(f"(a) {args.records} records, OpenAI-compatible server on 127.0.0.1 answering after {args.latency} s")
    print(f"{'concurrency':>11} {'seconds':>8} {'records/s':>10} {'speed-up':>9} {'of linear':>10}")
    base = rows[0][2]
    for c, dt, rps in rows:
        print(f"{c:>11} {dt:>8.2f} {rps:>10.2f} {rps / base:>8.2f}x {rps / base / c:>9.2f}x")
    if args.skip_engines:
        return
    res = engines(args.rows, args.max_new_tokens, args.threads)
    n_b = len(res[0]["texts"])
    shared = Path(os.environ.get("METAALIGN_SHARED") or REPO.parent / "shared")
    name = "Claude-3.csv" if (shared / "data" / "metaaligner-samples" / "hh-rlhf" / "Claude-3.csv").is_file() \
        else "examples/hh-rlhf.jsonl"
    print(f"\n(b) {n_b} records of {name}, SmolLM2-135M-Instruct, greedy, {args.max_new_tokens} new tokens, "
          f"no loop guard, {os.cpu_count()} CPU cores")
    print(f"{'run':<54} {'load s':>7} {'seconds':>8} {'records/s':>10} {'gen tok/s':>10} {'same as hf':>11}")
    for r in res:
        print(f"{r['label']:<54} {r['load']:>7.1f} {r['seconds']:>8.1f} {r['rps']:>10.3f} {r['tps']:>10.1f} "
              f"{r['same']:>8}/{len(r['texts'])}")
    hf = next(r for r in res if r["label"].startswith("transformers"))
    for r in res:
        if r is not hf:
            print(f"ratio {r['label'].split(' (')[0]} ({r['label'].split(' (')[1].split(',')[0]}) / transformers: "
                  f"records/s {r['rps'] / hf['rps']:.2f}x, generated tokens/s {r['tps'] / hf['tps']:.2f}x")


if __name__ == "__main__":
    main()
