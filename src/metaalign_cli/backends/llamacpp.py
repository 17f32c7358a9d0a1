"""llama.cpp backend (llama-cpp-python): quantized GGUF models on the local CPU (or GPU)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from typing import Literal

from pydantic import Field

from metaalign_cli.backends.base import (Backend, BackendOptions, Generation, GenerationSettings, Prompt, TokenKinds,
                                         is_looping, weights_fingerprint)
from metaalign_cli.errors import MetaAlignError
from metaalign_cli.gguf_types import GGUF_TYPES, QUANT_CHOICES, REQUANT_TYPES

MAX_BATCH_SEQUENCES = 64  # sequences decoded together at most (llama.cpp allows 256)

def avoid_amx_weights() -> bool:
    """Make llama.cpp load weights without its extra buffer types when its build uses AMX.

    On CPUs with AMX (Intel Sapphire Rapids and later) a llama.cpp built natively puts the
    quantized weights in an "AMX" buffer, and the first decode then segfaults in
    ``ggml_backend_amx_mul_mat`` (ggml-org/llama.cpp issue 20824; seen here with the Q4_1 and Q8_0
    GGUFs, LoRA or not). llama-cpp-python's ``Llama`` has no argument for the model's
    ``use_extra_bufts`` (llama.cpp's ``--no-repack``), so this wraps
    ``llama_model_default_params`` to return it False, for every later load in this process
    (``Llama``, the batched contexts, ``llama_cpp.server``). Costs the weight repacking that
    speeds up some quant types on CPU; on a build without AMX nothing changes.

    Returns True when the wrap is in place (now or from an earlier call), False when the
    build reports no ``AMX_INT8``. Raises ImportError without llama-cpp-python.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as low

    if getattr(low.llama_model_default_params, "_metaalign_no_amx", False):
        return True
    if b"AMX_INT8 = 1" not in low.llama_print_system_info():
        return False
    default_params = low.llama_model_default_params

    def no_extra_bufts():
        params = default_params()
        params.use_extra_bufts = False
        return params

    no_extra_bufts._metaalign_no_amx = True
    low.llama_model_default_params = llama_cpp.llama_model_default_params = no_extra_bufts
    return True


def idle_cores() -> int:
    """The cores other jobs leave idle: the core count minus the 1-minute load average, rounded,
    at least 1 (all cores where the load cannot be read). llama.cpp's threads busy-wait, so on
    a 2-core machine that another job keeps busy, 2 threads run ten to twenty times slower
    than 1; the text is the same whatever the count."""
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return n
    return max(1, min(n, round(n - load)))


def server_command(model: str | Path, alias: str, port: int, n_ctx: int = 4096, threads: int | None = None) -> list[str]:
    """The argv that runs llama-cpp-python's OpenAI-compatible server (``llama_cpp.server``) on
    127.0.0.1:``port`` serving the GGUF ``model`` as ``alias``, with :func:`avoid_amx_weights`
    applied first (the server has no flag for it). For tests and bench scripts that need a
    real local server; ``n_ctx`` in tokens, ``threads`` None = all cores."""
    boot = ("import runpy, sys; from metaalign_cli.backends.llamacpp import avoid_amx_weights; "
            "avoid_amx_weights(); sys.argv[0] = 'llama_cpp.server'; "
            "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", boot, "--model", str(model), "--model_alias", alias, "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads or os.cpu_count() or 2)]



class LlamaCppOptions(BackendOptions):
    """Load options of the llama-cpp backend."""

    n_ctx: int = Field(4096, ge=256, description="Context tokens.")
    threads: int | None = Field(None, ge=1, description="CPU threads; None = the idle cores (idle_cores()).")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU; -1 = all.")
    lora_path: str | None = Field(None, description="A GGUF LoRA adapter applied to the model.")
    seed: int = Field(0, description="Seed of llama.cpp's sampler.")
    flash_attn: bool = Field(False, description="llama.cpp's flash attention (no gain on CPU).")
    quant: Literal[QUANT_CHOICES] = Field(
        "auto", description="Load a copy re-quantized to this GGUF type, made once (cached): auto = q8_0 for the "
                            "embedded SmolLM2's Q4_1 (prefills ~1.7x faster on CPU), none = the file as it is.")


def resolve_quant(quant: str | None, model: str | os.PathLike | None) -> str | None:
    """The GGUF type to re-quantize ``model`` to, or None to load it as it is: ``auto`` (or
    None) means q8_0 for the embedded SmolLM2 (Q4_1, which llama.cpp prefills ~1.7x slower on
    CPU at the same decoding speed) and the file as it is for any other GGUF; ``none`` never
    re-quantizes; ``q8_0``/``f16``/``f32`` always do."""
    from metaalign_cli.correctors import is_embedded

    if quant in (None, "auto"):
        return "q8_0" if is_embedded(None if model is None else str(model)) else None
    return None if quant == "none" else quant


class LlamaCppBackend(Backend):
    """A GGUF model through llama-cpp-python.

    Options: ``n_ctx`` (context tokens, default 4096), ``threads`` (default: the idle
    cores, :func:`idle_cores`), ``n_gpu_layers`` (0 = CPU), ``lora_path`` (a GGUF LoRA
    adapter), ``seed``, ``flash_attn``, ``quant`` (``q8_0``, ``f16`` or ``f32``: load a copy
    re-quantized to that type, made once by :func:`requantized`; None = the file as it is).
    Chat prompts are formatted with the GGUF's own
    ``tokenizer.chat_template`` so prompt token counts are exact.

    Several prompts given to :meth:`generate` at once (``correct --batch-size N``) are decoded
    together in one llama.cpp batch (one sequence id and KV stream each, up to 64 at a time) when
    decoding is greedy without repeat penalty, the paper's setting. The template's shared opening
    is prefilled once and its KV cells copied to every sequence. Sampling settings decode one
    sequence after another through llama-cpp-python's high-level API. The outputs are the same
    either way.

    Raises MetaAlignError when the file is missing or cannot be loaded.
    """

    name = "llama-cpp"
    local = True
    Options = LlamaCppOptions

    def __init__(self, model: str | None, n_ctx: int = 4096, threads: int | None = None,
                 n_gpu_layers: int = 0, lora_path: str | None = None, seed: int = 0,
                 flash_attn: bool = False, quant: str | None = "auto"):
        from metaalign_cli.backends import default_model_path

        path = Path(model) if model else default_model_path()
        if not path.is_file():
            raise MetaAlignError(f"{path}: GGUF model file not found")
        try:
            from llama_cpp import Llama
        except ImportError:
            raise MetaAlignError("the llama-cpp backend needs llama-cpp-python: pip install llama-cpp-python") from None
        if lora_path:
            _check_lora(Path(lora_path))
        avoid_amx_weights()
        self.threads = threads or idle_cores()
        self.model_id = str(path)
        asked, quant = quant, resolve_quant(quant, path)
        warnings = []
        load_path = path
        if quant:
            try:
                load_path = requantized(path, quant, self.threads)
            except (MetaAlignError, FileNotFoundError) as e:
                if asked not in (None, "auto"):
                    raise
                # The default's speed-up must never stop a run: without a writable cache, load as is.
                warnings.append(f"{e}; loading the model file as it is (--quant none)")
                quant = None
        self.warnings = tuple(warnings)
        self.options = {"n_ctx": n_ctx, "threads": self.threads, "n_gpu_layers": n_gpu_layers,
                        "lora_path": lora_path, "flash_attn": flash_attn, "quant": quant,
                        "weights_sha": weights_fingerprint([path, lora_path])}

        def load():
            return Llama(model_path=str(load_path), n_ctx=n_ctx, n_threads=self.threads,
                         n_threads_batch=self.threads, n_gpu_layers=n_gpu_layers,
                         lora_path=lora_path, seed=seed, flash_attn=flash_attn, verbose=False)

        try:
            try:
                self.llm = load()
            except (ValueError, RuntimeError):
                if load_path == path:
                    raise
                load_path.unlink(missing_ok=True)  # a damaged cached copy: made again, once
                load_path = requantized(path, quant, self.threads)
                self.llm = load()
        except (ValueError, RuntimeError) as e:
            raise MetaAlignError(f"{path}: cannot load GGUF model: {e}") from None
        self._kinds = TokenKinds(lambda t: self.llm.detokenize([t]).decode("utf-8", errors="ignore"))  # loop guard
        self._bctx = None  # (llama_context, n_ctx, n_seq_max) for batched decoding, grown on demand
        self._formatter = None
        tpl = self.llm.metadata.get("tokenizer.chat_template")
        if tpl:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            def tok_text(tid: int) -> str:
                return self.llm._model.token_get_text(tid) if tid != -1 else ""

            self._formatter = Jinja2ChatFormatter(
                template=tpl, eos_token=tok_text(self.llm.token_eos()),
                bos_token=tok_text(self.llm.token_bos()), stop_token_ids=[self.llm.token_eos()])

    def context_length(self) -> int:
        return self.llm.n_ctx()

    def _tokens(self, prompt: Prompt) -> tuple[list[int], list[str]]:
        if not prompt.chat:
            return self.llm.tokenize(prompt.text.encode("utf-8"), add_bos=True, special=False), []
        if self._formatter is None:
            raise MetaAlignError(f"{self.model_id}: this GGUF has no chat template; use a raw-prompt template")
        res = self._formatter(messages=prompt.messages())
        stop = res.stop if isinstance(res.stop, list) else ([res.stop] if res.stop else [])
        text = res.prompt
        # The template may already start with BOS; llama.cpp would add a second one.
        toks = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        bos = self.llm.token_bos()
        if len(toks) > 1 and toks[0] == bos and toks[1] == bos:
            toks = toks[1:]
        return toks, stop

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return len(self._tokens(prompt)[0])

    def generate(self, prompts: list[Prompt], settings: GenerationSettings) -> list[Generation | Exception]:
        if len(prompts) > 1 and settings.greedy and settings.repeat_penalty == 1.0:
            toks: list = []
            for p in prompts:
                try:
                    toks.append(self._tokens(p))
                except Exception as e:  # noqa: BLE001 - reported for this prompt only
                    toks.append(e)
            ok = [i for i, t in enumerate(toks) if not isinstance(t, Exception)]
            gens = []
            try:
                for k in range(0, len(ok), MAX_BATCH_SEQUENCES):
                    gens += self._generate_batched([toks[i] for i in ok[k:k + MAX_BATCH_SEQUENCES]], settings)
            except Exception:  # noqa: BLE001 - the batch failed as a whole: decode one by one
                return self._generate_sequential(prompts, settings)
            for i, g in zip(ok, gens):
                toks[i] = g
            return toks
        return self._generate_sequential(prompts, settings)

    def _batch_context(self, n_ctx: int, n_seq: int):
        """A llama.cpp context for ``n_seq`` sequences with ``n_ctx / n_seq`` KV cells each,
        reused while large enough; the loaded LoRA adapter is applied to it too."""
        import llama_cpp

        if self._bctx is not None and self._bctx[1] // self._bctx[2] >= n_ctx // n_seq and self._bctx[2] == n_seq:
            return self._bctx[0]
        if self._bctx is not None:
            llama_cpp.llama_free(self._bctx[0])
            self._bctx = None
        base = self.llm.context_params
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(512, n_ctx)
        params.n_seq_max = n_seq
        params.kv_unified = False  # one KV stream per sequence: attention never scans the others' cells
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn_type = base.flash_attn_type
        params.type_k, params.type_v = base.type_k, base.type_v
        params.offload_kqv = base.offload_kqv
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        if ctx is None:
            raise MetaAlignError(f"{self.model_id}: cannot create a llama.cpp context for {n_seq} sequences")
        adapter = getattr(self.llm, "_lora_adapter", None)
        if adapter is not None:
            import ctypes

            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(self.llm.lora_scale)
            if llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales):
                llama_cpp.llama_free(ctx)
                raise MetaAlignError(f"{self.model_id}: cannot apply the LoRA adapter to a batch context")
        self._bctx = (ctx, n_ctx, n_seq)
        return ctx

    def _generate_batched(self, items: list[tuple[list[int], list[str]]],
                          settings: GenerationSettings) -> list[Generation]:
        """Greedy decoding of several prompts in one llama.cpp batch.

        ``items``: (prompt token ids, extra stop strings) per prompt. Each prompt is prefilled on
        its own in chunks of up to 512 tokens, then every step decodes one token for each unfinished
        sequence in a single ``llama_decode`` call. Each sequence stops at an end-of-generation
        token, a stop string (the text is cut before it), the loop guard, or
        ``max_new_tokens``; finish reasons as in the sequential path. Raises MetaAlignError
        when llama.cpp fails to decode (the caller then falls back to one prompt at a time).
        """
        import llama_cpp
        import numpy as np

        n = len(items)
        per_seq = -(-max(len(t) + settings.max_new_tokens for t, _ in items) // 256) * 256
        ctx = self._batch_context(per_seq * n, n)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        n_vocab = self.llm.n_vocab()
        cap = min(512, self._bctx[1])
        batch = llama_cpp.llama_batch_init(cap, 0, 1)
        stops = [list(settings.stop) + s for _, s in items]
        gen: list[list[int]] = [[] for _ in range(n)]
        done: list[str | None] = [None] * n
        texts = [""] * n
        nxt: dict[int, int] = {}

        def run(entries):  # entries: (seq, token, pos, wants_logits)
            batch.n_tokens = len(entries)
            for k, (seq, tok, pos, want) in enumerate(entries):
                batch.token[k] = tok
                batch.pos[k] = pos
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = seq
                batch.logits[k] = 1 if want else 0
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise MetaAlignError(f"{self.model_id}: llama_decode failed with code {rc}")
            for k, (seq, _tok, _pos, want) in enumerate(entries):
                if want:
                    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, k), shape=(n_vocab,))
                    nxt[seq] = int(logits.argmax())

        try:
            # The prompts share the template's opening: prefill it once (sequence 0) and copy its
            # KV cells to the others, then prefill the rest of each prompt on its own.
            shared = _common_prefix([t for t, _ in items])
            shared = min(shared, min(len(t) for t, _ in items) - 1)
            if n > 1 and shared >= 16:
                entries = [(0, tok, pos, False) for pos, tok in enumerate(items[0][0][:shared])]
                for i in range(0, len(entries), cap):
                    run(entries[i:i + cap])
                mem = llama_cpp.llama_get_memory(ctx)
                for seq in range(1, n):
                    llama_cpp.llama_memory_seq_cp(mem, 0, seq, -1, -1)
            else:
                shared = 0
            for seq, (toks, _) in enumerate(items):  # one sequence at a time (faster on CPU)
                entries = [(seq, tok, pos, pos == len(toks) - 1) for pos, tok in enumerate(toks) if pos >= shared]
                for i in range(0, len(entries), cap):
                    run(entries[i:i + cap])
            while True:
                step = []
                for seq in range(n):
                    if done[seq]:
                        continue
                    tok = nxt[seq]
                    if llama_cpp.llama_vocab_is_eog(vocab, tok):
                        done[seq] = "stop"
                        continue
                    gen[seq].append(tok)
                    texts[seq] = self.llm.detokenize(gen[seq]).decode("utf-8", errors="ignore")
                    cut = [texts[seq].find(s) for s in stops[seq] if s and s in texts[seq]]
                    if cut:
                        texts[seq] = texts[seq][:min(cut)]
                        done[seq] = "stop"
                    elif len(gen[seq]) >= settings.max_new_tokens:
                        done[seq] = "length"
                    elif settings.loop_guard and len(gen[seq]) % 8 == 0 and is_looping(gen[seq], kinds=self._kinds):
                        done[seq] = "loop"
                    else:
                        step.append((seq, tok, len(items[seq][0]) + len(gen[seq]) - 1, True))
                if not step:
                    break
                run(step)
        finally:
            llama_cpp.llama_batch_free(batch)
        return [Generation(texts[i], len(items[i][0]), len(gen[i]), done[i]) for i in range(n)]

    def _generate_sequential(self, prompts: list[Prompt], settings: GenerationSettings) -> list[Generation | Exception]:
        out: list[Generation | Exception] = []
        for p in prompts:
            try:
                toks, stop = self._tokens(p)
                looped = []
                criteria = None
                if settings.loop_guard:
                    from llama_cpp import StoppingCriteriaList

                    start = len(toks)

                    def guard(ids, _logits, start=start, looped=looped):
                        gen = ids[start:]
                        if len(gen) % 8 == 0 and is_looping(gen, kinds=self._kinds):
                            looped.append(True)
                            return True
                        return False

                    criteria = StoppingCriteriaList([guard])
                r = self.llm.create_completion(
                    prompt=toks, max_tokens=settings.max_new_tokens,
                    temperature=settings.temperature, top_p=settings.top_p,
                    top_k=settings.top_k, min_p=0.0, repeat_penalty=settings.repeat_penalty,
                    seed=settings.seed, stop=list(settings.stop) + stop or None,
                    stopping_criteria=criteria)
                ch = r["choices"][0]
                out.append(Generation(ch["text"], r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"],
                                      "loop" if looped else ch.get("finish_reason")))
            except Exception as e:  # one failed prompt never takes another's result
                out.append(e)
        return out

    def info(self) -> dict:
        return {"backend": self.name, "model": self.model_id, **{k: v for k, v in self.options.items() if v}}

    def close(self) -> None:
        if getattr(self, "_bctx", None) is not None:
            import llama_cpp

            llama_cpp.llama_free(self._bctx[0])
            self._bctx = None
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()


