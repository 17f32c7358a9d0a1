"""transformers backend: full-precision HF models, batched, on GPU when present."""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import Field

from metaalign_cli.backends.base import (Backend, BackendOptions, Generation, GenerationSettings, Prompt, TokenKinds,
                                         is_looping, tokenizer_prompt_ids, weights_fingerprint)
from metaalign_cli.errors import MetaAlignError


class TransformersOptions(BackendOptions):
    """Load options of the transformers backend."""

    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="auto: cuda, then mps, then cpu.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp32 elsewhere.")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call (left padding, length-sorted).")
    attn_implementation: str | None = Field(None, description="Default: flash_attention_2 on a GPU when installed, "
                                                              "else sdpa.")


def pick_device(device: str = "auto", flag: str = "--device") -> str:
    """``auto``: cuda, then mps, then cpu. Raises MetaAlignError when ``cuda`` or ``mps`` is
    asked for and torch has no such device here (``flag`` names the option in the message)."""
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise MetaAlignError(f"{flag} {device}: torch sees no CUDA GPU here"
                                 f"{'' if torch.version.cuda else ' (this torch is a CPU build)'}; use auto or cpu")
        if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise MetaAlignError(f"{flag} mps: torch sees no Apple GPU here; use auto or cpu")
        return device

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, dtype: str = "auto"):
    """``auto``: bf16 on a CUDA GPU with native bf16 (compute capability >= 8, Ampere or
    newer), fp32 elsewhere (CPU, MPS, pre-Ampere GPUs, where torch only emulates bf16 and
    ``torch.cuda.is_bf16_supported()`` alone says yes). Other values: bf16/bfloat16,
    fp16/float16, fp32/float32. Returns a ``torch.dtype``."""
    import torch

    if dtype != "auto":
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def pick_attention(device: str, dtype=None) -> str:
    """``flash_attention_2`` only where it can run: a CUDA device of compute capability >= 8
    (flash-attn 2 has no kernels for older GPUs), a half-precision compute ``dtype``
    (``torch.bfloat16``/``torch.float16``; flash-attn rejects fp32; None counts as fp32),
    transformers' own availability check (``is_flash_attn_2_available``: package and version)
    and an importable build (a flash-attn wheel built for another torch passes the metadata
    check and fails at import with an undefined symbol). Else ``sdpa``."""
    if not str(device).startswith("cuda"):
        return "sdpa"
    import torch

    if dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return "sdpa"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "sdpa"
    try:
        import flash_attn  # noqa: F401  (imports the compiled flash_attn_2_cuda extension)
    except Exception:  # ImportError, or OSError for an undefined symbol in the .so
        return "sdpa"
    return "flash_attention_2"


def pick_device_map(device: str, src: str, load_kw: dict, dtype) -> dict | str | None:
    """Where ``from_pretrained`` puts the weights, so they load straight onto the device (no
    full host copy moved afterwards): None on the CPU; ``{"": device}`` on one device; on
    CUDA, ``"auto"`` (accelerate spreads the layers over the visible GPUs, then CPU RAM)
    when the model's size in ``dtype`` (measured on an empty meta-device copy) exceeds 85% of
    GPU 0's free memory. ``load_kw``: the loader's extra keywords (``gguf_file``)."""
    if device == "cpu":
        return None
    if not str(device).startswith("cuda"):
        return {"": device}
    import torch

    if ":" in str(device):
        return {"": device}
    try:
        from accelerate import init_empty_weights
        from accelerate.utils import compute_module_sizes
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(src, **load_kw)
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(cfg)
        size = compute_module_sizes(empty, dtype=dtype)[""]
        free, _total = torch.cuda.mem_get_info(0)
    except Exception:  # an adapter directory, an unknown architecture: one GPU as before
        return {"": "cuda:0"}
    return "auto" if size > 0.85 * free else {"": "cuda:0"}


def _is_oom(e: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom)


