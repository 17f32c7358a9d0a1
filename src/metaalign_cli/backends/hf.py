"""transformers backend: full-precision HF models, batched, on GPU when present."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from typing import Literal

from pydantic import Field

from metaalign_cli.backends.base import Backend, BackendOptions, Generation, GenerationSettings, Prompt, is_looping
from metaalign_cli.errors import MetaAlignError


class TransformersOptions(BackendOptions):
    """Load options of the transformers backend."""

    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="auto: cuda, then mps, then cpu.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp32 elsewhere.")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call (left padding, length-sorted).")
    attn_implementation: str | None = Field(None, description="Default: flash_attention_2 on a GPU when installed, "
                                                              "else sdpa.")


def pick_device(device: str = "auto") -> str:
    """``auto``: cuda, then mps, then cpu."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, dtype: str = "auto"):
    """``auto``: bf16 on a GPU that supports it, fp32 elsewhere (CPU)."""
    import torch

    if dtype != "auto":
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def pick_attention(device: str) -> str:
    """flash_attention_2 when flash-attn is installed and a CUDA GPU is present, else sdpa."""
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class TransformersBackend(Backend):
    """A causal LM through transformers: HF directory, hub id, or a ``.gguf`` file (loaded with
    ``gguf_file=``, dequantized). A directory holding a peft LoRA adapter is loaded on its base.

    Options: ``device`` (auto|cuda|mps|cpu), ``dtype`` (auto|bf16|fp16|fp32), ``batch_size``
    (prompts per ``generate`` call; left padding; prompts sorted by length and results restored
    to input order), ``attn_implementation`` (default: :func:`pick_attention`).
    Raises MetaAlignError when the model cannot be loaded.
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
        self.attn = attn_implementation or pick_attention(self.device)
        self.batch_size = max(1, int(batch_size))
        self.model_id = str(model)
        kw: dict = {}
        src = str(model)
        p = Path(src)
        if p.suffix == ".gguf":
            if not p.is_file():
                raise MetaAlignError(f"{p}: GGUF model file not found")
            src, kw["gguf_file"] = str(p.parent), p.name
        try:
            adapter = p.is_dir() and (p / "adapter_config.json").is_file()
            if adapter:
                from peft import AutoPeftModelForCausalLM

                self.model = AutoPeftModelForCausalLM.from_pretrained(src, dtype=self.dtype, attn_implementation=self.attn)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(src, dtype=self.dtype, attn_implementation=self.attn, **kw)
            self.tokenizer = AutoTokenizer.from_pretrained(src, **kw)
        except (OSError, ValueError, ImportError) as e:
            raise MetaAlignError(f"{model}: cannot load model: {str(e).splitlines()[0]}") from None
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def context_length(self) -> int | None:
        cfg = self.model.config
        n = getattr(cfg, "max_position_embeddings", None)
        if n is None and hasattr(cfg, "get_text_config"):
            n = getattr(cfg.get_text_config(), "max_position_embeddings", None)
        return n

    def prompt_text(self, prompt: Prompt) -> str:
        """The exact string tokenized for ``prompt`` (chat template applied for chat prompts)."""
        if not prompt.chat:
            return prompt.text
        if not getattr(self.tokenizer, "chat_template", None):
            raise MetaAlignError(f"{self.model_id}: this tokenizer has no chat template; use a raw-prompt template")
        return self.tokenizer.apply_chat_template(prompt.messages(), tokenize=False, add_generation_prompt=True)

    def _ids(self, prompt: Prompt) -> list[int]:
        text = self.prompt_text(prompt)
        # Raw prompts get the model's BOS like training did; chat templates carry their own.
        return self.tokenizer(text, add_special_tokens=not prompt.chat)["input_ids"]

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
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
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
                kw["stopping_criteria"] = _loop_criteria(width)
            try:
                with torch.inference_mode():
                    out = self.model.generate(input_ids=input_ids.to(self.device),
                                              attention_mask=mask.to(self.device), **kw)
            except Exception as e:
                for i, _ in chunk:
                    results[i] = e
                continue
            for row, (i, ids) in enumerate(chunk):
                new = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in eos_ids or t == pad), None)
                new = new if cut is None else new[:cut]
                if settings.loop_guard and is_looping(new):
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

    def info(self) -> dict:
        return {"backend": self.name, "model": self.model_id, "device": self.device,
                "dtype": str(self.dtype).replace("torch.", ""), "attn_implementation": self.attn,
                "batch_size": self.batch_size}


def _loop_criteria(prompt_width: int):
    """A transformers StoppingCriteria that ends rows whose generated tail loops."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class LoopGuard(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            gen = input_ids[:, prompt_width:]
            done = [gen.shape[1] % 8 == 0 and is_looping(row.tolist()) for row in gen]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([LoopGuard()])
