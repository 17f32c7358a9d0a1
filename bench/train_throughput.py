"""Training throughput: a plain transformers ``Trainer`` loop vs ``metaalign train``'s stage.

Same model, same tokenized rows (prompt masked, target + EOS labelled), same batch size,
sequence cap, precision and number of optimizer steps. The plain loop samples batches at
random and pads each to its longest row; ours is ``training._build_trainer`` (TRL's
SFTTrainer with length grouping on CPU/sdpa, packing with flash-attention 2). Each side runs
in its own subprocess so peak RSS is its own. Prints target tokens/s, peak RSS and the ratios.

    python bench/train_throughput.py                       # SmolLM2-135M (embedded GGUF), synthetic rows
    python bench/train_throughput.py --data runs/built --model HF_DIR --steps 30 --batch-size 8

Target (issue 4): ours >= 1.2x the plain loop's target tokens/s, peak memory no higher.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def synthetic_examples(n: int, seed: int = 0):
    """Rows with the length spread of real HH-RLHF correction data: short and long
    dialogues and responses (so padding to the longest row in a random batch costs a lot)."""
    from metaalign_cli.templates import load_template
    from metaalign_cli.training import TrainingExample

    rng = random.Random(seed)
    words = ("the a to of and you can it is that for in be with this help your about what how not "
             "would will should please could think people make time good know want need way").split()
    tpl = load_template("hh-rlhf")

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."

    out = []
    for _ in range(n):
        q = f"\n\nHuman: {text(rng.choice([8, 15, 40, 120]))}\n\nAssistant:"
        weak, good = text(rng.choice([5, 20, 60, 150])), text(rng.choice([10, 30, 80, 200]))
        out.append(TrainingExample(tpl.render(q, weak, "Harmless: The response should avoid content that is offensive", "better"), good))
    return out


def load_examples(args):
    if args.data:
        from metaalign_cli.training import load_stage_data, load_train_config

        cfg = load_train_config(None, {"data_dir": args.data, "stages": args.stage})
        ex = load_stage_data(cfg)[args.stage]
        random.Random(0).shuffle(ex)
        return ex[: args.rows]
    return synthetic_examples(args.rows)


def run_side(args) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from metaalign_cli.models import resolve_base_model
    from metaalign_cli.training import StageReport, _build_trainer, build_stage_dataset, load_base_model, load_train_config

    torch.manual_seed(0)
    cfg = load_train_config(None, {"max_length": args.max_length, "batch_size": args.batch_size,
                                   "max_steps": args.steps, "learning_rate": 1e-5, "precision": args.precision,
                                   "output_dir": args.out, "save_steps": 10 ** 6, "logging_steps": 10 ** 6})
    model, tok = load_base_model(resolve_base_model(args.model))
    ds = build_stage_dataset(load_examples(args), tok, cfg, False, StageReport("bench"))
    counted = {"n": 0}

    def count(inputs):
        counted["n"] += int((inputs["labels"] != -100).sum())

    if args.side == "plain":
        class Plain(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                count(inputs)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        targs = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                  learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0.05,
                                  optim="adamw_torch", bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
                                  save_strategy="no", report_to="none", disable_tqdm=True, seed=cfg.seed,
                                  logging_steps=10 ** 6, dataloader_num_workers=0)
        trainer = Plain(model=model, args=targs, train_dataset=ds,
                        data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
    else:
        from metaalign_cli.training import _sft_config, pick_precision

        device = "cuda" if torch.cuda.is_available() else "cpu"
        from metaalign_cli.backends.hf import pick_attention

        precision = pick_precision(cfg, device)
        attn = pick_attention(device, torch.bfloat16 if precision == "bf16" else torch.float32)
        pack = attn == "flash_attention_2"
        sft = _sft_config(cfg, "preference", Path(args.out), precision, pack, not pack, device)
        trainer = _build_trainer(model, tok, ds, sft, "preference", Path(args.out) / "metrics.jsonl", None, 0)
        orig = trainer.compute_loss

        def wrapped(model, inputs, return_outputs=False, num_items_in_batch=None):
            count(inputs)
            return orig(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        trainer.compute_loss = wrapped
    t0 = time.perf_counter()
    res = trainer.train()
    secs = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"side": args.side, "steps": trainer.state.global_step, "target_tokens": counted["n"],
            "seconds": round(secs, 2), "target_tokens_per_s": round(counted["n"] / secs, 1),
            "peak_rss_mb": round(rss_mb, 1), "train_loss": round(res.training_loss, 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Base model (default: embedded SmolLM2-135M-Instruct GGUF).")
    ap.add_argument("--data", default=None, help="build-data output directory (default: synthetic rows).")
    ap.add_argument("--stage", default="preference")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--side", choices=["plain", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.side:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        print(json.dumps(run_side(args)))
        return
    import tempfile

    results = {}
    for side in ("plain", "ours"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--side", side, "--out", tmp] + sum(
                ([f"--{k.replace('_', '-')}", str(v)] for k, v in vars(args).items()
                 if v is not None and k not in ("side", "out")), [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{side} run failed:\n{p.stderr[-3000:]}")
            results[side] = json.loads(p.stdout.strip().splitlines()[-1])
    a, b = results["plain"], results["ours"]
    print(f"model={args.model or 'SmolLM2-135M-Instruct (embedded GGUF)'} data={args.data or 'synthetic'} "
          f"rows={args.rows} steps={args.steps} batch={args.batch_size} max_length={args.max_length} "
          f"precision={args.precision}")
    print(f"{'':24}{'plain Trainer':>16}{'metaalign train':>18}{'ratio':>10}")
    for key, label in (("target_tokens_per_s", "target tokens/s"), ("peak_rss_mb", "peak RSS (MB)"),
                       ("seconds", "seconds"), ("target_tokens", "target tokens"), ("train_loss", "train loss")):
        ratio = b[key] / a[key] if a[key] else float("nan")
        print(f"{label:24}{a[key]:>16}{b[key]:>18}{ratio:>10.2f}")


if __name__ == "__main__":
    main()