class TransformersBackend(Backend):
    """A causal LM through transformers: HF directory, hub id, or a ``.gguf`` file (loaded with
    ``gguf_file=``, dequantized). A directory holding a peft LoRA adapter is loaded on its base.

    Options: ``device`` (auto|cuda|mps|cpu), ``dtype`` (auto|bf16|fp16|fp32, see
    :func:`pick_dtype`), ``batch_size`` (prompts per ``generate`` call; left padding; prompts
    sorted by length and results restored to input order; halved and retried when CUDA runs
    out of memory, down to one prompt), ``attn_implementation`` (default:
    :func:`pick_attention` for the device and dtype). The weights load straight onto the
    device (``device_map``, see :func:`pick_device_map`: spread over several GPUs when the
    model does not fit on one). Raises MetaAlignError when the model cannot be loaded.
    """

    name = "transformers"
    local = True
    Options = TransformersOptions

    def __init__(self, model: str | None, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 8, attn_implementation: str | None = None):
        if not model:
            raise MetaAlignError("the transformers backend needs --model (an HF directory or hub id)")
        try:
            import torch  # noqa: F401
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise MetaAlignError("the transformers backend needs torch and transformers: pip install 'metaalign-cli[torch]'") from None
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.attn = attn_implementation or pick_attention(self.device, self.dtype)
        self.batch_size = max(1, int(batch_size))
        self.model_id = str(model)
        self._weights_sha = weights_fingerprint([model])  # None for a hub id
        kw: dict = {}
        src = str(model)
        p = Path(src)
        if p.suffix == ".gguf":
            if not p.is_file():
                raise MetaAlignError(f"{p}: GGUF model file not found")
            src, kw["gguf_file"] = str(p.parent), p.name
        if not p.exists():
            check_hub_model(src)
        try:
            adapter = p.is_dir() and (p / "adapter_config.json").is_file()
            self.device_map = pick_device_map(self.device, src, kw, self.dtype)
            if adapter:
                from peft import AutoPeftModelForCausalLM

                self.model = AutoPeftModelForCausalLM.from_pretrained(src, dtype=self.dtype, attn_implementation=self.attn,
                                                                      device_map=self.device_map)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(src, dtype=self.dtype, attn_implementation=self.attn,
                                                                  device_map=self.device_map, **kw)
            self.tokenizer = AutoTokenizer.from_pretrained(src, **kw)
            self._kinds = TokenKinds.of(self.tokenizer)  # for the loop guard
        except (OSError, ValueError, ImportError) as e:
            hint = "" if Path(str(model)).exists() else f" ({not_found_hint()})"
            raise MetaAlignError(f"{model}: cannot load model{hint}: {str(e).splitlines()[0]}") from None
        self.model.eval()
        # Inputs go where the first layer is (a device_map "auto" model starts on cuda:0).
        self.input_device = self.model.device
        placed = sorted({str(d) for d in (getattr(self.model, "hf_device_map", None) or {}).values()})
        if self.device_map == "auto":
            self.device = "auto:" + ",".join(f"cuda:{d}" if isinstance(d, int) or str(d).isdigit() else str(d)
                                             for d in placed)
        elif self.device_map is not None:
            self.device = str(self.input_device)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def context_length(self) -> int | None:
        cfg = self.model.config
        n = getattr(cfg, "max_position_embeddings", None)
        if n is None and hasattr(cfg, "get_text_config"):
            n = getattr(cfg.get_text_config(), "max_position_embeddings", None)
        return n

    def _ids(self, prompt: Prompt) -> list[int]:
        return tokenizer_prompt_ids(self.tokenizer, prompt, self.model_id)

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return len(self._ids(prompt))

    def generate(self, prompts: list[Prompt], settings: GenerationSettings) -> list[Generation | Exception]:
        import torch

        results: list[Generation | Exception] = [RuntimeError("not generated")] * len(prompts)
        encoded: list[tuple[int, list[int]]] = []
        for i, p in enumerate(prompts):
            try:
                encoded.append((i, self._ids(p)))
            except Exception as e:
                results[i] = e
        encoded.sort(key=lambda x: len(x[1]))
        eos = self.tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        gen_cfg = getattr(self.model, "generation_config", None)
        if gen_cfg is not None and gen_cfg.eos_token_id is not None:
            e2 = gen_cfg.eos_token_id
            eos_ids |= set(e2 if isinstance(e2, list) else [e2])
        pad = self.tokenizer.pad_token_id
        pending = list(encoded)
        while pending:
            chunk, pending = pending[:self.batch_size], pending[self.batch_size:]
            try:
                out, width = self._generate_chunk(chunk, pad, eos_ids, settings)
            except Exception as e:
                if _is_oom(e) and len(chunk) > 1:
                    # CUDA out of memory: free the cache, halve the batch (kept for the rest
                    # of the run) and put this chunk back in front.
                    import sys

                    torch.cuda.empty_cache()
                    self.batch_size = max(1, len(chunk) // 2)
                    print(f"warning: CUDA out of memory at batch size {len(chunk)}; retrying at "
                          f"{self.batch_size}", file=sys.stderr)
                    pending = chunk + pending
                    continue
                for i, _ in chunk:
                    results[i] = e
                continue
            for row, (i, ids) in enumerate(chunk):
                new = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in eos_ids or t == pad), None)
                new = new if cut is None else new[:cut]
                if settings.loop_guard and is_looping(new, kinds=self._kinds):
                    finish = "loop"
                else:
                    finish = "length" if cut is None else "stop"
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                if settings.stop:
                    for s in settings.stop:
                        if s in text:
                            text, finish = text[:text.index(s)], "stop"
                results[i] = Generation(text, len(ids), len(new), finish)
        return results

    def _generate_chunk(self, chunk: list[tuple[int, list[int]]], pad: int, eos_ids: set, settings: GenerationSettings):
        """One left-padded ``generate`` call for ``chunk`` ((index, ids) pairs). Returns
        (output ids (rows x (width + new tokens)), width = the padded prompt length)."""
        import torch

        width = max(len(ids) for _, ids in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, ids) in enumerate(chunk):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        kw = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=pad,
                  eos_token_id=sorted(i for i in eos_ids if i is not None),
                  repetition_penalty=settings.repeat_penalty)
        if settings.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                      top_k=settings.top_k or None)
            torch.manual_seed(settings.seed)
        if settings.stop:
            kw.update(stop_strings=list(settings.stop), tokenizer=self.tokenizer)
        if settings.loop_guard:
            kw["stopping_criteria"] = _loop_criteria(width, self._kinds)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids.to(self.input_device),
                                      attention_mask=mask.to(self.input_device), **kw)
        return out, width

    def info(self) -> dict:
        return {"backend": self.name, "model": self.model_id, "device": self.device,
                "dtype": str(self.dtype).replace("torch.", ""), "attn_implementation": self.attn,
                "batch_size": self.batch_size, "weights_sha": self._weights_sha}


