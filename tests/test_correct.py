"""`metaalign correct` end to end: real SmolLM2 GGUF, tiny random Llama through transformers,
llama-cpp-python's OpenAI-compatible server, bad inputs, resume after a kill, long inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import CASES, REPO, kill_when_lines, run_cli, signal_when_lines

EX = REPO / "examples" / "hh-rlhf.jsonl"


def lines(b: bytes) -> list[dict]:
    return [json.loads(l) for l in b.decode("utf-8").splitlines() if l.strip()]


def two_records() -> str:
    return "".join(EX.read_text(encoding="utf-8").splitlines(keepends=True)[:2])


def test_help_is_light():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "metaalign_cli", "--help"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "correct" in out.stdout
    heavy = [l for l in out.stderr.splitlines() if l.rstrip().endswith(("| torch", "| transformers", "| llama_cpp"))]
    assert heavy == []
    # Nor the backends (pydantic), the dataset builder or the objectives: only what the CLI's
    # option list needs. A command's --help reads the backends for their defaults.
    loaded = {l.rsplit("|", 1)[1].strip() for l in out.stderr.splitlines() if "|" in l}
    assert loaded.isdisjoint({"pydantic", "metaalign_cli.backends", "metaalign_cli.dataset.build",
                              "metaalign_cli.objectives"}), sorted(loaded & {"pydantic", "metaalign_cli.backends"})
    r = run_cli("correct", "--help")
    assert r.returncode == 0 and "[llama-cpp; default 4096]" in " ".join(r.stdout.decode().split())


def test_version():
    from metaalign_cli import __version__

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.decode().strip() == f"metaalign {__version__}"


def test_usage_errors_found_by_typer_are_one_line():
    """Values typer checks itself (ranges, unknown options and commands) get our one-line
    error and exit 2 too; no arguments at all still prints the help."""
    for args, start in ((["correct", "--top-k", "-1"], "error: Invalid value for '--top-k': "
                                                       "Input should be greater than or equal to 0 (see '"),
                        (["correct", "--bogus"], "error: No such option: --bogus (see '"),
                        (["nosuch"], "error: No such command 'nosuch'. (see '")):
        r = run_cli(*args, input=b"")
        err = r.stderr.decode()
        assert r.returncode == 2 and r.stdout == b"" and len(err.strip().splitlines()) == 1, err
        assert err.startswith(start) and err.strip().endswith(" --help')"), err
    r = run_cli()
    assert r.returncode == 2 and b"correct" in r.stdout and b"build-data" in r.stdout and r.stderr == b""


def test_objectives_command_lists_and_rejects():
    r = run_cli("objectives", "--json", "--objectives", "helpful,harmless", "--template", "hh-rlhf")
    rows = lines(r.stdout)
    assert [x["name"] for x in rows] == ["helpful", "harmless"]
    assert rows[1]["text"].startswith("Harmlessness: ") and rows[1]["source"].endswith("harmless.yaml")
    r = run_cli("objectives", "--objectives", "helpfull")
    assert r.returncode == 2
    assert "unknown objective 'helpfull'; did you mean helpful" in r.stderr.decode()


@pytest.mark.parametrize("model", [None, "smollm2"])
def test_correct_real_gguf_two_records(model):
    """The default (the shipped corrector: the embedded SmolLM2 GGUF with the package's LoRA,
    raw prompts) and `--model smollm2` (the same base prompted zero-shot in its chat template)
    correct 2 records through llama.cpp."""
    r = run_cli("correct", "--objectives", "harmless,helpful", "--template", "hh-rlhf", "--max-new-tokens", "24",
                *(["--model", model] if model else []), input=two_records())
    assert r.returncode == 0, r.stderr.decode()
    out = lines(r.stdout)
    src = lines(two_records().encode())
    assert [o["id"] for o in out] == [s["id"] for s in src]
    for o, s in zip(out, src):
        assert {k: o[k] for k in s} == s  # input record unchanged
        assert isinstance(o["corrected"], str) and o["corrected"].strip()
        m = o["metaalign"]
        assert m["backend"] == "llama-cpp" and m["model"].endswith(".gguf")
        assert m["objectives"] == ["harmless", "helpful"] and m["template"] == "hh-rlhf"
        assert m["prompt_format"] == ("chat" if model else "raw") and m["generation"]["max_new_tokens"] == 24
        if model:
            assert "lora_path" not in m
        else:
            assert m["lora_path"].endswith("data/corrector/metaalign-smollm2-lora-f16.gguf")
        assert m["generation"]["repeat_penalty"] == (1.0 if model else 1.25)  # the shipped card's default
        assert m["quant"] == "q8_0"  # --quant auto: the embedded Q4_1 loads re-quantized to Q8_0
    assert "corrected 2 record(s)" in r.stderr.decode()
    assert ("prompted zero-shot" if model else "using the shipped corrector") in r.stderr.decode()


AMX_PROBE = """
import sys, llama_cpp
from metaalign_cli.backends.llamacpp import avoid_amx_weights
amx = b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()
before = llama_cpp.llama_model_default_params().use_extra_bufts
applied, again = avoid_amx_weights(), avoid_amx_weights()
after = llama_cpp.llama_model_default_params().use_extra_bufts
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
text = llm.create_completion("1, 2, 3, 4,", max_tokens=6, temperature=0.0)["choices"][0]["text"]
print(amx, before, applied, again, after, repr(text))
"""


def test_llama_cpp_loads_without_amx_weight_buffers_where_its_build_has_amx(smollm2_gguf):
    """On an AMX CPU, llama.cpp's AMX weight buffer segfaults on the first decode (llama.cpp
    issue 20824; seen on this project's machines with the embedded Q4_1 and its Q8_0 copy,
    LoRA or not). In a fresh process: where the build reports AMX_INT8 the model params lose
    their extra buffer types (once, idempotently) and a real greedy decode runs; elsewhere
    nothing changes."""
    r = subprocess.run([sys.executable, "-c", AMX_PROBE, str(smollm2_gguf)], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    amx, before, applied, again, after, text = r.stdout.split(maxsplit=5)
    assert (before, applied, again, after) == ("True", amx, amx, str(amx == "False"))
    assert text.strip() == repr(" 5, 6,")


def test_llamacpp_greedy_matches_manual_call(smollm2_gguf):
    """Our llama-cpp backend = a plain llama_cpp call with greedy settings and no penalties."""
    from llama_cpp import Llama

    from metaalign_cli.backends import GenerationSettings, create_backend
    from metaalign_cli.correction import CorrectionOptions, build_prompt
    from metaalign_cli.objectives import load_objectives
    from metaalign_cli.templates import load_template

    objset = load_objectives(include_user=False)
    opts = CorrectionOptions(template=load_template("hh-rlhf"), objective_set=objset, prompt_format="raw")
    p = build_prompt("\n\nHuman: Name a prime.\n\nAssistant:", "4", objset.resolve("harmless"), opts)
    be = create_backend("llama-cpp", str(smollm2_gguf), n_ctx=1024, threads=2, quant="none")
    got = be.generate([p], GenerationSettings(max_new_tokens=16))[0]
    be.close()
    llm = Llama(model_path=str(smollm2_gguf), n_ctx=1024, n_threads=2, verbose=False)
    ref = llm.create_completion(p.text, max_tokens=16, temperature=0.0, top_k=1, repeat_penalty=1.0)
    llm.close()
    assert got.text == ref["choices"][0]["text"]
    assert got.completion_tokens == ref["usage"]["completion_tokens"]


@pytest.mark.parametrize("quant", ["none", "q8_0"])
def test_llamacpp_batch_equals_one_by_one(smollm2_gguf, quant):
    """--batch-size > 1 on llama-cpp decodes the prompts in one llama.cpp batch; greedy, the
    texts, token counts and finish reasons equal decoding each prompt alone (EOS, token cap and
    a stop string that cuts the text), on the Q4_1 file and on its Q8_0 copy (`--quant`)."""
    from metaalign_cli.backends import GenerationSettings, Prompt, create_backend

    mixed = [Prompt("The capital of France is"), Prompt("Human: Name three colours.\n\nAssistant:"),
             Prompt("1, 2, 3, 4,"), Prompt("Write a haiku about rain.", chat=True)]
    # Prompts with a shared opening of more than 16 tokens: it is prefilled once and its KV copied.
    head = "You are an assistant to human. You will be provided with a query and an answer. Edit the answer. | Query: "
    shared = [Prompt(head + q + " | Answer: " + a + " | Edit: ") for q, a in
              (("Name a prime.", "4"), ("What is the capital of Italy?", "Paris"), ("Say hi.", "Go away."))]
    be = create_backend("llama-cpp", str(smollm2_gguf), n_ctx=512, threads=2, quant=quant)
    from metaalign_cli.backends.llamacpp import _common_prefix

    assert _common_prefix([be._tokens(p)[0] for p in shared]) >= 16
    assert _common_prefix([be._tokens(p)[0] for p in mixed]) < 16
    try:
        for prompts in (mixed, shared):
            for st in (GenerationSettings(max_new_tokens=20), GenerationSettings(max_new_tokens=20, stop=(",",))):
                one = [be.generate([p], st)[0] for p in prompts]
                many = be.generate(prompts, st)
                assert [(g.text, g.completion_tokens, g.finish_reason) for g in many] == \
                    [(g.text, g.completion_tokens, g.finish_reason) for g in one]
                assert [g.prompt_tokens for g in many] == [be.count_prompt_tokens(p) for p in prompts]
                assert "," not in "".join(g.text for g in many) or not st.stop
            assert be._bctx is not None and be._bctx[2] == len(prompts)  # the batch path ran
        assert any(g.text for g in many)
    finally:
        be.close()


def test_requantized_copy_is_q8_0_within_half_a_step_and_cached(smollm2_gguf, tmp_path, monkeypatch):
    """`--quant q8_0`: llama.cpp's quantizer turns the Q4_1 file into a Q8_0 copy under
    $METAALIGN_HOME/cache/gguf, once. Same tensors and shapes; every Q4_1 weight matrix is now
    Q8_0 and each value moved by at most half a Q8_0 step (block max / 127 / 2) plus the fp16
    rounding of the block scale; a second call reuses the file; a file llama.cpp cannot
    quantize raises MetaAlignError and leaves nothing in the cache."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, GGUFReader
    from gguf.quants import dequantize

    from metaalign_cli.backends.llamacpp import requantized
    from metaalign_cli.errors import MetaAlignError

    monkeypatch.setenv("METAALIGN_HOME", str(tmp_path))
    out = requantized(smollm2_gguf, "q8_0", threads=2)
    assert out.parent == tmp_path / "cache" / "gguf" and out.name.endswith(".q8_0.gguf")
    src, dst = GGUFReader(str(smollm2_gguf)), GGUFReader(str(out))
    assert dst.fields["general.file_type"].contents() == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    a = {t.name: t for t in src.tensors}
    b = {t.name: t for t in dst.tensors}
    assert a.keys() == b.keys()
    checked = 0
    for name, t in a.items():
        assert list(b[name].shape) == list(t.shape)
        if t.tensor_type != Q.Q4_1:
            continue
        assert b[name].tensor_type == Q.Q8_0
        w = dequantize(t.data, Q.Q4_1).reshape(-1, 32)
        v = dequantize(b[name].data, Q.Q8_0).reshape(-1, 32)
        # Q8_0: d = amax/127 stored as fp16 (relative error <= 2^-11), q = round(x/d), |q| <= 127:
        # |q*d16 - x| <= d/2 + 127*d*2^-11.
        bound = np.abs(w).max(axis=1, keepdims=True) / 127 * (0.5 + 127 * 2.0 ** -11) + 1e-7
        assert (np.abs(v - w) <= bound).all(), name
        checked += 1
    assert checked >= 30  # the model's weight matrices (7 per layer, 30 layers)
    mtime = out.stat().st_mtime_ns
    assert requantized(smollm2_gguf, "q8_0") == out and out.stat().st_mtime_ns == mtime
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(MetaAlignError, match="bad.gguf: llama.cpp could not re-quantize this model to q8_0"):
        requantized(bad, "q8_0")
    with pytest.raises(MetaAlignError, match="unknown quantization 'q4_0'"):
        requantized(smollm2_gguf, "q4_0")
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no partial file left
    # A damaged copy is made again when it fails to load; a conversion clears a killed one's
    # stale temporary file (an hour old) but not a live one's.
    import os
    import time

    from metaalign_cli.backends import create_backend

    size = out.stat().st_size
    stale, live = out.parent / "x.gguf.1.part", out.parent / "y.gguf.2.part"
    stale.write_bytes(b"x")
    live.write_bytes(b"y")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    out.write_bytes(out.read_bytes()[:4096])
    be = create_backend("llama-cpp", str(smollm2_gguf), n_ctx=256, threads=1, quant="q8_0")
    be.close()
    assert out.stat().st_size == size and not stale.exists() and live.exists()


