"""One rank of the FSDP2 check in tests/test_distributed.py, started by torchrun over gloo.

accelerate 1.15 runs FSDP only on accelerators (``DistributedType.FSDP`` is set for the
MULTI_GPU-like types only), so on a CPU the Trainer cannot shard. This worker shards the tiny
Llama with torch's own ``fully_shard`` (FSDP2) on a CPU device mesh, trains every stage a
few optimizer steps with a plain loop on its share of the rows, and then goes through the
same code ``metaalign train`` uses after each stage and at the end:
``save_stage_weights`` (gather the full state dict from the shards, write on rank 0) and,
on rank 0 behind a barrier, ``finalize_run`` (final model, LoRA merge, card, GGUF export).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp2_worker.py
TINY_DIR DATA_DIR OUT_DIR. Rank 0 prints one JSON line per mode (full, lora) starting with
``RESULT ``: world size, distributed type, how far the saved files are from the weights the
ranks hold (max abs difference) and the paths written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(tiny: str, data_dir: str, out_root: str) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import PartialState
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from metaalign_cli.training import (STAGES, StageReport, build_stage_dataset, finalize_run, load_base_model,
                                        load_stage_data, load_train_config, lora_config, process_info,
                                        save_stage_weights)

    state = PartialState(cpu=True)
    world, rank = state.num_processes, state.process_index
    mesh = init_device_mesh("cpu", (world,))
    for mode in ("full", "lora"):
        out = Path(out_root) / mode
        over = {"data_dir": data_dir, "output_dir": str(out), "export_gguf": "f16", "seed": 0}
        if mode == "lora":
            over.update(lora_r=4, lora_alpha=8, lora_dropout=0.0)
        cfg = load_train_config(None, over)
        torch.manual_seed(0)
        model, tok = load_base_model(tiny)
        if mode == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(cfg))
        for m in list(model.modules()):
            if isinstance(m, LlamaDecoderLayer):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert isinstance(model, FSDPModule)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        data = load_stage_data(cfg)
        model.train()
        for stage in STAGES:
            rep = StageReport(stage)
            ds = build_stage_dataset(data[stage], tok, cfg, False, rep)
            mine = [ds[i] for i in range(rank, len(ds), world)][:2]  # this rank's rows, 2 steps
            for row in mine:
                ids = torch.tensor([row["input_ids"]])
                loss = model(input_ids=ids, labels=torch.tensor([row["labels"]]), use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
            info = {"stage": stage, "steps": len(mine), "final_loss": float(loss.detach()), **process_info(state)}
            save_stage_weights(model, tok, out / "stages" / stage, state, None, info)
        # What the ranks hold: every shard gathered into full tensors (collective).
        held = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                for k, v in model.state_dict().items()}
        sharded = sum(isinstance(v, DTensor) for v in model.state_dict().values())
        state.wait_for_everyone()
        if state.is_main_process:
            last = out / "stages" / STAGES[-1]
            card, gguf = finalize_run(tok, cfg, out, "hh-rlhf", "raw", tiny, mode == "lora", last,
                                      {**process_info(state), "device": "cpu", "precision": "fp32"})
            res = {"mode": mode, "world_size": world, "distributed_type": process_info(state)["distributed_type"],
                   "group_size": dist.get_world_size(), "sharded_tensors": sharded, "card": card, "gguf": gguf}
            if mode == "full":
                saved = load_file(str(out / "model.safetensors"))
                stage_saved = load_file(str(last / "model.safetensors"))
                res["keys_missing"] = sorted(set(held) - set(saved) - {"lm_head.weight"})
                res["keys_extra"] = sorted(set(saved) - set(held))
                res["lm_head_saved"] = "lm_head.weight" in saved
                res["max_diff_top"] = max(float((saved[k] - held[k]).abs().max()) for k in saved)
                res["max_diff_stage"] = max(float((stage_saved[k] - held[k]).abs().max()) for k in stage_saved)
                base = load_file(str(Path(tiny) / "model.safetensors"))
                res["max_change_from_base"] = max(float((saved[k] - base[k]).abs().max()) for k in saved)
            else:
                adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
                # peft's saved names drop the adapter name ("default") the live module has.
                live = {k.replace(".default", ""): v for k, v in held.items() if "lora_" in k}
                res["adapter_tensors"] = len(adapter)
                res["max_diff_adapter"] = max(float((adapter[k] - live[k]).abs().max()) for k in adapter)
                res["max_lora_b"] = max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k)
                # The merged top-level weights are base + (alpha / r) * B @ A of what the ranks hold.
                merged = load_file(str(out / "model.safetensors"))
                diffs = []
                for k, w in merged.items():
                    pre = "base_model.model." + k.removesuffix(".weight")
                    a, b = held.get(pre + ".lora_A.default.weight"), held.get(pre + ".lora_B.default.weight")
                    if a is None:
                        expect = held.get("base_model.model." + k, held.get(pre + ".base_layer.weight"))
                        if expect is None:
                            continue
                    else:
                        expect = held[pre + ".base_layer.weight"] + (cfg.lora_alpha / cfg.lora_r) * (b @ a)
                    diffs.append(float((w - expect).abs().max()))
                res["merged_tensors_checked"] = len(diffs)
                res["max_diff_merged"] = max(diffs)
            print("RESULT " + json.dumps(res), flush=True)
        state.wait_for_everyone()
        del model, opt


if __name__ == "__main__":
    main(*sys.argv[1:4])
