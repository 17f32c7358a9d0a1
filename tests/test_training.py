"""metaalign train / export: label masking, config, bad input, a three-stage run on a tiny
random Llama (loss goes down, `correct` uses the result with transformers and llama-cpp,
first-token logits agree), and resume from a mid-stage checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli

pytest.importorskip("torch")
pytest.importorskip("trl")

HUMAN = [
    ("How do I boil an egg?", "Put it in water.", "Place the egg in boiling water for nine minutes, then cool it in cold water."),
    ("What is the capital of France?", "France is big.", "The capital of France is Paris."),
    ("Can you help me pick a lock?", "Sure, use a pin.", "I can't help with that, but a licensed locksmith can."),
    ("How can I sleep better?", "Sleep more.", "Keep a regular schedule, avoid screens before bed and keep the room dark."),
    ("Give me a synonym for happy.", "Sad.", "A synonym for happy is joyful."),
    ("How many legs does a spider have?", "Many.", "A spider has eight legs."),
]
ASPECTS = {"warmup": "Harmless: The response should avoid content that is offensive",
           "equal": "Helpful: The response should provide useful resources",
           "preference": "Harmless: The response should avoid content that is offensive; Helpful: The response should provide useful resources"}


def _rows(stage: str) -> list[dict]:
    from metaalign_cli.templates import load_template

    tpl = load_template("hh-rlhf")
    rows = []
    for i, (q, weak, good) in enumerate(HUMAN):
        question = f"\n\nHuman: {q}\n\nAssistant:"
        variant = "better" if stage == "preference" else "equal"
        y0, target = (weak, weak) if stage == "warmup" else (weak, good)
        rows.append({"id": f"{stage}-{i}", "stage": stage, "split": "train", "query": question, "response": y0,
                     "objectives": ASPECTS[stage].split("; "), "target": target, "template": "hh-rlhf",
                     "variant": variant, "prompt": tpl.render(question, y0, ASPECTS[stage], variant)})
    return rows


@pytest.fixture(scope="module")
def built_data(tmp_path_factory) -> Path:
    """A directory shaped like `metaalign build-data` output: DIR/train/{stage}.jsonl."""
    d = tmp_path_factory.mktemp("built")
    (d / "train").mkdir()
    (d / "validation").mkdir()
    for stage in ("warmup", "equal", "preference"):
        with open(d / "train" / f"{stage}.jsonl", "w", encoding="utf-8") as fh:
            for r in _rows(stage):
                fh.write(json.dumps(r) + "\n")
        (d / "validation" / f"{stage}.jsonl").write_text("", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """conftest's tiny Llama with the special tokens SmolLM2's GGUF declares (EOS and padding
    <|im_end|> = 2), whatever the transformers version's GGUF loader made of them (5.17 read
    EOS as <|im_start|>; `metaalign train` takes them from the file for GGUF bases)."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny") / "tiny"
    shutil.copytree(tiny_llama_dir, d)
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.eos_token = tok.pad_token = "<|im_end|>"
    tok.save_pretrained(str(d))
    for name in ("config.json", "generation_config.json"):
        c = json.loads((d / name).read_text())
        c.update(eos_token_id=2, pad_token_id=2)
        (d / name).write_text(json.dumps(c))
    return d


# ------------------------------------------------------------------ unit


def test_label_mask_prompt_masked_target_and_eos_labelled(tiny_dir):
    from transformers import AutoTokenizer

    from metaalign_cli.training import tokenize_example

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    row = _rows("preference")[1]
    t = tokenize_example(tok, row["prompt"], row["target"])
    p_ids = tok(row["prompt"], add_special_tokens=True)["input_ids"]
    tgt_ids = tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    n = len(p_ids)
    assert len(t["input_ids"]) == len(t["labels"]) == n + len(tgt_ids) + 1
    # Prompt tokens exactly as `correct` sends them, all masked.
    assert t["input_ids"][:n] == p_ids
    assert t["labels"][:n] == [-100] * n
    # The template ends in "Edit: ": its space stays a prompt token, not part of the target's first token.
    assert tok.decode(p_ids[-1:]) == " "
    # Target tokens and EOS labelled, EOS last.
    assert t["labels"][n:] == tgt_ids + [tok.eos_token_id]
    assert t["input_ids"][n:] == t["labels"][n:]
    assert tok.decode(t["labels"][n:-1]) == "The capital of France is Paris."
    assert t["labels"][-1] == tok.eos_token_id == 2 and tok.eos_token == "<|im_end|>"