def test_quant_flag_auto_none_and_resume(smollm2_gguf, tmp_path):
    """`--quant auto` re-quantizes only the embedded model (a copy of the file elsewhere is
    loaded as it is), `--quant none` never, a bad value is a usage error, `--resume` refuses
    to mix re-quantized and original weights in one file, and without a writable cache `auto`
    falls back to the file as it is."""
    import shutil

    other = tmp_path / "mine.gguf"
    shutil.copy(smollm2_gguf, other)
    base = ("correct", str(EX), "--max-new-tokens", "2", "--threads", "1", "-q", "-O", "harmless")
    p = run_cli(*base, "--model", str(other))
    assert p.returncode == 0, p.stderr.decode()
    assert all("quant" not in o["metaalign"] for o in lines(p.stdout))
    out = tmp_path / "o.jsonl"
    p = run_cli(*base, "--quant", "none", "-o", str(out))
    assert p.returncode == 0 and all("quant" not in o["metaalign"] for o in lines(out.read_bytes()))
    out.write_text("".join(out.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    p = run_cli(*base, "-o", str(out), "--resume")
    assert p.returncode == 2 and "quant none there, 'q8_0' now" in p.stderr.decode()
    p = run_cli(*base, "--quant", "q4_0")
    assert p.returncode == 2 and p.stderr.decode().strip().endswith(
        "error: --quant must be one of auto, none, q8_0, f16, f32, not 'q4_0'")
    # No writable cache: the default loads the file as it is (a warning); an explicit type fails.
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    p = run_cli(*base, env={"METAALIGN_HOME": str(home)})
    err = p.stderr.decode()
    assert p.returncode == 0 and all("quant" not in o["metaalign"] for o in lines(p.stdout))
    assert f"warning: {home}/cache/gguf: cannot write the re-quantized model" in err and "(--quant none)" in err
    p = run_cli(*base, "--quant", "q8_0", env={"METAALIGN_HOME": str(home)})
    assert p.returncode == 2 and p.stderr.decode().strip() == \
        f"error: {home}/cache/gguf: cannot write the re-quantized model: Not a directory"


def test_an_option_of_another_backend_is_an_error_naming_it():
    """A knob for a backend that does not run is refused (it used to be dropped silently),
    from the CLI (naming the flag) and from the library (naming the option and the backend's
    options); pipeline knobs (--batch-size) go only where they apply."""
    r = run_cli("correct", "--base-url", "http://127.0.0.1:9/v1", "-m", "x", "-O", "harmless", "--quant", "Q8_0",
                input='{"query": "q", "response": "r"}\n')
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode().strip() == ("error: --quant is an option of the llama-cpp backend, not of openai "
                                         "(the model runs on openai)")
    r = run_cli("judge", "-", "-m", "judge.gguf", "--device", "cpu", input="")
    assert r.returncode == 2 and "--device is an option of the transformers backend, not of llama-cpp" in \
        r.stderr.decode()
    from metaalign_cli.errors import ConfigError
    from metaalign_cli.models import ModelSpec, resolve_model

    with pytest.raises(ConfigError, match=r"the openai backend does not take option 'n_ctx' \(it takes: base_url, "
                                          r"concurrency, retries, timeout, tokenizer, max_model_len\)"):
        resolve_model(ModelSpec(model="m", base_url="http://127.0.0.1:9/v1", options={"n_ctx": 512}))
    with pytest.raises(ConfigError, match="--base-url is for the openai and anthropic backends, not llama-cpp"):
        resolve_model(ModelSpec(model="x.gguf", backend="llama-cpp", base_url="http://127.0.0.1:9/v1"))
    r = resolve_model(ModelSpec(model="m", base_url="http://u:sk-1@127.0.0.1:9/v1", options={"concurrency": 8}))
    assert (r.backend, r.model, r.options) == ("openai", "m", {"concurrency": 8, "base_url": "http://u:sk-1@127.0.0.1:9/v1"})


def test_transformers_backend_batched_in_order(tiny_llama_dir, tmp_path):
    """Tiny random Llama: batched (left padding, sorted by length) = one by one, input order kept."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recs = [{"id": f"r{i}", "query": "Hi " * (i * 7 + 1), "response": f"Answer number {i}."} for i in range(4)]
    inp = "".join(json.dumps(r) + "\n" for r in recs)
    args = ["correct", "--model", str(tiny_llama_dir), "--objectives", "helpful", "--max-new-tokens", "6",
            "--prompt-format", "raw"]
    r1 = run_cli(*args, "--batch-size", "3", input=inp)
    r2 = run_cli(*args, "--batch-size", "1", input=inp)
    assert r1.returncode == 0, r1.stderr.decode()
    o1, o2 = lines(r1.stdout), lines(r2.stdout)
    assert [o["id"] for o in o1] == ["r0", "r1", "r2", "r3"]
    assert [o["corrected"] for o in o1] == [o["corrected"] for o in o2]
    assert o1[0]["metaalign"]["backend"] == "transformers" and o1[0]["metaalign"]["dtype"] == "float32"
    # Same as calling generate ourselves on the rendered prompt.
    from metaalign_cli.objectives import load_objectives
    from metaalign_cli.templates import load_template

    objset = load_objectives(include_user=False)
    text = load_template("ultrafeedback").render(recs[2]["query"], recs[2]["response"],
                                                 objset.get("helpful").render("ultrafeedback"))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = tok(text, return_tensors="pt")
    with torch.inference_mode():
        gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    new = gen[0, ids["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    assert o1[2]["corrected"] == tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.slow
def test_openai_backend_against_local_server(llama_server, smollm2_gguf):
    """openai backend against llama-cpp-python's server: same greedy text as local llama.cpp."""
    from metaalign_cli.backends import GenerationSettings, Prompt, create_backend

    prompts = [Prompt("The capital of France is"), Prompt("One, two, three,")]
    s = GenerationSettings(max_new_tokens=8)
    remote = create_backend("openai", None, base_url=llama_server, concurrency=2)
    assert remote.model_id == "smollm2"
    got = remote.generate(prompts, s)
    local = create_backend("llama-cpp", str(smollm2_gguf), n_ctx=4096, quant="none")  # the server's weights
    ref = local.generate(prompts, s)
    local.close()
    assert [g.text for g in got] == [g.text for g in ref]
    # CLI: chat prompts through the chat endpoint, records in order
    r = run_cli("correct", "--base-url", llama_server, "--objectives", "harmless", "--template", "hh-rlhf",
                "--prompt-format", "chat", "--max-new-tokens", "12", "--concurrency", "2", input=two_records())
    assert r.returncode == 0, r.stderr.decode()
    out = lines(r.stdout)
    assert [o["id"] for o in out] == ["claude3-2", "claude3-7"]
    assert out[0]["metaalign"]["backend"] == "openai" and out[0]["metaalign"]["base_url"] == llama_server
    assert all(o["corrected"] for o in out)
    assert "OPENAI_API_KEY" not in r.stdout.decode()


BAD = [
    ('{"query": "q", "response": "r"}\n{"query": "q", "response": \n', 2, "<stdin>:2: invalid JSON"),
    ('{"query": "q"}\n', 1, "<stdin>:1: field 'response/answer/output/generated_text/completion': missing response "
     "(the record has: query; name yours with --response-field)"),
    ('{"prompt": "q", "reply": "r"}\n', 1, "<stdin>:1: field 'response/answer/output/generated_text/completion': "
     "missing response (the record has: prompt, reply; name yours with --response-field)"),
    ('{"query": "q", "response": 5}\n', 1, "<stdin>:1: field 'response': expected a string, got number"),
    ('{"query": "q", "response": "  "}\n', 1, "<stdin>:1: field 'response': empty text"),
    ('{"query": "q", "response": "r", "objectives": ["harmles"]}\n', 1,
     "<stdin>:1: field 'objectives': unknown objective 'harmles'; did you mean harmless"),
    ('{"query": "q", "response": "r", "objectives": 5}\n', 1,
     "<stdin>:1: field 'objectives': expected a list of objective names or one comma-separated string, got 5"),
    ('[1, 2]\n', 1, "<stdin>:1: expected a JSON object, got array"),
    ('{"query": "q", "response": "r"}\n{"query": "q", "response": "r", "query": "dup"}\n', 2,
     "<stdin>:2: field 'query': duplicate key in a JSON object (which value is meant?)"),
    ('{"query": "q", "response": "r", "meta": {"a": 1, "a": 2}}\n', 1,
     "<stdin>:1: field 'a': duplicate key in a JSON object"),
]


@pytest.mark.parametrize("text,line,msg", BAD)
def test_bad_input_one_line_error(text, line, msg):
    """Bad input is one line naming input, line and field, found before any model loads: under
    --on-error fail nothing is generated (the model is never even announced)."""
    r = run_cli("correct", "--objectives", "helpful", "--max-new-tokens", "4", input=text)
    assert r.returncode == 2
    err = r.stderr.decode().strip().splitlines()
    assert err == ["error: " + msg] or (len(err) == 1 and err[0].startswith("error: " + msg)), err
    assert r.stdout == b""


def test_invalid_utf8_and_skip_keep_exit_1(tmp_path):
    data = b'{"id": "a", "query": "q", "response": "fine"}\n{"query": "q", "response": "\xff"}\n'
    r = run_cli("correct", "--objectives", "helpful", "--max-new-tokens", "4", input=data)
    assert r.returncode == 2 and r.stderr.decode().strip().splitlines()[-1] == \
        "error: <stdin>:2: field 'response': invalid UTF-8 (byte 0xff after 0 bytes of the field)"
    assert r.stdout == b""  # found before the model loaded: nothing generated
    r = run_cli("correct", "--objectives", "helpful", "--max-new-tokens", "4", "--on-error", "skip", input=data)
    assert r.returncode == 1 and len(lines(r.stdout)) == 1
    r = run_cli("correct", "--objectives", "helpful", "--max-new-tokens", "4", "--on-error", "keep", input=data)
    out = lines(r.stdout)
    assert r.returncode == 1 and len(out) == 2 and out[1]["error"].startswith("<stdin>:2: field 'response': invalid UTF-8")
    # Outside a string (the line is no JSON then) the byte offset in the line is named instead;
    # inside a nested value, its path.
    from metaalign_cli.records import read_jsonl

    f = tmp_path / "u.jsonl"
    f.write_bytes(b'{"query": "q\xff",, }\n{"query": "q", "meta": {"list": ["a", "b\xfe"]}, "response": "r"}\n')
    assert [str(x.error) for x in read_jsonl(f)] == [
        f"{f}:1: invalid UTF-8 at byte 12",
        f"{f}:2: field 'meta.list[1]': invalid UTF-8 (byte 0xfe after 1 bytes of the field)"]
    assert "corrected" not in out[1]
    # Fed back once fixed, our own stale `error` goes; a user's own `error` field stays.
    again = [dict(out[1], query="q", response="fine now"), {"query": "q", "response": "r", "error": "user data"}]
    r = run_cli("correct", "--objectives", "helpful", "--max-new-tokens", "4",
                input="".join(json.dumps(o) + "\n" for o in again))
    fixed = lines(r.stdout)
    assert r.returncode == 0 and "error" not in fixed[0] and "corrected" in fixed[0]
    assert fixed[1]["error"] == "user data"


def test_unknown_objective_flag_exit_2():
    r = run_cli("correct", "--objectives", "harmles", input='{"query": "q", "response": "r"}\n')
    assert r.returncode == 2 and "did you mean harmless" in r.stderr.decode()
    assert r.stdout == b""
    # Only the close names are suggested ('harmlesss' is near harmless/harmlessness, not fairness).
    r = run_cli("correct", "--objectives", "harmlesss", input='{"query": "q", "response": "r"}\n')
    assert "did you mean harmless? (known:" in r.stderr.decode()
    # An empty flag is the flag's fault, not the record's (it is not the same as no flag).
    r = run_cli("correct", "-O", " , ", input='{"query": "q", "response": "r"}\n')
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode().strip().splitlines() == [
        "error: --objectives: empty: name at least one (comma-separated), or leave it out: ' , '"]


def test_case_lone_surrogate():
    """shared/cases/lone-surrogate.jsonl: bad code point replaced and said; CJK/emoji unchanged."""
    raw = (CASES / "lone-surrogate.jsonl").read_bytes()
    r = run_cli("correct", "--objectives", "helpful", "--max-new-tokens", "4", input=raw)
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    assert "<stdin>:1: field 'response': lone surrogate replaced with U+FFFD" in err and "Traceback" not in err
    out_lines = r.stdout.decode("utf-8").splitlines()
    assert json.loads(out_lines[0])["response"] == "Le café est ouvert \ufffd."
    assert '"response": "こんにちは 👋"' in out_lines[1]  # byte-for-byte, not \u-escaped


def test_case_lone_surrogate_in_judge_and_build_data(tmp_path):
    """The same kind of input read by `judge` and `build-data`: replaced and said on stderr
    (build-data counts it in stats.json too); the Japanese text and emoji are unchanged."""
    judged = tmp_path / "j.jsonl"
    judged.write_bytes(b"".join(line[:-2] + b', "golden": "g", "corrected": "c"}\n'
                                for line in (CASES / "lone-surrogate.jsonl").read_bytes().splitlines(keepends=True)))
    r = run_cli("judge", str(judged), "-O", "helpful", "--dry-run")
    assert r.returncode == 0 and f"warning: {judged}:1: field 'response': lone surrogate replaced with U+FFFD" \
        in r.stderr.decode(), r.stderr.decode()
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"prompt": "caf\\u00e9 \\udc9d", "chosen": "こんにちは 👋", "rejected": "no", '
                     '"labels": {"harmless": "chosen"}}\n', encoding="utf-8")
    r = run_cli("build-data", str(pairs), "-O", "harmless", "-o", str(tmp_path / "bd"))
    assert r.returncode == 0, r.stderr.decode()
    assert f"warning: {pairs}:1: field 'prompt': lone surrogate replaced with U+FFFD" in r.stderr.decode()
    stats = json.loads((tmp_path / "bd" / "stats.json").read_text())
    assert stats["repaired_fields"] == 1
    built = "".join(f.read_text(encoding="utf-8") for f in (tmp_path / "bd").glob("*/*.jsonl"))
    assert "こんにちは 👋" in built and "café \ufffd" in built


def test_case_messages_shapes():
    """m1: the system turn is kept in the context; m2 (ends with a user turn): line 2 error."""
    raw = (CASES / "messages-shapes.jsonl").read_bytes()
    r = run_cli("correct", "--objectives", "helpful", "--template", "hh-rlhf", "--max-new-tokens", "4",
                "--on-error", "keep", input=raw)
    assert r.returncode == 1
    out = lines(r.stdout)
    assert out[0]["id"] == "m1" and out[0]["corrected"]
    assert out[1]["error"] == "<stdin>:2: field 'messages[2].role': last turn is 'user', not 'assistant': no response to correct"
    from metaalign_cli.records import extract_query_response, read_jsonl

    rec = next(read_jsonl(CASES / "messages-shapes.jsonl"))
    q, a = extract_query_response(rec)
    assert q == "\n\nSystem: Be brief.\n\nHuman: Name a prime number.\n\nAssistant:" and a == "4 is prime."
    # Roles are read case-insensitively ("Assistant" is the assistant, as "assistant").
    rec.data["messages"] = [{"role": "User", "content": "hi"}, {"role": "Assistant", "content": "Hello."}]
    assert extract_query_response(rec) == ("\n\nHuman: hi\n\nAssistant:", "Hello.")
    # OpenAI's "developer" turn is the system turn's newer name.
    rec.data["messages"] = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "Hello."}]
    assert extract_query_response(rec)[0] == "\n\nSystem: Be brief.\n\nHuman: hi\n\nAssistant:"