def requantized(path: str | os.PathLike, quant: str, threads: int | None = None) -> Path:
    """A copy of the GGUF model ``path`` with its weights re-quantized to ``quant`` (``q8_0``,
    ``f16`` or ``f32``: :data:`~metaalign_cli.gguf_types.REQUANT_TYPES`) by llama.cpp's own quantizer, made once and
    kept in ``<cache_dir>/gguf/`` (see :func:`metaalign_cli.correctors.cache_dir`).

    Why: llama.cpp's CPU prompt processing (prefill) is much faster for Q8_0/F16 weights
    (tiled sgemm) than for Q4_1; on a 2-core AVX2 machine the embedded SmolLM2 prefills
    ~1.7x faster as Q8_0, decodes at the same speed, and its greedy outputs stay as close to
    the fp32 weights (see ``bench/correct_throughput.py``). The cost is disk and RAM: Q8_0 is
    ~1.6x the size of Q4_1, F16 ~3x, so this is for small models.

    The copy is named after the source's resolved path, size and modification time, so an
    edited source makes a new copy. It is written to a temporary file in the same directory
    and renamed into place: an interrupted or failed conversion leaves nothing behind, and two
    processes converting at once both end with a whole file.

    Returns the path of the copy (made even when the source already has that type). Raises
    MetaAlignError for an unknown ``quant``, a file that llama.cpp cannot quantize, or a cache
    directory that cannot be written.
    """
    import hashlib
    import tempfile

    from metaalign_cli.correctors import cache_dir

    if quant not in REQUANT_TYPES:
        raise MetaAlignError(f"unknown quantization '{quant}' (known: {', '.join(REQUANT_TYPES)})")
    src = Path(path).resolve()
    try:
        st = src.stat()
    except OSError as e:
        raise MetaAlignError(f"{path}: cannot read GGUF model: {e.strerror or e}") from None
    key = hashlib.sha256(f"{src}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out_dir = cache_dir() / "gguf"
    dst = out_dir / f"{src.stem}.{key}.{quant}.gguf"
    if dst.is_file():
        return dst
    import threading
    import time

    import llama_cpp

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("*.part"):  # left by a killed conversion (a live one is younger)
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".part", dir=out_dir)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model copy is not a secret
    except OSError as e:
        raise MetaAlignError(f"{out_dir}: cannot write the re-quantized model: {e.strerror or e}") from None
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = GGUF_TYPES[quant]
        params.allow_requantize = True
        params.nthread = threads or os.cpu_count() or 1
        try:
            from llama_cpp._logger import set_verbose

            set_verbose(False)  # llama.cpp would log every tensor on stderr
        except ImportError:
            pass
        # In a thread, so that Ctrl-C stops the wait (the C call cannot be interrupted; the
        # daemon thread dies with the process and the temporary file is removed below).
        result: dict = {}
        done = threading.Event()

        def convert() -> None:
            try:
                result["rc"] = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), params)
            finally:
                done.set()

        threading.Thread(target=convert, name="metaalign-requantize", daemon=True).start()
        while not done.wait(0.1):
            pass
        rc = result.get("rc", -1)
        if rc != 0:
            raise MetaAlignError(f"{path}: llama.cpp could not re-quantize this model to {quant} (code {rc})")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def _check_lora(path: Path) -> None:
    """Raise MetaAlignError unless ``path`` is a GGUF LoRA adapter (``general.type`` adapter):
    llama.cpp crashes the process on a missing file or on a full model given as an adapter."""
    if not path.is_file():
        raise MetaAlignError(f"{path}: LoRA adapter file not found")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise MetaAlignError(f"{path}: not a GGUF file (a LoRA adapter must be a GGUF; see `metaalign export`)")
    try:
        from gguf import GGUFReader
    except ImportError:
        return
    try:
        field = GGUFReader(str(path)).fields.get("general.type")
        kind = field.contents() if field is not None else None
    except Exception as e:  # noqa: BLE001 - a damaged file
        raise MetaAlignError(f"{path}: unreadable GGUF: {e}") from None
    if kind != "adapter":
        raise MetaAlignError(f"{path}: not a GGUF LoRA adapter (general.type is {kind!r}, not 'adapter')")


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest prefix all token lists share."""
    first = seqs[0]
    n = min(len(t) for t in seqs)
    for i in range(n):
        tok = first[i]
        if any(t[i] != tok for t in seqs):
            return i
    return n