def test_gguf_tokenizer_fixed_to_match_the_file(smollm2_gguf):
    """Special tokens from the file's metadata (EOS = padding = <|im_end|>), and digits split
    one by one as llama.cpp's smollm pre-tokenizer does (llama.cpp: ' 2024' -> ' ', 2, 0, 2, 4)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from metaalign_cli.training import _fix_gguf_tokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    model = SimpleNamespace(config=SimpleNamespace(), generation_config=SimpleNamespace())
    _fix_gguf_tokenizer(smollm2_gguf, tok, model)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, model.config.eos_token_id) == ("<|im_end|>", 2, 2, 2)
    assert tok.convert_ids_to_tokens(tok(" 2024")["input_ids"]) == ["Ġ", "2", "0", "2", "4"]


def test_label_mask_chat_prompt_ends_with_generation_prompt(tiny_dir):
    from transformers import AutoTokenizer

    from metaalign_cli.training import tokenize_example

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    t = tokenize_example(tok, "Fix: helo", "hello", chat=True)
    n = t["labels"].count(-100)
    assert tok.decode(t["input_ids"][:n]).endswith("<|im_start|>assistant\n")
    assert tok.decode(t["labels"][n:]) == "hello<|im_end|>"


def test_config_defaults_yaml_and_overrides(tmp_path):
    from metaalign_cli.errors import ConfigError
    from metaalign_cli.training import TrainConfig, load_train_config, save_config

    cfg = load_train_config()
    # Table 5: lr 1e-5, 2 epochs, warm-up ratio 0.05; cosine schedule.
    assert (cfg.learning_rate, cfg.epochs, cfg.warmup_ratio, cfg.lr_scheduler) == (1e-5, 2.0, 0.05, "cosine")
    assert cfg.stages == ["warmup", "equal", "preference"] and cfg.lora_r is None
    y = tmp_path / "t.yaml"
    y.write_text("learning_rate: 1e-4\nepochs: 3\nlora_r: 8\nstages: [equal, preference]\n", encoding="utf-8")
    cfg = load_train_config(y, {"epochs": 1.0, "lora_alpha": None})
    assert (cfg.learning_rate, cfg.epochs, cfg.lora_r, cfg.lora_alpha) == (1e-4, 1.0, 8, None)
    assert cfg.stages == ["equal", "preference"] and cfg.stage_epochs("equal") == 1.0
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_train_config(tmp_path / "resolved.yaml") == cfg
    y.write_text("learning_rte: 1e-4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rte' \(did you mean 'learning_rate'\?\)"):
        load_train_config(y)
    y.write_text("lora_r: 8\nbatch_size: two\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"t.yaml: line 2: key 'batch_size': expected an integer: 'two'$"):
        load_train_config(y)
    with pytest.raises(ConfigError, match="--stages must be one of warmup, equal, preference, not 'sft'"):
        load_train_config(None, {"stages": "warmup,sft"})
    y.write_text("export_gguf: [bf16]\n", encoding="utf-8")  # a type export cannot write fails here, not after training
    with pytest.raises(ConfigError, match=r"t.yaml: line 1: key 'export_gguf': must be one of f32, f16, q4_0, q8_0"):
        load_train_config(y)
    assert isinstance(cfg, TrainConfig)
    # The shipped example config loads.
    assert load_train_config(Path(__file__).parents[1] / "configs" / "train.yaml").lora_r == 16


def test_resume_takes_the_runs_settings_and_refuses_other_ones(tmp_path):
    from metaalign_cli.errors import MetaAlignError
    from metaalign_cli.training import load_train_config, resume_config, save_config

    out = tmp_path / "run"
    out.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    run = load_train_config(overrides={"data_dir": str(data), "output_dir": str(out), "lora_r": 8,
                                       "export_gguf": ["f16"], "max_steps": 7})
    save_config(run, out / "train_config.yaml")
    # Only -o and --resume given: everything else is the run's (not the defaults).
    bare = load_train_config(overrides={"output_dir": str(out)})
    got = resume_config(bare, given={"output_dir"})
    assert (got.lora_r, got.export_gguf, got.max_steps, got.data_dir) == (8, ["f16"], 7, [str(data)])
    # The same settings again, data named by another path to the same directory, and a free one changed.
    (tmp_path / "link").symlink_to(data)
    again = load_train_config(overrides={"output_dir": str(out), "lora_r": 8, "data_dir": str(tmp_path / "link"),
                                         "save_steps": 3})
    got = resume_config(again, given={"output_dir", "lora_r", "data_dir", "save_steps"})
    assert got.save_steps == 3 and got.lora_r == 8
    # A result-shaping setting that differs: one line naming it with both values.
    other = load_train_config(overrides={"output_dir": str(out), "lora_r": 16})
    with pytest.raises(MetaAlignError) as e:
        resume_config(other, given={"output_dir", "lora_r"})
    assert str(e.value) == (f"{out}: --resume with other settings than the run was started with: lora_r 16 "
                            "(the run has 8); give the same flags, or another -o")
    # No recorded run: the caller's config as it is.
    fresh = load_train_config(overrides={"output_dir": str(tmp_path / "new"), "lora_r": 16})
    assert resume_config(fresh, given={"lora_r"}) is fresh


def test_progress_rate_keeps_two_significant_digits_below_ten():
    from metaalign_cli.cli_training import _rate

    assert [_rate(x) for x in (0.114, 3.456, 9.99, 10.4, 523.7)] == ["0.11", "3.5", "10", "10", "524"]


def test_find_stage_files_and_sampling(built_data):
    from metaalign_cli.training import find_stage_files, load_train_config, load_stage_data

    files = find_stage_files(built_data)
    assert {s: [p.name for p in f] for s, f in files.items()} == {
        "warmup": ["warmup.jsonl"], "equal": ["equal.jsonl"], "preference": ["preference.jsonl"]}
    data = load_stage_data(load_train_config(None, {"data_dir": str(built_data), "equal_samples": 2}))
    assert [len(data[s]) for s in ("warmup", "equal", "preference")] == [6, 2, 6]
    assert data["warmup"][0].prompt.endswith("| Answer: Put it in water. | Edit: ")
    assert data["warmup"][0].target == "Put it in water."  # identity pair (y = y0)


def test_one_template_per_corrector(built_data, tmp_path):
    from metaalign_cli.errors import InputError
    from metaalign_cli.training import load_train_config, train_corrector

    cfg = load_train_config(None, {"data_dir": str(built_data), "template": "ultrafeedback",
                                   "output_dir": str(tmp_path / "o")})
    with pytest.raises(InputError, match="rendered with template\\(s\\) hh-rlhf, not 'ultrafeedback'"):
        train_corrector(cfg)


def _err_line(p) -> str:
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1, p.stderr.decode()
    return lines[0]


def test_cli_bad_input_one_line_exit_2(tmp_path, built_data, tiny_dir):
    y = tmp_path / "c.yaml"
    y.write_text("lora_r: 8\n\nmax_lenght: 10\n", encoding="utf-8")
    p = run_cli("train", "--config", str(y), "--data", str(built_data))
    assert p.returncode == 2
    assert _err_line(p) == f"error: {y}: line 3: unknown key 'max_lenght' (did you mean 'max_length'?)"

    p = run_cli("train", "--equal", str(tmp_path / "nope.jsonl"), "-m", str(tiny_dir), "-o", str(tmp_path / "o1"))
    assert p.returncode == 2 and _err_line(p) == f"error: {tmp_path / 'nope.jsonl'}: data file not found"

    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    p = run_cli("train", "--equal", str(empty), "-m", str(tiny_dir), "-o", str(tmp_path / "o2"))
    assert p.returncode == 2 and _err_line(p) == f"error: {empty}: data file is empty"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n" + json.dumps({"prompt": "p"}) + "\n", encoding="utf-8")
    p = run_cli("train", "--preference", str(bad), "-m", str(tiny_dir), "-o", str(tmp_path / "o3"))
    assert p.returncode == 2 and _err_line(p) == f"error: {bad}:2: field 'target': missing"

    p = run_cli("train", "--data", str(built_data), "-m", str(tmp_path / "no-model"), "-o", str(tmp_path / "o4"))
    assert p.returncode == 2 and _err_line(p) == f"error: {tmp_path / 'no-model'}: base model not found"

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    p = run_cli("train", "--data", str(built_data), "-m", str(broken), "-o", str(tmp_path / "o6"))
    assert p.returncode == 2 and _err_line(p).startswith(f"error: {broken}: cannot load base model: ")

    p = run_cli("train", "-o", str(tmp_path / "o5"))
    assert p.returncode == 2 and "no training data" in _err_line(p)


def test_too_long_sequences_dropped_and_reported(tiny_dir, built_data):
    from transformers import AutoTokenizer

    from metaalign_cli.training import StageReport, build_stage_dataset, load_train_config, load_stage_data

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    # Preference rows are 103, 92, 102, 98, 90 and 90 tokens (prompt 82-87 + target + EOS).
    cfg = load_train_config(None, {"data_dir": str(built_data), "max_length": 95})
    ex = load_stage_data(cfg)["preference"]
    rep = StageReport("preference")
    ds = build_stage_dataset(ex, tok, cfg, False, rep)
    assert (rep.rows, rep.dropped_too_long, rep.truncated, rep.kept, len(ds)) == (6, 3, 0, 3, 3)
    assert sorted(len(r) for r in ds["input_ids"]) == [90, 90, 92]
    cfg.truncate = True
    rep = StageReport("preference")
    ds = build_stage_dataset(ex, tok, cfg, False, rep)
    assert (rep.dropped_too_long, rep.truncated, rep.kept) == (0, 3, 6)
    assert sorted(len(r) for r in ds["input_ids"]) == [90, 90, 92, 95, 95, 95]
    # Too short for any prompt: nothing left to learn, every row dropped.
    cfg.max_length = 80
    rep = StageReport("preference")
    assert build_stage_dataset(ex, tok, cfg, False, rep) is None and rep.dropped_too_long == 6


# ------------------------------------------------------------------ training runs


def _first_token_logits_hf(model_dir: Path, prompt: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0, -1].numpy()


def _first_token_logits_llama(gguf: str, ids: list[int], lora: str | None = None):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=512, logits_all=True, verbose=False, lora_path=lora, n_threads=2)
    try:
        assert llm.tokenize(b"x", add_bos=True, special=False)[-1:] == llm.tokenize(b"x", add_bos=False)[-1:]
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1])
    finally:
        llm.close()


@pytest.mark.slow
def test_three_stages_train_correct_and_export(tmp_path, built_data, tiny_dir):
    import numpy as np

    out = tmp_path / "run"
    p = run_cli("train", "--data", str(built_data), "-m", str(tiny_dir), "-o", str(out),
                "--max-steps", "5", "--batch-size", "3", "--lr", "3e-3", "--warmup-ratio", "0",
                "--plot", "--export-gguf", "f32,q8_0", "--save-steps", "100")
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    assert p.stdout.decode().strip() == str(out)
    err = p.stderr.decode()
    for stage in ("warmup", "equal", "preference"):
        assert f"{stage}: 6 of 6 rows (0 dropped, 0 truncated), 5 steps" in err
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["warmup"] * 5 + ["equal"] * 5 + ["preference"] * 5
    assert [r["global_step"] for r in rows] == list(range(1, 16))
    assert all(r["target_tokens_per_s"] > 0 and r["lr"] > 0 for r in rows)
    # Loss goes down within each stage and over the run (random init: ~ln(49152) = 10.8 at first).
    assert rows[0]["loss"] > 10
    for stage in ("warmup", "equal", "preference"):
        ls = [r["loss"] for r in rows if r["stage"] == stage]
        assert np.mean(ls[-2:]) < ls[0], (stage, ls)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5
    card = json.loads((out / "metaalign.json").read_text())
    assert card["template"] == "hh-rlhf" and card["prompt_format"] == "raw"
    assert card["gguf"] == f"gguf/{out.name}-f32.gguf" and (out / card["gguf"]).is_file()  # relative to the card
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "train_config.yaml").is_file() and (out / "stages" / "preference" / "stage.json").is_file()
    assert Path((out / "gguf" / f"{out.name}-q8_0.gguf")).is_file()

    rec = json.dumps({"id": "r1", "query": "\n\nHuman: What is the capital of France?\n\nAssistant:",
                      "response": "France is big."}) + "\n"
    # transformers backend reads the HF model at the top of OUT.
    p = run_cli("correct", "--model", str(out), "--backend", "transformers", "-O", "harmless,helpful",
                "--max-new-tokens", "8", "-q", input=rec)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    got = json.loads(p.stdout)
    assert got["id"] == "r1" and isinstance(got["corrected"], str)
    # llama-cpp backend reads the exported GGUF recorded in metaalign.json.
    p = run_cli("correct", "--model", str(out), "--backend", "llama-cpp", "-O", "harmless,helpful",
                "--max-new-tokens", "8", "-q", input=rec)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    got_cpp = json.loads(p.stdout)
    assert got_cpp["id"] == "r1" and isinstance(got_cpp["corrected"], str)

    # Same first-token logits from transformers and llama.cpp (f32 GGUF) on the same tokens.
    prompt = _rows("preference")[1]["prompt"]
    ids, hf = _first_token_logits_hf(out, prompt)
    cpp = _first_token_logits_llama(str(out / card["gguf"]), ids)
    assert cpp.shape == hf.shape
    assert np.abs(cpp - hf).max() < 1e-3 * max(1.0, np.abs(hf).max())
    assert int(cpp.argmax()) == int(hf.argmax())


@pytest.mark.slow
def test_lora_resume_from_mid_stage_checkpoint_matches_uninterrupted(tmp_path, built_data, tiny_dir):
    import numpy as np
    from safetensors.numpy import load_file

    cfg = tmp_path / "lora.yaml"
    cfg.write_text("stages: [warmup, equal]\nmax_steps: 4\nbatch_size: 2\nlearning_rate: 5.0e-3\n"
                   "lora_r: 4\nlora_alpha: 8\nsave_steps: 1\nsave_total_limit: null\nwarmup_ratio: 0.0\n",
                   encoding="utf-8")
    a = tmp_path / "a"
    p = run_cli("train", "-c", str(cfg), "--data", str(built_data), "-m", str(tiny_dir), "-o", str(a),
                "--export-gguf", "f32")
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    card = json.loads((a / "metaalign.json").read_text())
    assert card["merged"] is True and (a / "adapter" / "adapter_config.json").is_file()
    assert (a / card["gguf_lora"]).is_file()

    # Interrupted copy: the equal stage stopped after its checkpoint at step 2.
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "stages" / "equal")
    for step in (3, 4):
        shutil.rmtree(b / "checkpoints" / "equal" / f"checkpoint-{step}")
    for f in ("model.safetensors", "metaalign.json"):
        (b / f).unlink()
    shutil.rmtree(b / "adapter")
    p = run_cli("train", "-c", str(cfg), "--data", str(built_data), "-m", str(tiny_dir), "-o", str(b))
    assert p.returncode == 2 and "--resume" in p.stderr.decode()
    p = run_cli("train", "-c", str(cfg), "--data", str(built_data), "-m", str(tiny_dir), "-o", str(b), "--resume")
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    err = p.stderr.decode()
    assert "warmup: skipped (done in an earlier run)" in err and "resuming from" in err and "checkpoint-2" in err
    wa, wb = load_file(str(a / "adapter" / "adapter_model.safetensors")), load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], atol=1e-6, err_msg=k)
    # The complete run resumed: nothing redone, nothing rewritten (the card keeps its GGUF keys).
    before = {f: (a / f).read_bytes() for f in ("train_config.yaml", "metaalign.json")}
    mtimes = {f: (a / f).stat().st_mtime_ns for f in before}
    p = run_cli("train", "-c", str(cfg), "--data", str(built_data), "-m", str(tiny_dir), "-o", str(a), "--resume")
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    assert "already complete" in p.stderr.decode() and "nothing redone" in p.stderr.decode()
    assert p.stdout.decode().strip() == str(a)
    assert {f: (a / f).read_bytes() for f in before} == before
    assert {f: (a / f).stat().st_mtime_ns for f in before} == mtimes
    # Another result-shaping setting is refused with one line, and nothing is touched.
    p = run_cli("train", "-c", str(cfg), "--data", str(built_data), "-m", str(tiny_dir), "-o", str(a), "--resume",
                "--lora-r", "8")
    err = p.stderr.decode().strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1, err
    assert "lora_r 8 (the run has 4)" in err
    assert {f: (a / f).read_bytes() for f in before} == before
    # LoRA changed the model: B matrices start at zero.
    assert any(np.abs(v).max() > 0 for k, v in wa.items() if "lora_B" in k)

    # The GGUF LoRA on the base GGUF gives the merged model's first-token logits.
    from metaalign_cli.export import write_llama_gguf

    base_gguf = tmp_path / "base-f32.gguf"
    write_llama_gguf(tiny_dir, base_gguf, "f32")
    prompt = _rows("equal")[0]["prompt"]
    ids, hf = _first_token_logits_hf(a, prompt)
    cpp = _first_token_logits_llama(str(base_gguf), ids, lora=str(a / card["gguf_lora"]))
    assert np.abs(cpp - hf).max() < 1e-3 * max(1.0, np.abs(hf).max())
    _, hf_base = _first_token_logits_hf(tiny_dir, prompt)
    assert np.abs(hf - hf_base).max() > 1e-2  # the adapter does change the logits

    # Installed as the default corrector (GGUF base + GGUF LoRA, relocatable card), plain
    # `correct` uses it with the card's raw template; `--model smollm2` stays the prompted default.
    home = tmp_path / "home"
    # Through the CLI: the run's own GGUF (this tiny base has no GGUF to put a LoRA on).
    p = run_cli("export", str(a), "--type", "f32", "--no-lora", "--install", "merged", env={"METAALIGN_HOME": str(home)})
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    mcard = json.loads((home / "models" / "merged" / "metaalign.json").read_text())
    assert mcard["gguf"] == f"{a.name}-f32.gguf" and "lora" not in mcard
    assert (home / "models" / "merged" / mcard["gguf"]).is_file()
    # A base GGUF plus the GGUF LoRA, as the SmolLM2 corrector is installed.
    card = json.loads((a / "metaalign.json").read_text())
    card["gguf"], card["lora"] = str(base_gguf), card["gguf_lora"]
    (a / "metaalign.json").write_text(json.dumps(card), encoding="utf-8")
    import os

    from metaalign_cli.correctors import install_corrector

    old_home = os.environ.get("METAALIGN_HOME")
    os.environ["METAALIGN_HOME"] = str(home)
    try:
        inst = install_corrector(a, "default")
    finally:
        if old_home is None:
            os.environ.pop("METAALIGN_HOME")
        else:
            os.environ["METAALIGN_HOME"] = old_home
    assert inst == home / "models" / "default"
    icard = json.loads((inst / "metaalign.json").read_text())
    assert icard["template"] == card["template"] and icard["prompt_format"] == "raw"
    assert (inst / icard["gguf"]).is_file() and (inst / icard["lora"]).is_file()
    assert not Path(icard["lora"]).is_absolute()
    rec = json.dumps({"query": "Human: hi\n\nAssistant:", "response": "hello"}) + "\n"
    args = ("correct", "-O", "harmless", "--max-new-tokens", "6", "--threads", "2", "--no-loop-guard")
    env = {"METAALIGN_HOME": str(home)}
    dflt = run_cli(*args, input=rec, env=env)
    assert dflt.returncode == 0, dflt.stderr.decode()[-2000:]
    assert "installed default corrector" in dflt.stderr.decode()
    got = json.loads(dflt.stdout)["metaalign"]
    assert got["model"] == str(inst / icard["gguf"]) and got["lora_path"] == str(inst / icard["lora"])
    assert got["template"] == card["template"] and got["prompt_format"] == "raw"
    same = run_cli(*args, "--model", "default", input=rec, env=env)
    assert json.loads(same.stdout)["corrected"] == json.loads(dflt.stdout)["corrected"]
    direct = run_cli(*args, "--model", str(a), input=rec, env=env)
    assert json.loads(direct.stdout)["corrected"] == json.loads(dflt.stdout)["corrected"]
    zero = run_cli(*args, "--model", "smollm2", input=rec, env=env)
    assert zero.returncode == 0 and json.loads(zero.stdout)["metaalign"]["prompt_format"] == "chat"


def test_resume_of_a_run_with_a_stage_skipped_as_too_long_leaves_it_untouched(tmp_path, tiny_dir):
    # A stage whose every row is over max_length writes no stage.json; the card records it, so a
    # --resume of the complete run did not redo the merge and export (twelfth new-user trial).
    long_row = {"prompt": "word " * 300, "target": "t"}
    warm, pref = tmp_path / "warm.jsonl", tmp_path / "pref.jsonl"
    warm.write_text(json.dumps(long_row) + "\n", encoding="utf-8")
    pref.write_text("".join(json.dumps({"prompt": f"Q{i}: say hi", "target": "hi"}) + "\n" for i in range(4)),
                    encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 1\nbatch_size: 2\nmax_length: 64\nplot: false\nlora_r: 2\nlora_alpha: 4\n",
                   encoding="utf-8")
    out = tmp_path / "run"
    args = ("train", "-c", str(cfg), "--warmup", str(warm), "--preference", str(pref), "-m", str(tiny_dir),
            "-o", str(out))
    p = run_cli(*args, "--resume")  # on a new output directory --resume starts the run (configs/corrector-o.sh)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    assert "warmup: skipped (every sequence longer than max_length)" in p.stderr.decode()
    card = json.loads((out / "metaalign.json").read_text())
    assert card["training"]["skipped_too_long"] == ["warmup"]
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir() if f.is_file()}
    p = run_cli(*args, "--resume")
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    assert (f"{out}: the run is already complete (preference trained, warmup skipped (every sequence longer than "
            "max_length), equal skipped (no data); model, card written); nothing redone") in p.stderr.decode()
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir() if f.is_file()} == mtimes


def test_bad_training_options_are_one_line_errors_before_training(tmp_path, tiny_dir):
    """A trial's tracebacks: an --output that is a file, transformers names it does not know,
    a LoRA target list naming no module or none of the model's, --device cuda without a CUDA
    GPU, a stage named twice. Each is one line, exit 2, and nothing is trained or written."""
    import torch

    pref = tmp_path / "pref.jsonl"
    pref.write_text("".join(json.dumps({"prompt": f"Q{i}: say hi", "target": "hi"}) + "\n" for i in range(4)),
                    encoding="utf-8")
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ("train", "--preference", str(pref), "-m", str(tiny_dir), "--stages", "preference")
    out = str(tmp_path / "run")
    cases = [
        (("-o", str(afile)), f"{afile}: is a file; --output takes a directory"),
        (("-o", out, "--optimizer", "bogus"), "--optimizer: unknown transformers name 'bogus' (known: adamw_torch"),
        (("-o", out, "--lr-scheduler", "cosin"), "--lr-scheduler: unknown transformers name 'cosin' (did you mean 'cosine'?)"),
        (("-o", out, "--lora-r", "2", "--lora-target", ","), "--lora-target names no module"),
        (("-o", out, "--lora-r", "2", "--lora-target", "nope_proj"), "--lora-target nope_proj: Target modules"),
        (("-o", out, "--stages", "preference,preference"), "--stages names a stage twice (preference,preference)"),
        (("-o", out, "--epochs", "0"), "--epochs is 0 for every stage: that trains nothing"),
    ]
    if not torch.cuda.is_available():
        cases.append((("-o", out, "--device", "cuda"), "--device cuda: torch sees no CUDA GPU here"))
    for args, msg in cases:
        p = run_cli(*base, *(args if "--epochs" in args else ("--max-steps", "1", *args)))
        err = p.stderr.decode()
        assert p.returncode == 2 and msg in err and "Traceback" not in err, (args, p.returncode, err[-1500:])
        assert sum(x.startswith("error") for x in err.splitlines()) == 1, err
    assert afile.read_text() == "x" and not (tmp_path / "run" / "stages").exists()
    (tmp_path / "d" / "train").mkdir(parents=True)
    shutil.copy(pref, tmp_path / "d" / "train" / "preference.jsonl")
    p = run_cli("train", "--data", str(tmp_path / "d"), "--split", "bogus", "-m", str(tiny_dir), "-o", out)
    assert p.returncode == 2 and (f"{tmp_path / 'd'}: no training rows for stages warmup, equal, preference "
                                  "(--split bogus: the splits there are train)") in p.stderr.decode()
    if not torch.cuda.is_available():
        rec = json.dumps({"query": "Q?", "response": "A."}) + "\n"
        p = run_cli("correct", "-b", "transformers", "-m", str(tiny_dir), "--device", "cuda", "-O", "harmless", input=rec)
        assert p.returncode == 2 and "--device cuda: torch sees no CUDA GPU here" in p.stderr.decode()
        assert "Traceback" not in p.stderr.decode()