def test_messages_with_openai_content_parts(tmp_path):
    """OpenAI's list-of-parts `content`: text parts are joined with newlines; an image part
    is a one-line error naming the part."""
    from metaalign_cli.errors import InputError
    from metaalign_cli.records import extract_query_response, read_jsonl

    parts = [{"type": "text", "text": "Name a prime."}, {"type": "text", "text": "Just one."}]
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": parts},
                                          {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                                            {"role": "assistant", "content": "x"}]}) + "\n", encoding="utf-8")
    good, bad = read_jsonl(f)
    assert extract_query_response(good) == ("\n\nHuman: Name a prime.\nJust one.\n\nAssistant:", "4")
    with pytest.raises(InputError) as e:
        extract_query_response(bad)
    assert str(e.value) == f"{f}:2: field 'messages[0].content[0]': only text content parts can be read, got 'image_url'"


def test_case_template_syntax_prompt_verbatim():
    from metaalign_cli.correction import CorrectionOptions, build_prompt
    from metaalign_cli.objectives import load_objectives
    from metaalign_cli.records import extract_query_response, read_jsonl
    from metaalign_cli.templates import load_template

    objset = load_objectives(include_user=False)
    opts = CorrectionOptions(template=load_template("ultrafeedback"), objective_set=objset)
    for rec in read_jsonl(CASES / "template-syntax-in-text.jsonl"):
        q, a = extract_query_response(rec)
        p = build_prompt(q, a, objset.resolve("helpful"), opts).text
        assert p.count(q) == 1 and p.count(a) == 1
        assert p.endswith(f"| Query: {q} | Answer: {a} | Edit: ")
        assert "Helpfulness: the response should provide useful resources" in p


