"""Training on several processes, on this CPU machine: 2 ranks over gloo.

Which launcher forms one process group here (checked with accelerate 1.15 / torch 2.13):
``accelerate launch --cpu --num_processes 2`` goes through accelerate's simple launcher,
which starts ONE plain process (``DistributedType.NO``) unless an mpirun hostfile is given;
``torchrun --nproc_per_node 2`` (``python -m torch.distributed.run``) starts two ranks whose
TrainingArguments(use_cpu=True) make one gloo group (``DistributedType.MULTI_CPU``), with or
without ``ACCELERATE_USE_CPU=true``. So these tests launch torchrun, and each asserts from
inside the run (the card and stage.json record the group's size and accelerate's type, the
step count shows the rows were split between the ranks) that the ranks formed one group.

- DDP through ``metaalign train``: full fine-tuning and LoRA, all three stages,
  ``--export-gguf``; a LoRA run with one rank killed mid-stage and then ``--resume``d.
- FSDP2: accelerate runs FSDP only on accelerators, so ``tests/fsdp2_worker.py`` shards with
  torch's ``fully_shard`` over gloo and goes through the same save/finalize code.
- DeepSpeed cannot run here (see docs/train.md): it is in bench/gpu_check.py.

Plus the GPU-path decisions that can be checked without a GPU (attention, dtype, OOM retry,
report_to).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from test_training import _first_token_logits_hf, _first_token_logits_llama, _rows, built_data, tiny_dir  # noqa: F401

pytest.importorskip("torch")
pytest.importorskip("trl")


def _env() -> dict:
    e = dict(os.environ)
    # Two ranks on a 2-core machine: one thread each.
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return e


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _train_cmd(data: Path, tiny: Path, out: Path, *extra: str) -> list[str]:
    return _torchrun("-m", "metaalign_cli", "train", "--data", str(data), "-m", str(tiny), "-o", str(out),
                     "--device", "cpu", "--epochs", "1", "--batch-size", "1", "--warmup-ratio", "0",
                     "--lr", "3e-3", *extra)


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, env=_env(), cwd=REPO, timeout=timeout)


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_one_group(out: Path, steps: dict[str, int], whole_metrics=("warmup", "equal", "preference")) -> dict:
    """From inside the run: 2 ranks in one MULTI_CPU group, and each stage's 6 rows split
    between them (3 steps of batch 1 per rank and epoch, where one process would take 6)."""
    card = json.loads((out / "metaalign.json").read_text())
    assert card["training"]["world_size"] == 2 and card["training"]["distributed_type"] == "MULTI_CPU"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for s, n in steps.items():
        info = json.loads((out / "stages" / s / "stage.json").read_text())
        assert (info["world_size"], info["distributed_type"], info["rows"]) == (2, "MULTI_CPU", 6)
        assert info["steps"] == n, info
        mine = [r for r in rows if r["stage"] == s]
        assert mine[-1]["step"] == n and mine[-1]["world_size"] == 2
        assert all(r["target_tokens_per_s"] > 0 for r in mine)
        if s in whole_metrics:
            # One writer (rank 0): one line per step; the target tokens summed over both
            # ranks reach the stage's total at its last step.
            assert [r["step"] for r in mine] == list(range(1, n + 1))
            assert mine[-1]["target_tokens"] == info["target_tokens"]
    return card


@pytest.mark.slow
def test_ddp_full_finetune_three_stages_export(tmp_path, built_data, tiny_dir):
    out = tmp_path / "ddp-full"
    p = _run(_train_cmd(built_data, tiny_dir, out, "--export-gguf", "f16", "--save-steps", "100"))
    err = p.stderr.decode()
    assert p.returncode == 0, err[-4000:]
    # Data on stdout once (rank 0), the summary once.
    assert p.stdout.decode().splitlines() == [str(out)]
    assert err.count("trained corrector written to") == 1 and "training on 2 processes (MULTI_CPU)" in err
    card = _assert_one_group(out, {"warmup": 3, "equal": 3, "preference": 3})
    assert card["merged"] is True and card["gguf"] == "gguf/ddp-full-f16.gguf"  # relative to the card
    assert (out / card["gguf"]).is_file()
    # The saved model is what the ranks trained: the Trainer's own last checkpoint of the
    # preference stage (written through accelerate) holds the same tensors, and it moved
    # away from the base.
    top = _load(out / "model.safetensors")
    ck = _load(out / "checkpoints" / "preference" / "checkpoint-3" / "model.safetensors")
    base = _load(tiny_dir / "model.safetensors")
    assert top.keys() == ck.keys() == base.keys()
    for k in top:
        assert (top[k] - ck[k]).abs().max() == 0, k
    assert max(float((top[k] - base[k]).abs().max()) for k in top) > 1e-3
    # It loads, and the exported GGUF gives its first-token logits.
    prompt = _rows("preference")[1]["prompt"]
    ids, hf = _first_token_logits_hf(out, prompt)
    cpp = _first_token_logits_llama(str(out / card["gguf"]), ids)
    import numpy as np

    assert np.abs(cpp - hf).max() < 2e-2 * max(1.0, np.abs(hf).max())  # f16 GGUF
    assert int(cpp.argmax()) == int(hf.argmax())


def _children_by_rank(proc: subprocess.Popen, timeout: float = 120) -> dict[int, int]:
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        for c in psutil.Process(proc.pid).children(recursive=True):
            try:
                r = c.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if r is not None:
                found[int(r)] = c.pid
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError("torchrun did not start 2 ranks")


@pytest.mark.slow
def test_ddp_lora_rank_killed_mid_stage_then_resume(tmp_path, built_data, tiny_dir):
    pytest.importorskip("psutil")
    out = tmp_path / "ddp-lora"
    # The equal stage runs 9 steps per rank (3 epochs of 3), checkpointing every step.
    cmd = _train_cmd(built_data, tiny_dir, out, "--lora-r", "4", "--lora-alpha", "8", "--save-steps", "1",
                     "--equal-epochs", "3", "--export-gguf", "f16")
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    try:
        ranks = _children_by_rank(proc)
        ck = out / "checkpoints" / "equal" / "checkpoint-2" / "trainer_state.json"
        deadline = time.time() + 240
        while not ck.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ck.exists(), (tmp_path / "first.log").read_text()[-3000:]
        os.kill(ranks[1], signal.SIGKILL)  # rank 1 dies mid-stage
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert rc != 0  # torchrun reports the dead rank and stops the other
    assert (out / "stages" / "warmup" / "stage.json").is_file()
    assert not (out / "stages" / "equal" / "stage.json").exists()
    done_before = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints" / "equal").glob("checkpoint-*"))
    assert 2 <= max(done_before) < 9

    p = _run(cmd + ["--resume"])
    err = p.stderr.decode()
    assert p.returncode == 0, err[-4000:]
    assert "warmup: skipped (done in an earlier run)" in err
    assert "equal: resuming from" in err and str(out / "checkpoints" / "equal" / "checkpoint-") in err
    assert p.stdout.decode().splitlines() == [str(out)]
    # The resumed equal stage ends at step 9 (its steps before the kill were logged by the
    # first run); warm-up's and preference's metrics are whole.
    card = _assert_one_group(out, {"warmup": 3, "equal": 9, "preference": 3}, whole_metrics=("warmup", "preference"))
    assert card["merged"] is True and card["lora_r"] == 4
    assert (out / card["gguf"]).is_file() and (out / card["gguf_lora"]).is_file()
    # The adapter saved at the top is the one the ranks trained: the Trainer's own last
    # checkpoint of the preference stage holds the same tensors.
    top = _load(out / "adapter" / "adapter_model.safetensors")
    ck = _load(out / "checkpoints" / "preference" / "checkpoint-3" / "adapter_model.safetensors")
    assert top.keys() == ck.keys() and len(top) > 0
    for k in top:
        assert (top[k] - ck[k]).abs().max() == 0, k
    assert max(float(v.abs().max()) for k, v in top.items() if "lora_B" in k) > 0  # B starts at 0
    # The merged model = base + (alpha / r) B A, and it loads.
    merged, base = _load(out / "model.safetensors"), _load(tiny_dir / "model.safetensors")
    k = "model.layers.0.self_attn.q_proj.weight"
    a = top["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = top["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert (merged[k] - (base[k] + 2.0 * b @ a)).abs().max() < 1e-6
    ids, hf = _first_token_logits_hf(out, _rows("equal")[0]["prompt"])
    assert hf.shape[0] > 1000


@pytest.mark.slow
def test_fsdp2_full_and_lora_saves_gather_the_shards(tmp_path, built_data, tiny_dir):
    """torch's fully_shard over gloo (accelerate will not run FSDP on a CPU): the stage
    weights, final model, LoRA adapter and merged model written by metaalign's save path are
    the full tensors the two ranks hold, and the GGUF export runs."""
    p = _run(_torchrun(str(REPO / "tests" / "fsdp2_worker.py"), str(tiny_dir), str(built_data), str(tmp_path)))
    assert p.returncode == 0, p.stderr.decode()[-4000:]
    res = {r["mode"]: r for r in (json.loads(l[len("RESULT "):]) for l in p.stdout.decode().splitlines()
                                  if l.startswith("RESULT "))}
    assert set(res) == {"full", "lora"}
    for r in res.values():
        assert (r["world_size"], r["group_size"], r["distributed_type"]) == (2, 2, "MULTI_CPU")
        assert r["sharded_tensors"] > 10  # the parameters really were DTensor shards
        assert r["card"]["training"]["world_size"] == 2 and Path(r["gguf"]["f16"]).is_file()
    full = res["full"]
    assert full["keys_missing"] == [] and full["keys_extra"] == [] and not full["lm_head_saved"]
    assert full["max_diff_top"] == 0 and full["max_diff_stage"] == 0
    assert full["max_change_from_base"] > 1e-3
    lora = res["lora"]
    assert lora["adapter_tensors"] == 28 and lora["max_diff_adapter"] == 0 and lora["max_lora_b"] > 0
    assert lora["merged_tensors_checked"] == 20 and lora["max_diff_merged"] < 1e-6
    assert Path(lora["gguf"]["lora"]).is_file() and lora["card"]["merged_dtype"] == "float32"


# ------------------------------------------------------------------ GPU-path decisions on a CPU


def test_pick_attention_only_where_flash_attention_runs(monkeypatch, tmp_path):
    import torch
    import transformers.utils

    from metaalign_cli.backends import hf

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    # An importable flash_attn (stands in for a build that matches torch).
    good = tmp_path / "good"
    (good / "flash_attn").mkdir(parents=True)
    (good / "flash_attn" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(good))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert hf.pick_attention("cuda", torch.bfloat16) == "flash_attention_2"
    assert hf.pick_attention("cuda", torch.float16) == "flash_attention_2"
    assert hf.pick_attention("cuda", torch.float32) == "sdpa"  # flash-attn rejects fp32
    assert hf.pick_attention("cuda", None) == "sdpa"
    assert hf.pick_attention("cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))  # V100
    assert hf.pick_attention("cuda", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert hf.pick_attention("cuda", torch.bfloat16) == "sdpa"
    # A flash-attn wheel built for another torch: metadata says yes, the import fails.
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    bad = tmp_path / "bad"
    (bad / "flash_attn").mkdir(parents=True)
    (bad / "flash_attn" / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')")
    monkeypatch.syspath_prepend(str(bad))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    assert hf.pick_attention("cuda", torch.bfloat16) == "sdpa"


def test_bf16_only_where_native(monkeypatch):
    import torch

    from metaalign_cli.backends import hf
    from metaalign_cli.training import load_train_config, pick_precision

    # torch's answer on a V100: bf16 "supported" by emulation, not natively.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert hf.pick_dtype("cuda") == torch.float32
    assert pick_precision(load_train_config(), "cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100/H100
    assert hf.pick_dtype("cuda") == torch.bfloat16 and hf.pick_dtype("cuda:1") == torch.bfloat16
    assert pick_precision(load_train_config(), "cuda") == "bf16"
    assert hf.pick_dtype("cpu") == torch.float32 and pick_precision(load_train_config(), "cpu") == "fp32"
    assert hf.pick_dtype("cuda", "fp32") == torch.float32


def test_out_of_memory_halves_the_batch_and_matches_one_by_one(tiny_llama_dir, capfd):
    import torch

    from metaalign_cli.backends.base import GenerationSettings, Prompt
    from metaalign_cli.backends.hf import TransformersBackend

    be = TransformersBackend(str(tiny_llama_dir), device="cpu", batch_size=8)
    assert be.info()["device"] == "cpu" and be.info()["dtype"] == "float32"
    prompts = [Prompt(f"Question {i}: " + "word " * (i * 3)) for i in range(5)]
    settings = GenerationSettings(max_new_tokens=6, loop_guard=False)
    one = [be.generate([p], settings)[0] for p in prompts]
    real = be.model.generate
    sizes = []

    def tight_memory(*a, **kw):  # as if CUDA could hold at most 2 sequences
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **kw)

    be.model.generate = tight_memory
    got = be.generate(prompts, settings)
    assert [g.text for g in got] == [g.text for g in one]
    assert all(g.completion_tokens == 6 for g in got)
    assert sizes == [5, 2, 2, 1] and be.batch_size == 2
    assert "CUDA out of memory at batch size 5; retrying at 2" in capfd.readouterr().err
    # A single prompt that still does not fit fails alone, as that record's error.
    be.model.generate = lambda *a, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory"))
    got = be.generate(prompts[:1], settings)
    assert isinstance(got[0], torch.OutOfMemoryError)


def test_report_to_checked_before_loading(tmp_path, built_data, tiny_dir):
    from metaalign_cli.errors import ConfigError
    from metaalign_cli.training import check_report_to, load_train_config

    assert load_train_config().report_to == ["none"]
    assert load_train_config(None, {"report_to": "TensorBoard, wandb"}).report_to == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="--report-to 'none' cannot be combined"):
        load_train_config(None, {"report_to": "none,wandb"})
    with pytest.raises(ConfigError, match="--report-to: unknown tracker 'tensorbored'"):
        check_report_to(["tensorbored"])
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        p = run_cli("train", "--data", str(built_data), "-m", str(tiny_dir), "-o", str(tmp_path / "o"),
                    "--report-to", "mlflow")
        assert p.returncode == 2
        assert p.stderr.decode().strip() == "error: --report-to: 'mlflow' is not installed (pip install mlflow)"
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_report_to_tensorboard_gets_the_logged_values(tmp_path, built_data, tiny_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    p = run_cli("train", "--data", str(built_data), "-m", str(tiny_dir), "-o", str(out), "--stages", "warmup",
                "--max-steps", "2", "--batch-size", "2", "--report-to", "tensorboard", "-q")
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    events = list((out / "checkpoints" / "warmup").glob("runs/*/events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/target_tokens_per_s", "train/target_tokens"} <= set(tags)
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert loss == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    tps = [e.value for e in acc.Scalars("train/target_tokens_per_s")]
    assert tps == pytest.approx([r["target_tokens_per_s"] for r in rows], rel=1e-6)


def test_half_written_checkpoint_is_not_resumed_from(tmp_path):
    from metaalign_cli.training import _latest_checkpoint

    d = tmp_path / "checkpoints" / "equal"
    for n in (2, 4, 6):
        (d / f"checkpoint-{n}").mkdir(parents=True)
    for n in (2, 4):
        (d / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    # checkpoint-6 lacks trainer_state.json: the run was killed while writing it.
    assert _latest_checkpoint(d) == d / "checkpoint-4"
    assert _latest_checkpoint(tmp_path / "none") is None