def _loop_criteria(prompt_width: int, kinds):
    """A transformers StoppingCriteria that ends rows whose generated tail loops."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class LoopGuard(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            gen = input_ids[:, prompt_width:]
            done = [gen.shape[1] % 8 == 0 and is_looping(row.tolist(), kinds=kinds) for row in gen]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([LoopGuard()])


def check_hub_model(model_id: str, timeout_s: float = 10.0) -> None:
    """Fail fast, with one clear line, for a hub id that cannot load: transformers would spend
    about 50 s on five retries (and print each) before saying the hub cannot be reached.

    Passes (returns None) when the hub cache holds the model's ``config.json``, when
    ``HF_HUB_OFFLINE`` is set (transformers then fails at once by itself), when the id is not a
    valid repo id (transformers names that), and on any answer from the hub other than "no such
    repository". Raises MetaAlignError when the hub says the repository does not exist (or is
    private or gated) and when the hub cannot be reached within ``timeout_s`` seconds."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    try:
        from huggingface_hub import model_info, try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    except ImportError:
        return
    try:
        if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            return
        model_info(model_id, timeout=timeout_s)
    except HFValidationError:
        return
    except RepositoryNotFoundError:
        raise MetaAlignError(f"{model_id}: no such model ({not_found_hint()}: the hub has no such repository, "
                             "or it is private or gated: `hf auth login`)") from None
    except Exception as e:
        if not _unreachable(e):  # any other answer: let transformers try, and say what it finds
            return
        raise MetaAlignError(f"{model_id}: cannot load model ({not_found_hint()}: it is not in the hub cache and the "
                             f"hub cannot be reached: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                             ) from None


def _unreachable(e: BaseException) -> bool:
    """True for a network failure (no route, no DNS, a timeout) from whichever HTTP client
    huggingface_hub uses (httpx, its fork, requests): matched by the exception classes' names."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(
        names & {"TransportError", "ConnectError", "ConnectionError", "Timeout", "TimeoutException"})


def not_found_hint() -> str:
    """What a model name that is not a local path was looked up as, for the load error: the
    installed correctors (by name) and the hub."""
    from metaalign_cli.correctors import installed_names

    names = installed_names()
    have = f"installed: {', '.join(names)}" if names else "none installed"
    return f"not a local path, not an installed corrector ({have}; `metaalign export RUN --install NAME`), tried as a hub id"