def test_long_context_is_cut_from_the_start(smollm2_gguf):
    turns = "".join(f"\n\nHuman: question number {i} about gardening?\n\nAssistant: answer {i}." for i in range(60))
    rec = {"id": "long", "query": turns + "\n\nHuman: the newest question?\n\nAssistant:", "response": "Water the plants."}
    huge = {"id": "huge", "query": "q", "response": "word " * 2000}
    inp = json.dumps(rec) + "\n" + json.dumps(huge) + "\n"
    r = run_cli("correct", "--objectives", "helpful", "--template", "hh-rlhf", "--n-ctx", "256",
                "--max-new-tokens", "16", "--on-error", "keep", input=inp)
    assert r.returncode == 1, r.stderr.decode()
    out = lines(r.stdout)
    cut = out[0]["metaalign"]["truncated_query_chars"]
    assert cut > 0 and rec["query"][cut:].startswith("\n\nHuman:")
    assert "1 with the query cut to fit the context" in r.stderr.decode()
    assert "field 'response': the response does not fit in the model's context" in out[1]["error"]


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    recs = [{"id": f"k{i}", "query": f"What is {i} plus {i}?", "response": f"It is {i}."} for i in range(6)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    args = ["correct", str(inp), "--objectives", "helpful", "--max-new-tokens", "24", "-q"]
    assert run_cli(*args, "-o", str(full)).returncode == 0
    n_before = kill_when_lines([*args, "-o", str(part)], part, 2)
    assert 2 <= n_before < 6
    r = run_cli(*args, "-o", str(part), "--resume")
    assert r.returncode == 0, r.stderr.decode()
    assert part.read_bytes() == full.read_bytes()


def test_ctrl_c_says_how_to_continue_and_resume_finishes_the_file(tmp_path):
    """Ctrl-C used to end `correct` with exit 130 and no word; now it says that --resume
    continues the file, and the resumed file equals an uninterrupted run's."""
    import signal

    recs = [{"id": f"c{i}", "query": f"Name {i} fruits.", "response": "Apples."} for i in range(12)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    args = ["correct", str(inp), "--objectives", "helpful", "--max-new-tokens", "16", "-q"]
    rc, err = signal_when_lines([*args, "-o", str(part)], part, 1, signal.SIGINT)
    assert rc == 130 and f"interrupted; the same command with --resume continues {part}" in err, err
    assert "Traceback" not in err and 1 <= part.read_text().count("\n") < 12
    assert run_cli(*args, "-o", str(part), "--resume").returncode == 0
    assert run_cli(*args, "-o", str(full)).returncode == 0
    assert part.read_bytes() == full.read_bytes()


def test_resume_by_line_number_without_ids(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"query": "a?", "response": "A."}\n{"query": "b?", "response": "B."}\n')
    out = tmp_path / "out.jsonl"
    args = ["correct", str(inp), "--objectives", "helpful", "--max-new-tokens", "8", "-q", "-o", str(out)]
    assert run_cli(*args).returncode == 0
    full = out.read_bytes()
    first = full.split(b"\n")[0] + b"\n"
    out.write_bytes(first + b'{"query": "b?", "resp')  # killed mid-line
    assert run_cli(*args, "--resume").returncode == 0
    assert out.read_bytes() == full


def test_csv_input_reference_columns(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text('query,goldens,generated_text\n"\n\nHuman: hi, there\n\nAssistant:",Hello!,"Hey, what\'s up"\n')
    r = run_cli("correct", str(f), "--objectives", "helpful", "--template", "hh-rlhf", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr.decode()
    o = lines(r.stdout)[0]
    assert o["generated_text"] == "Hey, what's up" and o["goldens"] == "Hello!" and o["metaalign"]["input_line"] == 2


def test_output_problems_fail_early_in_one_line(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"id": 1, "query": "a", "response": "b"}\n')
    cases = [(["-o", str(f), str(f)], f"--output {f}: is the input file; give each output its own file"),
             (["-o", str(tmp_path), str(f)], "is a directory; -o takes a file"),
             (["--output-field", " ", str(f)], "--output-field must not be empty"),
             (["--objectives-dir", str(f), str(f)], "not a directory (use --objective-file for a file)"),
             (["--output-field", "response", "--response-field", "response", str(f)], "would overwrite")]
    for args, msg in cases:
        r = run_cli("correct", "-O", "helpful", *args)
        assert r.returncode == 2 and msg in r.stderr.decode() and "Traceback" not in r.stderr.decode()
    assert f.read_text() == '{"id": 1, "query": "a", "response": "b"}\n'  # input untouched
    with open("/dev/full", "wb") as full:
        p = subprocess.run([sys.executable, "-m", "metaalign_cli", "correct", "-O", "helpful", "--max-new-tokens", "2",
                            str(f)], stdout=full, stderr=subprocess.PIPE, cwd=REPO)
    assert p.returncode == 2 and "cannot write output: No space left on device" in p.stderr.decode()


def test_resume_with_repeated_ids_and_foreign_file(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"id": i, "query": "q?", "response": r}) + "\n"
                         for i, r in [(1, "a"), (1, "b"), (2, "c")]))
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    args = ["correct", str(f), "-O", "helpful", "--max-new-tokens", "3", "-q"]
    assert run_cli(*args, "-o", str(full)).returncode == 0
    part.write_bytes(full.read_bytes().split(b"\n")[0] + b"\n")
    assert run_cli(*args, "-o", str(part), "--resume").returncode == 0
    assert part.read_bytes() == full.read_bytes()
    part.write_text("not ours\n")
    r = run_cli(*args, "-o", str(part), "--resume")
    assert r.returncode == 2 and f"{part}:1: not a JSONL record" in r.stderr.decode()


def test_bom_csv_rows_of_wrong_width_nan():
    r = run_cli("correct", "-O", "helpful", "--max-new-tokens", "2", "--on-error", "keep", "--input-format", "csv",
                input=b"\xef\xbb\xbfquery,response\nhi,there\nx,y,z\nonly\n")
    out = lines(r.stdout)
    assert r.returncode == 1 and out[0]["query"] == "hi" and out[0]["corrected"]
    assert out[1]["error"] == "<stdin>:3: row has 3 fields, the header 2"
    assert out[2]["error"] == "<stdin>:4: row has 1 field, the header 2"
    r = run_cli("correct", "-O", "helpful", input=b'\xef\xbb\xbf{"query": "a", "response": NaN}\n')
    assert r.returncode == 2 and "<stdin>:1: invalid JSON: NaN is not valid JSON" in r.stderr.decode()
    # A number too large for a double came back out as Infinity (not JSON): refused like NaN.
    r = run_cli("correct", "-O", "helpful", "--dry-run", input=b'{"query": "a", "response": "b", "x": -1e999}\n')
    assert r.returncode == 2 and "<stdin>:1: invalid JSON: the number -1e999 is out of range" in r.stderr.decode()
    r = run_cli("correct", "-O", "helpful", "--dry-run", input=b'{"query": "a", "response": "b", "x": 1e308}\n')
    assert r.returncode == 0


def test_a_semicolon_or_tab_separated_csv_is_named_as_such(tmp_path):
    """A ;-separated export read as CSV is one column 'query;response': the error said the
    records had no response; now it names the separator (exit 2, before any model loads)."""
    for sep, name in ((";", "';'"), ("\t", "tab")):
        f = tmp_path / "in.csv"
        f.write_text(f"query{sep}response\nhi{sep}there\n", encoding="utf-8")
        r = run_cli("correct", "-O", "helpful", str(f), "--dry-run")
        assert r.returncode == 2 and f"{f}:1: the header is one column " in r.stderr.decode() and \
            f"the file looks {name}-separated; CSV input is comma-separated" in r.stderr.decode(), r.stderr.decode()


def test_csv_bad_utf8_fails_its_row_and_duplicate_header_the_file(tmp_path):
    """CSV: a byte that is not UTF-8 fails its row alone, naming file, line, field and byte
    (the rows around it are corrected under --on-error keep; the default stops there with
    exit 2 before the model loads, nothing generated). A header that names a column twice, or has a
    bad byte, fails the file in one line."""
    f = tmp_path / "in.csv"
    f.write_bytes(b'query,response\nHi?,Hello there\n"Q2","bad \xff here\nand more"\nHow?,Fine\n')
    args = ("correct", str(f), "-O", "helpful", "--max-new-tokens", "2", "--threads", "1", "-q")
    r = run_cli(*args, "--on-error", "keep")
    out = lines(r.stdout)
    assert r.returncode == 1 and len(out) == 3
    assert out[0]["corrected"] and out[2]["query"] == "How?" and out[2]["corrected"]
    assert out[1]["error"] == f"{f}:3: field 'response': invalid UTF-8 (byte 0xff after 4 bytes of the field)"
    r = run_cli(*args)
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode().strip().splitlines()[-1] == f"error: {out[1]['error']}"
    d = tmp_path / "dup.csv"
    d.write_text("query,response,query\na,b,c\n", encoding="utf-8")
    r = run_cli(*args[:1], str(d), *args[2:])
    assert r.returncode == 2 and r.stderr.decode().strip() == f"error: {d}:1: the header names column 'query' twice"
    d.write_bytes(b"query,resp\xe9nse\na,b\n")
    r = run_cli(*args[:1], str(d), *args[2:])
    assert r.returncode == 2 and r.stderr.decode().strip() == \
        f"error: {d}:1: header: invalid UTF-8 (byte 0xe9 after 4 bytes of column 2's name)"


def test_resume_redoes_a_kept_failure_and_it_fails_again(tmp_path):
    """A record kept as failed (`--on-error keep`) is redone by `--resume` (a failure is never
    kept as a result); a record that is bad in itself fails again, so the run exits 1, and the
    file holds one line per record in input order."""
    data = '{"id": "a", "query": "q", "response": "fine"}\n{"id": "b", "query": "q"}\n'
    out = tmp_path / "o.jsonl"
    args = ("correct", "-O", "helpful", "--max-new-tokens", "2", "--threads", "1", "--on-error", "keep", "-o", str(out))
    r = run_cli(*args, input=data)
    assert r.returncode == 1 and [("error" in o) for o in lines(out.read_bytes())] == [False, True]
    r = run_cli(*args, "--resume", input=data)
    assert r.returncode == 1, r.stderr.decode()
    assert "1 failed, 1 already done, 1 redone (kept as failed by the earlier run)" in r.stderr.decode()
    assert [(o["id"], "error" in o) for o in lines(out.read_bytes())] == [("a", False), ("b", True)]


def test_csv_line_numbers_count_blank_lines_and_multiline_cells(tmp_path):
    """`line` is where a CSV record starts in the file: blank lines before the header or
    between rows are skipped but counted, and a quoted cell may span lines."""
    from metaalign_cli.records import read_csv

    f = tmp_path / "b.csv"
    f.write_text('\n\nquery,response\nq1,r1\n\n\n"q\n2",r2\nonly\nq3,"r\n\n3"\nq4,r4\n', encoding="utf-8")
    got = [(r.line, r.data, str(r.error) if r.error else None) for r in read_csv(f)]
    assert got == [(4, {"query": "q1", "response": "r1"}, None),
                   (7, {"query": "q\n2", "response": "r2"}, None),
                   (9, None, f"{f}:9: row has 1 field, the header 2"),
                   (10, {"query": "q3", "response": "r\n\n3"}, None),
                   (13, {"query": "q4", "response": "r4"}, None)]
    # A Windows export: CRLF line ends, and inside a quoted cell too (the tenth trial kept "\r\n")
    f.write_bytes(b'query,response\r\n"q\r\n1","r1"\r\nq2,r2\r\n')
    assert [(r.line, r.data) for r in read_csv(f)] == [(2, {"query": "q\n1", "response": "r1"}),
                                                      (4, {"query": "q2", "response": "r2"})]


def test_broken_pipe_is_quiet_and_not_ok(tmp_path):
    """`correct ... | head -1` and `judge -o - ... | head -1`: the reader went away, so the run
    stops without a word, and exits 141 (128 + SIGPIPE, as a Unix filter ends), not 0: records
    were left undone."""
    recs = "".join(json.dumps({"query": f"q{i}?", "response": f"r{i}", "corrected": "c", "golden": "g"}) + "\n"
                   for i in range(40))
    (tmp_path / "in.jsonl").write_text(recs)
    for cmd in ("correct -O helpful --max-new-tokens 2 -q", "judge -O helpful --max-new-tokens 1 -q --no-cache -o -"):
        p = subprocess.run(f"{sys.executable} -m metaalign_cli {cmd} {tmp_path / 'in.jsonl'} | head -1; "
                           "echo \"status ${PIPESTATUS[0]}\"", shell=True, capture_output=True, cwd=REPO,
                           executable="/bin/bash")
        out = p.stdout.decode().splitlines()
        assert len(out) == 2 and out[1] == "status 141", (cmd, out, p.stderr.decode()[-1000:])
        assert b"Traceback" not in p.stderr and b"error" not in p.stderr, (cmd, p.stderr.decode()[-1000:])


def test_second_trial_findings_are_one_line_errors(tmp_path, smollm2_gguf):
    """A fresh user's second trial: each of these crashed, printed a traceback or 'Aborted.',
    or blamed the wrong file. Each is now one line naming the file, exit 2."""
    import gzip
    import random

    rec = tmp_path / "r.jsonl"
    rec.write_text('{"query": "q", "response": "r"}\n', encoding="utf-8")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    rnd = random.Random(0)
    full = tmp_path / "full.jsonl.gz"
    with gzip.open(full, "wt", encoding="utf-8") as fh:
        for i in range(3000):
            fh.write(json.dumps({"query": f"q{i}", "response": "".join(rnd.choice("abcdefgh ") for _ in range(80)),
                                 "golden": "g", "corrected": "c"}) + "\n")
    trunc = tmp_path / "trunc.jsonl.gz"
    trunc.write_bytes(full.read_bytes()[:600])  # a few records, then the stream ends
    notgz = tmp_path / "plain.jsonl.gz"
    notgz.write_text('{"query": "q"}\n', encoding="utf-8")
    home = tmp_path / "home"
    (home / "models" / "default").mkdir(parents=True)
    (home / "models" / "default" / "metaalign.json").write_text('{"gguf": 5}', encoding="utf-8")
    cases = [
        (("correct", str(rec), "--lora", str(tmp_path / "none.gguf")), f"{tmp_path / 'none.gguf'}: LoRA adapter file not found"),
        (("correct", str(rec), "--lora", str(junk)), f"{junk}: not a GGUF file"),
        (("correct", str(rec), "--lora", str(smollm2_gguf)), "not a GGUF LoRA adapter (general.type is 'model'"),
        (("correct", str(trunc), "--max-new-tokens", "1"), f"{trunc}: truncated gzip stream"),
        (("correct", str(notgz)), f"{notgz}: not a valid gzip file"),
        (("judge", str(trunc), "--dry-run"), f"{trunc}: truncated gzip stream"),
        (("build-data", str(trunc), "--format", "pairwise", "-o", str(tmp_path / "bd")), f"{trunc}: truncated gzip stream"),
        (("judge", str(full), "--dry-run", "--cache", str(junk)), f"{junk}: cannot use as the judge cache: file is not a database"),
        (("judge", str(full), "--dry-run", "--cache", str(tmp_path)), "--cache is a directory"),
        (("correct", str(rec), "--output-field", "metaalign"), "--output-field 'metaalign' is reserved"),
        (("correct", str(rec), "--output-field", "id"), "--output-field 'id' would overwrite the input's query, response or id"),
        (("correct", str(rec), "--output-field", "answer"), "--output-field 'answer' would overwrite the input's"),
        (("correct", str(rec), "--response-field", "r", "--output-field", "r"), "--output-field 'r' would overwrite"),
        (("correct", str(rec), "--model", str(rec)), f"{rec}: not a model"),
        (("export", str(tmp_path), "--install", "../escape"), "invalid corrector name '../escape'"),
        (("correct", str(rec), "--model", "default"), "metaalign.json: field 'gguf': expected a string"),
    ]
    for args, msg in cases:
        env = {"METAALIGN_HOME": str(home if "default" in args else tmp_path / "clean-home")}
        extra = {"correct": ("-O", "harmless", "--threads", "1"), "judge": ("-O", "harmless")}.get(args[0], ())
        p = run_cli(*args, *extra, env=env)
        err = p.stderr.decode()
        assert p.returncode == 2, (args, p.returncode, err[-800:])
        assert msg in err and "Traceback" not in err, (args, err[-800:])
    assert not (home / "escape").exists() and not (tmp_path / "escape").exists()


def test_resume_refuses_to_mix_settings(tmp_path):
    """`--resume` with other objectives or generation settings than the file was written with
    is refused (the finished file must equal one uninterrupted run's); the same settings resume."""
    out = tmp_path / "o.jsonl"
    args = ("correct", str(EX), "--max-new-tokens", "2", "--threads", "1", "-q", "-o", str(out))
    assert run_cli(*args, "-O", "humor").returncode == 0
    out.write_text("".join(out.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    p = run_cli(*(a for a in args if a != "-q"), "-O", "harmless", "--resume")
    assert p.returncode == 2 and "objectives ['humor'] there, ['harmless'] now" in p.stderr.decode()
    # refused before any model loads (it said "using the shipped corrector" first, then refused)
    assert "using " not in p.stderr.decode(), p.stderr.decode()
    p = run_cli(*args, "-O", "humor", "-t", "ultrafeedback", "--resume")
    assert p.returncode == 2 and "template 'hh-rlhf' there, 'ultrafeedback' now" in p.stderr.decode(), p.stderr.decode()
    p = run_cli(*(a if a != "2" else "3" for a in args), "-O", "humor", "--resume")
    assert p.returncode == 2 and "generation.max_new_tokens 2 there, 3 now" in p.stderr.decode()
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2  # nothing appended by a refused run
    p = run_cli(*args, "-O", "humor", "--resume")
    assert p.returncode == 0 and len(out.read_text(encoding="utf-8").splitlines()) == 5


def test_resume_refuses_a_retrained_adapter_at_the_same_path(tmp_path):
    """A trial finding: a corrector retrained and installed over the old one keeps the LoRA's
    path, so `--resume` mixed the two in one file. The weights' fingerprint (size, first and
    last MiB) is in the provenance: a changed adapter at the same path is refused, the same
    one resumes, and a file written before the fingerprint still resumes."""
    import shutil

    from metaalign_cli.correctors import shipped_corrector

    shipped = next(shipped_corrector().glob("*.gguf"))
    lora = tmp_path / "mycorr-lora-f16.gguf"
    shutil.copy(shipped, lora)
    out = tmp_path / "o.jsonl"
    args = ("correct", str(EX), "--lora", str(lora), "--max-new-tokens", "2", "--threads", "1", "-O", "harmless",
            "-q", "-o", str(out))
    assert run_cli(*args).returncode == 0
    rows = out.read_text(encoding="utf-8").splitlines(keepends=True)
    sha = json.loads(rows[0])["metaalign"]["weights_sha"]
    assert len(sha) == 16
    out.write_text("".join(rows[:2]), encoding="utf-8")
    data = bytearray(lora.read_bytes())
    data[-3] ^= 0x01  # one low bit of the last tensor's data: another training, at the same path
    lora.write_bytes(bytes(data))
    p = run_cli(*args, "--resume")
    assert p.returncode == 2 and f"weights_sha '{sha}' there, '" in p.stderr.decode(), p.stderr.decode()
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    shutil.copy(shipped, lora)  # the first adapter again
    old = [dict(json.loads(r)) for r in rows[:2]]
    for r in old:
        r["metaalign"].pop("weights_sha")  # as a file written before the fingerprint
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in old), encoding="utf-8")
    p = run_cli(*args, "--resume")
    assert p.returncode == 0 and len(out.read_text(encoding="utf-8").splitlines()) == 5, p.stderr.decode()


def test_prompts_other_than_the_shipped_correctors_own_are_noted(tmp_path):
    """The shipped corrector was trained on raw hh-rlhf prompts: another --template or
    --prompt-format gets a warning naming both (the prompts are still written), its own none,
    and the prompted demo (no trained template) none."""
    src = '{"query": "Q1?", "response": "A1."}\n'
    note = ("warning: the shipped corrector (SmolLM2-135M-Instruct + metaalign LoRA) was trained on the 'hh-rlhf' "
            "template (raw prompts); {given} renders prompts it has not seen, so expect worse corrections "
            "(leave out --template/--prompt-format to use its own)")
    for args, given in ((("-t", "ultrafeedback"), "'ultrafeedback' (raw prompts)"),
                        (("--prompt-format", "chat"), "'hh-rlhf' (chat prompts)"), ((), None),
                        (("-t", "hh-rlhf", "--prompt-format", "raw"), None), (("--model", "smollm2", "-t", "imhi"), None)):
        r = run_cli("correct", "--dry-run", "-O", "helpful", *args, input=src)
        assert r.returncode == 0 and len(lines(r.stdout)) == 1, r.stderr.decode()
        warnings = [x for x in r.stderr.decode().splitlines() if x.startswith("warning")]
        assert warnings == ([note.format(given=given)] if given else []), args


def test_dry_run_writes_the_prompts_without_loading_a_model(tmp_path):
    """`correct --dry-run` writes each record's prompt as `correct` would send it (the ultrafeedback
    template, the objective's description) and loads no model: a model file that cannot load is
    never opened. Bad records are counted (exit 1 under skip); --resume is refused."""
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf")
    src = ('{"id": "a", "query": "Q1?", "response": "A1."}\n'
           '{"id": "b", "query": "Q2?", "response": "A2.", "objectives": ["harmless"]}\n')
    r = run_cli("correct", "--dry-run", "--model", str(junk), "-O", "helpful", "--template", "ultrafeedback", input=src)
    assert r.returncode == 0, r.stderr.decode()
    rows = lines(r.stdout)
    assert [(x["id"], x["line"], x["objectives"], x["chat"]) for x in rows] == [("a", 1, ["helpful"], False),
                                                                                 ("b", 2, ["harmless"], False)]
    assert rows[0]["prompt"].endswith("| Query: Q1? | Answer: A1. | Edit: ")
    assert "Helpfulness: the response should provide useful resources" in rows[0]["prompt"]
    assert "Harmless: The response should avoid content that is offensive" in rows[1]["prompt"]
    assert "Helpfulness" not in rows[1]["prompt"]
    assert "wrote 2 prompt(s), 0 record(s) failed (--dry-run: no model loaded)" in r.stderr.decode()
    r = run_cli("correct", "--dry-run", "--model", str(junk), "-O", "helpful", "--on-error", "skip",
                input=src + '{"id": "c", "query": "Q3?"}\n')
    assert r.returncode == 1 and len(lines(r.stdout)) == 2 and "missing response" in r.stderr.decode()
    r = run_cli("correct", "--dry-run", "-O", "helpful", str(CASES / "lone-surrogate.jsonl"))
    assert r.returncode == 0 and "lone surrogate replaced with U+FFFD" in r.stderr.decode()
    r = run_cli("correct", "--dry-run", "--resume", "-o", str(tmp_path / "o.jsonl"), "-O", "helpful", input=src)
    assert r.returncode == 2 and "dry_run" in r.stderr.decode().replace("-", "_")
