"""GPU check of the vllm backend (issue 11): bf16, a model of the released 7B corrector's size,
the same corrector prompts through the vllm and the transformers backends; generated tokens/s
and records/s of each, and their ratio.

Meant to be called from the prepared device script (``bench/gpu_check``) as
``check_vllm(workdir)``; also runs alone: ``python bench/gpu_check_vllm.py [--model DIR]``.
The model is ``--model``/``$METAALIGN_GPU_MODEL`` when given (an HF directory, e.g. a local copy
of MetaAligner-HH-RLHF-7B), else a Llama of the 7B corrector's shape (32 layers, hidden 4096,
MLP 11008, 32 heads) with random bf16 weights, built here with the SmolLM2 tokenizer (no
download). Random weights make the texts meaningless but the work per token the same. Each
backend runs in its own process, so the GPU memory of one is free for the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # Llama-2-7B, the MetaAligner-7B base; "tiny" only to try the script on a CPU
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),  # head_dim 64: vLLM's CPU attention has no kernel for 16
}


def build_model(out: Path, shape: str = "7b", dtype: str = "bfloat16") -> Path:
    """A LlamaForCausalLM of ``shape`` with random weights (seed 0) and the SmolLM2 tokenizer and
    chat template, saved to ``out`` (about 13 GB for 7b in bf16). Returns ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from metaalign_cli.backends import default_model_path

    if (out / "config.json").is_file():
        return out
    gguf = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    del model
    return out


def prompts(n: int):
    """``n`` corrector prompts (hh-rlhf template, raw) made from the example records."""
    from metaalign_cli.correction import CorrectionOptions, build_prompt
    from metaalign_cli.objectives import load_objectives
    from metaalign_cli.records import read_records
    from metaalign_cli.templates import load_template

    objset = load_objectives(include_user=False)
    opts = CorrectionOptions(template=load_template("hh-rlhf"), objective_set=objset, prompt_format="raw")
    recs = [r for r in read_records(str(REPO / "examples" / "hh-rlhf.jsonl")) if r.error is None]
    objs = [["harmless"], ["harmless", "helpful"], ["helpful", "humor"], ["harmless", "helpful", "humor"]]
    out = []
    for i in range(n):
        r = recs[i % len(recs)]
        out.append(build_prompt(r.data["query"], r.data["response"], objset.resolve(objs[i % len(objs)]), opts))
    return out


def run_one(backend: str, model: str, n: int, max_new_tokens: int, dtype: str) -> dict:
    """Load ``model`` on ``backend`` and generate for ``n`` prompts (one call: the whole set for
    vLLM, batches of 16 for transformers); returns timings and token counts."""
    from metaalign_cli.backends import GenerationSettings, create_backend

    ps = prompts(n)
    t0 = time.perf_counter()
    if backend == "vllm":
        be = create_backend("vllm", model, dtype=dtype, max_model_len=4096, gpu_memory_utilization=0.85)
    else:
        be = create_backend("transformers", model, dtype=dtype, batch_size=16)
    load = time.perf_counter() - t0
    st = GenerationSettings(max_new_tokens=max_new_tokens, loop_guard=False)
    be.generate(ps[:2], GenerationSettings(max_new_tokens=4, loop_guard=False))  # warm-up
    t0 = time.perf_counter()
    gens = be.generate(ps, st)
    dt = time.perf_counter() - t0
    bad = [str(g) for g in gens if isinstance(g, Exception)]
    ok = [g for g in gens if not isinstance(g, Exception)]
    info = be.info()
    be.close()
    toks = sum(g.completion_tokens or 0 for g in ok)
    return dict(backend=backend, info=info, load_s=round(load, 1), seconds=round(dt, 2), records=len(ok),
                failed=bad[:3], generated_tokens=toks, tokens_per_s=round(toks / dt, 1),
                records_per_s=round(len(ok) / dt, 3), texts=[g.text for g in ok])


def check_vllm(workdir: str | Path, model: str | None = None, n: int = 64, max_new_tokens: int = 256,
               shape: str = "7b", dtype: str = "bf16", timeout: float = 1500) -> dict:
    """The GPU check: vllm vs transformers on the same prompts, each in its own process.

    ``workdir``: where the random 7B model is built when no ``model`` is given (it is reused).
    Returns {"model", "vllm": {...}, "transformers": {...}, "ratio_tokens_per_s",
    "ratio_records_per_s", "same_texts"} (tokens/s: generated tokens over generation seconds).
    A backend that fails shows {"error": ...} instead of its figures.
    """
    model = model or os.environ.get("METAALIGN_GPU_MODEL")
    if not model:
        model = str(build_model(Path(workdir) / f"llama-{shape}-random", shape))
    res: dict = {"model": model, "shape": None if os.environ.get("METAALIGN_GPU_MODEL") else shape,
                 "prompts": n, "max_new_tokens": max_new_tokens, "dtype": dtype}
    for backend in ("vllm", "transformers"):
        cmd = [sys.executable, __file__, "--one", backend, "--model", model, "-n", str(n),
               "--max-new-tokens", str(max_new_tokens), "--dtype", dtype]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            last = [l for l in p.stdout.splitlines() if l.startswith("{")]
            res[backend] = json.loads(last[-1]) if p.returncode == 0 and last else {"error": p.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            res[backend] = {"error": f"timed out after {timeout} s"}
    v, h = res["vllm"], res["transformers"]
    if v.get("tokens_per_s") and h.get("tokens_per_s"):
        res["ratio_tokens_per_s"] = round(v["tokens_per_s"] / h["tokens_per_s"], 2)
        res["ratio_records_per_s"] = round(v["records_per_s"] / h["records_per_s"], 2)
        res["same_texts"] = sum(a == b for a, b in zip(v.pop("texts"), h.pop("texts")))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", choices=["vllm", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("-n", type=int, default=64, help="prompts")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--shape", choices=list(SHAPES), default="7b")
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.n, args.max_new_tokens, args.dtype)))
        return
    print(json.dumps(check_vllm(args.workdir, args.model, args.n, args.max_new_tokens, args.shape, args.dtype),
                     indent=1))


if __name__ == "__main__":
    main()
