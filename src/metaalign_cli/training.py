"""MetaAligner training: the three-step paradigm of paper section 3.3 on Eq. 6.

Eq. 6 is plain supervised fine-tuning of the corrector delta_theta on the target response y
given the rendered prompt T(q, y0, O, t): the cross-entropy is taken on the target tokens
only (plus EOS, so the corrector learns to stop). The three steps, each continuing from the
previous one's weights:

1. ``warmup``: identity pairs (a sample of the equal-preference subset with y = y0);
2. ``equal``: the equal-preference subset D_e;
3. ``preference``: the preference subset D_p.

The machinery is the field's: TRL's ``SFTTrainer`` (optimizer, schedule, packing or length
grouping, checkpoints, accelerate/FSDP/DeepSpeed), peft for LoRA, transformers for models.
What is ours: the stage order, the data contract of ``build-data``, the prompt/target
tokenization (see :func:`tokenize_example` for why it is not TRL's prompt-completion path),
and the output directory ``correct --model DIR`` reads.

Heavy imports (torch, transformers, trl, peft, datasets) happen inside the functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

import yaml

from metaalign_cli.config import Invalid, load_config, opt
from metaalign_cli.correctors import MODEL_CARD, TRAIN_CONFIG
from metaalign_cli.errors import ConfigError, InputError, MetaAlignError
from metaalign_cli.gguf_types import GGUF_TYPES
from metaalign_cli.stages import STAGES
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = TRAIN_CONFIG
STAGE_DONE = "stage.json"
TOO_LONG = "every sequence longer than max_length"  # why a stage with rows was not trained


@dataclass
class TrainConfig:
    """Every knob of ``metaalign train``, with the paper's Table 5 values as defaults where
    the paper gives one (lr 1e-5, 2 epochs, warm-up ratio 0.05, Adam, BF16, max 2048 tokens
    for the 1.1B corrector); the cosine schedule is the issue's. Loaded from YAML by
    :func:`load_train_config`, overridden by CLI flags (generated from these fields), saved
    beside the model."""

    # model
    base_model: str | None = opt(None, "Hub id, HF directory, .gguf file, or smollm2 (the embedded "
                                       "SmolLM2-135M-Instruct GGUF, the default).", flags=("--base-model", "-m"),
                                 metavar="MODEL", panel="Model")
    output_dir: str = opt("metaaligner-out", "Directory for the trained corrector, checkpoints and metrics.",
                          flags=("--output", "-o"), metavar="DIR", panel="Model")
    template: str | None = opt(None, "Correction template the prompts were rendered with (recorded for `correct`). "
                                     "Default: the rows' 'template' field, else hh-rlhf.", flags=("--template", "-t"),
                               metavar="NAME", panel="Model")
    prompt_format: str | None = opt(None, "raw or chat: how the prompt is fed (must match `correct`). Default: the "
                                          "template's.", choices=("raw", "chat"), metavar="FORMAT", panel="Model")
    # data
    data_dir: list[str] = opt([], "Output directory of `metaalign build-data` (DIR/train/{warmup,equal,"
                                  "preference}.jsonl; repeatable: their stage files are concatenated).",
                              flags=("--data", "-d"), metavar="DIR", panel="Data")
    split: str = opt("train", "Split of the data directories to train on.", metavar="NAME", panel="Data")
    warmup_file: str | None = opt(None, "Warm-up JSONL (overrides --data's).", flags=("--warmup",), metavar="FILE",
                                  panel="Data")
    equal_file: str | None = opt(None, "Equal-preference subset JSONL (overrides --data's).", flags=("--equal",),
                                 metavar="FILE", panel="Data")
    preference_file: str | None = opt(None, "Preference subset JSONL (overrides --data's).", flags=("--preference",),
                                      metavar="FILE", panel="Data")
    warmup_samples: int | None = opt(None, "Use at most N warm-up rows (seeded random sample). Default: all.", min=1,
                                     metavar="N", panel="Data")
    equal_samples: int | None = opt(None, "Use at most N equal-preference rows. Default: all.", min=1, metavar="N",
                                    panel="Data")
    preference_samples: int | None = opt(None, "Use at most N preference rows. Default: all.", min=1, metavar="N",
                                         panel="Data")
    stages: list[str] = opt(list(STAGES), "Stages to run, in order, comma-separated (of warmup, equal, preference).",
                            split=True, choices=STAGES, metavar="NAMES", panel="Data")
    # optimisation (Table 5)
    learning_rate: float = opt(1e-5, "Peak learning rate (Table 5: 1e-5; LoRA wants ~2e-4).",
                               flags=("--lr", "--learning-rate"), min=0.0, metavar="LR", panel="Optimisation")
    epochs: float = opt(2.0, "Epochs per stage (Table 5: 2).", min=0.0, metavar="N", panel="Optimisation")
    warmup_epochs: float | None = opt(None, "Epochs of the warm-up stage. Default: --epochs.", min=0.0, metavar="N",
                                      panel="Optimisation")
    equal_epochs: float | None = opt(None, "Epochs of the equal-preference stage. Default: --epochs.", min=0.0,
                                     metavar="N", panel="Optimisation")
    preference_epochs: float | None = opt(None, "Epochs of the preference stage. Default: --epochs.", min=0.0,
                                          metavar="N", panel="Optimisation")
    max_steps: int | None = opt(None, "Cap on optimizer steps per stage (overrides the epochs).", min=1, metavar="N",
                                panel="Optimisation")
    warmup_ratio: float = opt(0.05, "Fraction of each stage's steps with linear learning-rate warm-up (Table 5: "
                                    "0.05).", min=0.0, max=0.999, metavar="X", panel="Optimisation")
    lr_scheduler: str = opt("cosine", "transformers learning-rate scheduler name, e.g. cosine, linear or constant.",
                            metavar="NAME", panel="Optimisation")
    optimizer: str = opt("adamw_torch", "transformers optimizer name (Table 5: Adam).", metavar="NAME",
                         panel="Optimisation")
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0.0, metavar="X", panel="Optimisation")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.", min=0.0, metavar="X", panel="Optimisation")
    batch_size: int = opt(4, "Sequences per device per step (the paper's global batch was 512 over 4 GPUs).", min=1,
                          metavar="N", panel="Optimisation")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", flags=("--grad-accum",), min=1,
                                           metavar="N", panel="Optimisation")
    max_length: int = opt(2048, "Longest prompt+target+EOS in tokens (Table 5: 2048 for the 1.1B corrector); "
                                "longer rows are dropped.", min=1, metavar="N", panel="Optimisation")
    truncate: bool = opt(False, "Truncate longer sequences (keeping the prompt start) instead of dropping them.",
                         flags=("--truncate/--no-truncate",), panel="Optimisation")
    seed: int = opt(42, "Seed of sampling, LoRA init, shuffling and dropout.", metavar="N", panel="Optimisation")
    # precision and memory
    precision: str = opt("auto", "auto (bf16 autocast on GPUs that support it, else fp32), bf16 (autocast, fp32 "
                                 "master weights) or fp32.", choices=("auto", "bf16", "fp32"), metavar="P",
                         panel="Precision and memory")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass (less memory, ~30% "
                                              "slower).", flags=("--gradient-checkpointing/--no-gradient-checkpointing",),
                                       panel="Precision and memory")
    attn_implementation: str | None = opt(None, "Default: flash_attention_2 on a GPU when flash-attn is installed, "
                                                "else sdpa.", metavar="NAME", panel="Precision and memory")
    packing: str = opt("auto", "auto (packing with flash-attention 2, length grouping otherwise), pack, group or "
                               "none.", choices=("auto", "pack", "group", "none"), metavar="MODE",
                       panel="Precision and memory")
    device: str = opt("auto", "auto, cuda or cpu.", choices=("auto", "cuda", "cpu"), metavar="DEVICE",
                      panel="Precision and memory")
    # LoRA
    lora_r: int | None = opt(None, "LoRA rank; unset = full fine-tuning.", min=1, metavar="R", panel="LoRA")
    lora_alpha: int | None = opt(None, "LoRA alpha. Default: 2 * lora_r.", min=1, metavar="A", panel="LoRA")
    lora_dropout: float = opt(0.05, "LoRA dropout.", min=0.0, max=1.0, metavar="X", panel="LoRA")
    lora_target: str = opt("all-linear", "Modules LoRA adapts: all-linear or comma-separated names (q_proj,v_proj).",
                           metavar="NAMES", panel="LoRA")
    qlora: bool = opt(False, "Load the base in 4 bit (needs bitsandbytes and a CUDA GPU).",
                      flags=("--qlora/--no-qlora",), panel="LoRA")
    merge: bool = opt(True, "LoRA runs: save the merged full model at the top of the output (the adapter stays in "
                            "adapter/).", flags=("--merge/--no-merge",), panel="LoRA")
    # checkpoints, logs, export
    save_steps: int = opt(200, "Checkpoint every N optimizer steps within a stage (plus one after each stage).",
                          min=1, metavar="N", panel="Checkpoints, logs, export")
    save_total_limit: int | None = opt(2, "Keep at most this many step checkpoints per stage.", min=1, metavar="N",
                                       panel="Checkpoints, logs, export")
    logging_steps: int = opt(1, "Log loss, learning rate and tokens/s every N steps.", min=1, metavar="N",
                             panel="Checkpoints, logs, export")
    report_to: list[str] = opt(["none"], "Experiment trackers the trainer also logs to (transformers' report_to): "
                                         "none, or comma-separated tensorboard, wandb, mlflow, trackio (each must "
                                         "be installed).", split=True, metavar="NAMES",
                               panel="Checkpoints, logs, export")
    plot: bool = opt(False, "Write loss.png (needs matplotlib).", flags=("--plot/--no-plot",),
                     panel="Checkpoints, logs, export")
    export_gguf: list[str] = opt([], "After training, export GGUF files of these types, comma-separated (f16, f32, "
                                     "q8_0, q4_k_m, q4_0, q5_k_m, q6_k).", split=True, choices=tuple(GGUF_TYPES),
                                 metavar="TYPES", panel="Checkpoints, logs, export")

    def validate(self) -> None:
        """Cross-field checks (ranges and choices come from the field metadata). Raises Invalid."""
        if self.qlora and self.lora_r is None:
            raise Invalid("qlora", "needs lora_r (QLoRA trains a LoRA adapter on a 4-bit base)")
        if not self.stages:
            raise Invalid("stages", "needs at least one stage")
        if len(set(self.stages)) < len(self.stages):
            raise Invalid("stages", f"names a stage twice ({','.join(self.stages)}); each runs once, in the order "
                                    "warmup, equal, preference")
        if self.max_steps is None and not any(self.stage_epochs(s) > 0 for s in self.stages):
            raise Invalid("epochs", "is 0 for every stage: that trains nothing (the base model would be "
                                    "written as a corrector)")
        if not [m for m in self.lora_target.split(",") if m.strip()]:
            raise Invalid("lora_target", "names no module (all-linear, or comma-separated names such as q_proj,v_proj)")
        self.report_to = [n.strip().lower() for n in self.report_to if n.strip()]
        if "none" in self.report_to and len(self.report_to) > 1:
            raise Invalid("report_to", "'none' cannot be combined with trackers")
        if not self.report_to:
            self.report_to = ["none"]

    def stage_epochs(self, stage: str) -> float:
        v = getattr(self, f"{stage}_epochs")
        return self.epochs if v is None else v

    def stage_samples(self, stage: str) -> int | None:
        return getattr(self, f"{stage}_samples")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: The :class:`TrainConfig` fields a ``train --resume`` may change: where the run is written
#: and on what it runs, how often it checkpoints and what it logs, none of which changes the
#: data, the trained weights or the files the run leaves (``device`` may switch ``precision
#: auto`` between bf16 and fp32: resuming on another machine is allowed). Every other field
#: shapes the run and must match the one the run recorded.
RESUME_FREE = ("output_dir", "device", "gradient_checkpointing", "save_steps", "save_total_limit",
               "logging_steps", "report_to")


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (``yaml.safe_load``; every key must be a :class:`TrainConfig` field)
    and apply ``overrides`` (CLI flags; None values are ignored); see
    :func:`metaalign_cli.config.load_config`.

    Raises ConfigError for an unreadable file, invalid YAML, an unknown key (with the closest
    known key suggested), a value of the wrong type, out of range or not allowed.
    """
    return load_config(TrainConfig, path, overrides)


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (re-loadable with :func:`load_train_config`)."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


# ---------------------------------------------------------------- data


@dataclass
class TrainingExample:
    """One (T(q, y0, O, t), y) pair of Eq. 6: ``prompt`` already rendered, ``target`` y."""

    prompt: str
    target: str
    id: str | None = None
    template: str | None = None


def find_stage_files(data_dir: str | Path, split: str = "train") -> dict[str, list[Path]]:
    """Locate ``build-data``'s JSONL files per stage under ``data_dir``: files whose name
    contains the stage name (``warmup``, ``equal``, ``preference``) inside ``data_dir/split/``,
    else files in ``data_dir`` whose name holds both the split and the stage.

    Returns {stage: [paths]} (possibly empty lists). Raises InputError when ``data_dir`` is
    not a directory.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise InputError("data directory not found", source=str(d))
    found: dict[str, list[Path]] = {}
    for stage in STAGES:
        pats = [f"*{stage}*.jsonl", f"*{stage}*.jsonl.gz"]
        files: list[Path] = []
        if (d / split).is_dir():
            for pat in pats:
                files += sorted((d / split).glob(pat))
        if not files:
            for pat in pats:
                files += sorted(p for p in d.glob(pat) if split in p.name)
        # "equal" must not pick up e.g. "unequal"; "warmup" never contains the others.
        found[stage] = [p for p in files if p.is_file()]
    return found


def read_stage_examples(path: str | Path) -> list[TrainingExample]:
    """Read one stage file: JSONL rows with string fields ``prompt`` (rendered by the
    correction template) and ``target``. Raises InputError (file, line, field) for a missing
    file, an invalid line, a missing or non-string field."""
    from metaalign_cli.records import read_jsonl

    out: list[TrainingExample] = []
    for rec in read_jsonl(path):
        if rec.error is not None:
            raise rec.error
        for key in ("prompt", "target"):
            v = rec.data.get(key)
            if not isinstance(v, str):
                raise InputError("missing" if v is None else "must be a string", source=rec.source,
                                 line=rec.line, field=key)
            if key == "target" and not v.strip():
                raise InputError("empty target", source=rec.source, line=rec.line, field=key)
        rid = rec.data.get("id")
        tpl = rec.data.get("template")
        out.append(TrainingExample(rec.data["prompt"], rec.data["target"], None if rid is None else str(rid),
                                   tpl if isinstance(tpl, str) else None))
    return out


def load_stage_data(cfg: TrainConfig) -> dict[str, list[TrainingExample]]:
    """Examples per stage from ``cfg.data_dir`` and/or explicit stage files, each sampled
    down to ``<stage>_samples`` (seeded). A stage with no file maps to []; an explicit file
    that is missing or empty raises InputError; no data at all raises InputError."""
    files: dict[str, list[Path]] = {s: [] for s in STAGES}
    for d in cfg.data_dir:
        for s, fs in find_stage_files(d, cfg.split).items():
            files[s] += fs
    explicit = {s: getattr(cfg, f"{s}_file") for s in STAGES}
    for s, f in explicit.items():
        if f:
            if not Path(f).is_file():
                raise InputError("data file not found", source=str(f))
            files[s] = [Path(f)]
    if not cfg.data_dir and not any(explicit.values()):
        raise InputError("no training data: give --data DIR (build-data output) or --warmup/--equal/--preference FILE")
    data: dict[str, list[TrainingExample]] = {}
    rng = random.Random(cfg.seed)
    for s in STAGES:
        ex: list[TrainingExample] = []
        for p in files[s]:
            rows = read_stage_examples(p)
            if not rows and explicit.get(s):
                raise InputError("data file is empty", source=str(p))
            ex += rows
        n = cfg.stage_samples(s)
        if n is not None and len(ex) > n:
            ex = rng.sample(ex, n)
        data[s] = ex
    if not any(data[s] for s in cfg.stages):
        where = ", ".join(cfg.data_dir) or ", ".join(str(f) for f in explicit.values() if f)
        splits = sorted({p.name for d in cfg.data_dir if Path(d).is_dir() for p in Path(d).iterdir()
                         if p.is_dir() and any(p.glob("*.jsonl"))})
        hint = (f" (--split {cfg.split}: the splits there are {', '.join(splits)})"
                if cfg.data_dir and splits and cfg.split not in splits else "")
        raise InputError(f"no training rows for stages {', '.join(cfg.stages)}{hint}", source=where)
    return data


def tokenize_example(tokenizer, prompt: str, target: str, chat: bool = False,
                     system: str | None = None) -> dict[str, list[int]]:
    """Token ids and labels for one (prompt, target) pair, as Eq. 6 needs them.

    ``input_ids`` = prompt ids + target ids + [EOS]; ``labels`` = -100 for every prompt token,
    then the target ids and EOS (the model shifts labels by one internally). Lists of equal
    length L (tokens).

    The prompt is tokenized exactly as ``correct`` sends it (transformers backend: raw text
    with the tokenizer's special tokens, or the chat template with a generation prompt), and
    the target separately: TRL's prompt-completion path tokenizes prompt+completion jointly,
    which for our templates ending in "Edit: " merges the trailing space into the first
    target token and shifts the completion mask by one token.
    """
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MetaAlignError("the tokenizer has no EOS token; the corrector could not learn to stop")
    t_ids = list(t_ids) + [eos]
    return {"input_ids": list(p_ids) + t_ids, "labels": [-100] * len(p_ids) + t_ids}


@dataclass
class StageReport:
    """What happened to one stage's rows before training."""

    stage: str
    rows: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    target_tokens: int = 0
    steps: int = 0
    final_loss: float | None = None
    seconds: float = 0.0
    skipped: str | None = None


def build_stage_dataset(examples: list[TrainingExample], tokenizer, cfg: TrainConfig, chat: bool,
                        report: StageReport):
    """Tokenize a stage's examples into a ``datasets.Dataset`` with ``input_ids``, ``labels``
    (see :func:`tokenize_example`). Sequences longer than ``cfg.max_length`` are dropped and
    counted in ``report``, or cut to ``max_length`` with ``cfg.truncate`` (those whose target
    is cut away entirely are still dropped)."""
    from datasets import Dataset

    rows = []
    for ex in examples:
        t = tokenize_example(tokenizer, ex.prompt, ex.target, chat)
        if len(t["input_ids"]) > cfg.max_length:
            if not cfg.truncate:
                report.dropped_too_long += 1
                continue
            t = {k: v[:cfg.max_length] for k, v in t.items()}
            if all(x == -100 for x in t["labels"]):
                report.dropped_too_long += 1
                continue
            report.truncated += 1
        report.target_tokens += sum(1 for x in t["labels"] if x != -100)
        rows.append(t)
    report.rows = len(examples)
    report.kept = len(rows)
    return Dataset.from_list(rows) if rows else None


# ---------------------------------------------------------------- models


def check_base_path(base: str) -> None:
    """Raise MetaAlignError when ``base`` names a local file or directory that does not
    exist (a ``.gguf`` path, an absolute or ./relative path, or an existing parent dir)."""
    p = Path(base)
    local = p.suffix == ".gguf" or p.is_absolute() or base.startswith(".") or p.parent.is_dir() and p.parent != Path(".")
    if local and not p.exists():
        raise MetaAlignError(f"{p}: base model not found")
    if p.suffix == ".gguf" and not p.is_file():
        raise MetaAlignError(f"{p}: GGUF model file not found")


def load_base_model(base: str, dtype=None, attn_implementation: str = "sdpa", qlora: bool = False):
    """Load (model, tokenizer) from a hub id, an HF directory or a ``.gguf`` file (dequantized
    by transformers via ``gguf_file=``; its GGUF quantization config is dropped so the model
    saves as a plain fp32/bf16 checkpoint). Weights in ``dtype`` (default fp32: the master
    weights), on the CPU (the trainer places them), except ``qlora``: 4-bit NF4 on this
    process's own GPU (``PartialState().local_process_index``). Raises MetaAlignError when the
    model cannot be loaded."""
    check_base_path(base)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {}
    src = str(base)
    p = Path(src)
    if p.suffix == ".gguf":
        src, kw["gguf_file"] = str(p.parent), p.name
    if qlora:
        if not torch.cuda.is_available():
            raise MetaAlignError("--qlora needs a CUDA GPU and bitsandbytes")
        try:
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise MetaAlignError("--qlora needs bitsandbytes: pip install bitsandbytes") from None
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
        # Each rank's 4-bit model on its own GPU (without a device_map every rank loads onto
        # GPU 0 and accelerate refuses the model on ranks 1+).
        from accelerate import PartialState

        kw["device_map"] = {"": PartialState().local_process_index}
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=kw.get("gguf_file")) if "gguf_file" in kw \
            else AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32,
                                                     attn_implementation=attn_implementation, **kw)
    except (OSError, ValueError, ImportError, KeyError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetaAlignError(f"{base}: cannot load base model: {msg}") from None
    if "gguf_file" in kw:
        # The dequantized weights are plain tensors now; a GGUF quantizer config would make
        # save_pretrained refuse or mislabel the checkpoint.
        for obj in (model.config, getattr(model, "generation_config", None)):
            if obj is not None and hasattr(obj, "quantization_config"):
                try:
                    delattr(obj, "quantization_config")
                except AttributeError:
                    pass
        for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
            if getattr(model, attr, None):
                try:
                    setattr(model, attr, None if attr != "is_quantized" else False)
                except AttributeError:
                    pass
        _fix_gguf_tokenizer(p, tok, model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _fix_gguf_tokenizer(path: Path, tok, model) -> None:
    """Make the tokenizer transformers builds from a GGUF match the file as llama.cpp reads
    it: BOS/EOS/padding ids from the file's metadata (transformers 5.17 read SmolLM2's EOS as
    ``<|im_start|>``, which would teach the corrector to stop on the wrong token), and the
    ``smollm`` pre-tokenizer's one-digit split when the converted tokenizer lacks it."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return
    fields = GGUFReader(str(path)).fields
    ids = {}
    for role in ("bos", "eos", "padding"):
        f = fields.get(f"tokenizer.ggml.{role}_token_id")
        if f is not None:
            ids[role] = int(f.parts[f.data[0]][0])
    pre = fields.get("tokenizer.ggml.pre")
    pre = bytes(pre.parts[pre.data[0]]).decode("utf-8") if pre is not None else None
    backend = getattr(tok, "backend_tokenizer", None)
    if pre == "smollm" and backend is not None and type(backend.pre_tokenizer).__name__ == "ByteLevel":
        from tokenizers import pre_tokenizers

        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if "eos" in ids:
        tok.eos_token = tok.convert_ids_to_tokens(ids["eos"])
        model.config.eos_token_id = ids["eos"]
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = ids["eos"]
    if "bos" in ids:
        tok.bos_token = tok.convert_ids_to_tokens(ids["bos"])
    if "padding" in ids:
        tok.pad_token = tok.convert_ids_to_tokens(ids["padding"])
        model.config.pad_token_id = ids["padding"]
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = ids["padding"]


def lora_config(cfg: TrainConfig):
    """peft LoraConfig from ``lora_r``, ``lora_alpha`` (default 2r), ``lora_dropout``,
    ``lora_target`` (all-linear or a comma-separated module list)."""
    from peft import LoraConfig

    target = cfg.lora_target.strip()
    modules: Any = "all-linear" if target == "all-linear" else [m.strip() for m in target.split(",") if m.strip()]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, lora_dropout=cfg.lora_dropout,
                      target_modules=modules, bias="none", task_type="CAUSAL_LM")


def pick_precision(cfg: TrainConfig, device: str) -> str:
    """``bf16`` (autocast, fp32 master weights) or ``fp32``: auto picks bf16 only on a CUDA
    GPU with native bf16 (compute capability >= 8; ``including_emulation=False``, since torch
    reports emulated bf16 as supported on older GPUs, where it is slow). CPU bf16 autocast is
    allowed explicitly but is often slower."""
    import torch

    if cfg.precision != "auto":
        return cfg.precision
    if device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp32"


REPORT_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
                   "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                   "neptune": "neptune", "codecarbon": "codecarbon"}


def check_report_to(names: list[str], source: str = "--report-to") -> None:
    """Raise ConfigError unless every tracker in ``names`` is one transformers knows
    (``INTEGRATION_TO_CALLBACK``) and is installed (``get_available_reporting_integrations``).
    ``["none"]`` passes without importing transformers."""
    if names == ["none"]:
        return
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    installed = get_available_reporting_integrations()
    for n in names:
        if n == "all":
            continue
        if n not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"{source}: unknown tracker '{n}' "
                              f"(known: none, all, {', '.join(sorted(INTEGRATION_TO_CALLBACK))})")
        if n not in installed:
            raise ConfigError(f"{source}: '{n}' is not installed (pip install {REPORT_PACKAGES.get(n, n)})")


def check_trainer_names(cfg: TrainConfig) -> None:
    """Raise ConfigError unless ``cfg.optimizer`` and ``cfg.lr_scheduler`` are names
    transformers knows (``OptimizerNames``, ``SchedulerType``): checked before any model loads,
    not as a traceback from ``TrainingArguments``."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for flag, value, known in (("--optimizer", cfg.optimizer, [o.value for o in OptimizerNames]),
                               ("--lr-scheduler", cfg.lr_scheduler, [s.value for s in SchedulerType])):
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1)
            raise ConfigError(f"{flag}: unknown transformers name '{value}'"
                              + (f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"))


# ---------------------------------------------------------------- training


@dataclass
class TrainResult:
    """Outcome of :func:`train_corrector`: per-stage reports, the output directory, the card
    written for ``correct`` and the exported GGUF paths."""

    output_dir: Path
    reports: list[StageReport]
    card: dict
    seconds: float
    gguf: dict[str, str] = field(default_factory=dict)
    main_process: bool = True  # False on the other ranks of a multi-process run (empty card)
    complete: bool = False  # a resume found the run already complete and did nothing


def _latest_checkpoint(d: Path) -> Path | None:
    """The highest ``checkpoint-N`` in ``d`` that is complete: the Trainer writes
    ``trainer_state.json`` after the weights, optimizer and scheduler, so a checkpoint a
    killed run left half-written is skipped."""
    cks = [p for p in d.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
           and (p / "trainer_state.json").is_file()]
    return max(cks, key=lambda p: int(p.name.split("-")[-1])) if cks else None


def _make_trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    class CorrectorTrainer(SFTTrainer):
        """SFTTrainer (data preparation, collation, packing, schedule, checkpoints) whose loss
        is the model's own token-averaged cross-entropy on the labels (Eq. 6), as in
        transformers' Trainer. SFTTrainer's loss path also computes per-token entropy and
        accuracy over the whole vocabulary at every step: for SmolLM2's 49k vocabulary on a
        CPU that cost 2.4x the time and 1.6x the peak memory (bench/train_throughput.py).

        Also counts target (labelled) tokens: each logged step gets ``target_tokens`` (summed
        over all ranks with ``accelerator.reduce``, since this train() began) and
        ``target_tokens_per_s``, which reach metrics.jsonl and every ``report_to`` tracker."""

        target_tokens_seen = 0
        _t0 = None

        def train(self, *args, **kwargs):
            self._t0 = time.perf_counter()
            self.target_tokens_seen = 0
            return super().train(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.get("labels")
            if labels is not None and model.training:
                self.target_tokens_seen += int((labels != -100).sum())
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def log(self, logs, start_time=None):
            # Called on every rank at the same steps (the logged loss is gathered just
            # before), so the collective reduce below is matched on all ranks.
            if "loss" in logs and self._t0 is not None:
                import torch

                n = torch.tensor([self.target_tokens_seen], dtype=torch.long, device=self.args.device)
                total = int(self.accelerator.reduce(n, reduction="sum").item())
                logs["target_tokens"] = total
                logs["target_tokens_per_s"] = round(total / max(time.perf_counter() - self._t0, 1e-9), 2)
            return super().log(logs, start_time)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            """transformers' schedule with its warm-up moved one step earlier, so that no
            optimizer step runs at learning rate 0 (see :func:`warmup_without_zero_step`)."""
            fresh = self.lr_scheduler is None
            sched = super().create_scheduler(num_training_steps, optimizer)
            if fresh:
                self.lr_scheduler = sched = warmup_without_zero_step(
                    sched, self.args.get_warmup_steps(num_training_steps))
            return sched

    return CorrectorTrainer


def warmup_without_zero_step(scheduler, warmup_steps: int):
    """``scheduler`` (a transformers LambdaLR schedule with linear warm-up) with the warm-up
    shifted by one step: step ``s < warmup_steps`` (0-based) runs at the factor transformers
    gives step ``s + 1``, i.e. ``(s + 1) / warmup_steps`` of the peak, instead of
    ``s / warmup_steps``; the steps after the warm-up are unchanged.

    transformers' warm-up factor of step 0 is 0, and ``warmup_steps`` given as a ratio
    (``--warmup-ratio 0.05``) becomes ``ceil(0.05 * steps) >= 1`` warm-up steps: every stage's
    first optimizer step ran at learning rate 0, half of a ``--max-steps 2`` smoke run (Table 5's
    0.05 warm-up ratio is kept; only the wasted step goes). Schedules that are not a LambdaLR
    (e.g. ``reduce_lr_on_plateau``) and ``warmup_steps == 0`` are returned as they are.
    """
    import torch

    if warmup_steps <= 0 or type(scheduler) is not torch.optim.lr_scheduler.LambdaLR:
        return scheduler

    def shifted(f):
        return lambda step: f(step + 1) if step < warmup_steps else f(step)

    # A new LambdaLR over the same optimizer: base rates come from each group's 'initial_lr'
    # (set by the first), and the groups' current rate is set from step 0 of the new schedule.
    return torch.optim.lr_scheduler.LambdaLR(scheduler.optimizer, [shifted(f) for f in scheduler.lr_lambdas])


def _make_metrics_callback(stage: str, metrics_path: Path, on_event: Callable[[dict], None] | None,
                           global_offset: int):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """On the main process: appends one JSON line per log (stage, step, loss, lr, target
        tokens/s over all ranks) and forwards events for the progress display."""

        def __init__(self):
            self.t0 = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            if on_event and state.is_world_process_zero:
                on_event({"event": "begin", "stage": stage, "max_steps": state.max_steps,
                          "step": state.global_step})

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            el = max(time.perf_counter() - self.t0, 1e-9)
            rec = {"stage": stage, "step": state.global_step, "global_step": global_offset + state.global_step,
                   "epoch": round(state.epoch or 0.0, 4), "loss": float(logs["loss"]),
                   "lr": float(logs.get("learning_rate", 0.0)),
                   "grad_norm": float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
                   "target_tokens_per_s": float(logs.get("target_tokens_per_s", 0.0)),
                   "target_tokens": int(logs.get("target_tokens", 0)),
                   "world_size": args.world_size, "elapsed_s": round(el, 2)}
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            if on_event:
                on_event({"event": "log", "max_steps": state.max_steps, **rec})

        def on_step_end(self, args, state, control, **kw):
            if on_event and state.is_world_process_zero:
                on_event({"event": "step", "stage": stage, "step": state.global_step, "max_steps": state.max_steps})

    return MetricsCallback()


# ---------------------------------------------------------------- processes


def _broadcast(obj, state):
    """``obj`` from the main process to every rank (accelerate's ``broadcast_object_list``);
    ``obj`` itself without a process group."""
    if state.num_processes <= 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def run_on_main(state, fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn()`` on the main process only, between two barriers, and return its result on
    every rank. An exception on the main process is raised there and, as a MetaAlignError
    naming ``what``, on every other rank, which would otherwise wait at a barrier or race
    ahead and read files the main process has not written. ``state``: accelerate's
    ``PartialState``."""
    state.wait_for_everyone()
    res, err = None, None
    if state.is_main_process:
        try:
            res = fn()
        except Exception as e:  # re-raised below, after the others were told
            err = e
    msg = _broadcast((res, None if err is None else f"{type(err).__name__}: {err}"), state)
    if err is not None:
        raise err
    if msg[1] is not None:
        raise MetaAlignError(f"rank 0 failed while {what} ({msg[1]})")
    return msg[0]


def process_info(state) -> dict:
    """What the card and stage.json record about the processes that trained:
    ``world_size`` (processes in the group), ``distributed_type`` (accelerate's name: NO,
    MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED) and ``fsdp_version`` under FSDP."""
    from accelerate.state import AcceleratorState, is_initialized

    info = {"world_size": int(state.num_processes),
            "distributed_type": str(state.distributed_type).split(".")[-1]}
    if is_initialized():  # a trainer made its Accelerator (never create one here)
        acc = AcceleratorState()
        info["distributed_type"] = str(acc.distributed_type).split(".")[-1]
        if info["distributed_type"] == "FSDP" and getattr(acc, "fsdp_plugin", None) is not None:
            info["fsdp_version"] = int(getattr(acc.fsdp_plugin, "fsdp_version", 1))
    return info


def gather_full_state_dict(model, accelerator=None) -> dict | None:
    """The complete state dict of a (possibly sharded) model, for saving on the main process.

    Collective: every rank must call it. - DeepSpeed and accelerate's FSDP:
    ``accelerator.get_state_dict`` (ZeRO-3: the consolidated 16-bit weights, which need
    ``stage3_gather_16bit_weights_on_model_save``; FSDP2: torch's ``get_model_state_dict``
    with ``full_state_dict=True, cpu_offload=True``). - A model sharded with torch's
    ``fully_shard`` outside accelerate: the same torch call. Those return the full tensors on
    rank 0 (an empty dict elsewhere). - Anything else (one process, DDP): None, meaning the
    unwrapped module's own ``state_dict`` is complete. Raises MetaAlignError when ZeRO-3
    cannot gather."""
    from accelerate.utils import DistributedType

    if accelerator is not None and accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        try:
            return accelerator.get_state_dict(model)
        except ValueError as e:
            raise MetaAlignError(f"cannot gather the trained weights: {str(e).splitlines()[0]} "
                                 "(accelerate config: zero3_save_16bit_model: true)") from None
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:
        return None
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


def save_stage_weights(model, tok, sdir: Path, state, accelerator=None, stage_info: dict | None = None) -> None:
    """Write the weights ``model`` holds after a stage to ``sdir`` as an HF directory (full
    model: config + safetensors; LoRA: the peft adapter), the tokenizer, then ``stage.json``
    (``stage_info``), in that order, so a ``stage.json`` always sits beside complete weights.

    Collective (the state dict is gathered from every rank, :func:`gather_full_state_dict`);
    only the main process writes, behind barriers (:func:`run_on_main`). ``model``: the
    trained (maybe wrapped or sharded) model; ``accelerator``: the trainer's."""
    sd = gather_full_state_dict(model, accelerator)
    if accelerator is not None:
        inner = accelerator.unwrap_model(model)
    else:
        inner = getattr(model, "module", model)
    if sd:
        # A gathered state dict holds tied weights (lm_head = embeddings) as separate copies,
        # which save_pretrained would then write twice: keep the first name of each.
        first: dict[int, str] = {}
        tied = set()
        for name, p in inner.named_parameters(remove_duplicate=False):
            if id(p) in first:
                tied.add(name)
            else:
                first[id(p)] = name
        sd = {k: v for k, v in sd.items() if k not in tied}

    def write():
        sdir.mkdir(parents=True, exist_ok=True)
        for old in sdir.glob("*.safetensors"):
            old.unlink()
        if sd is None:
            inner.save_pretrained(str(sdir))
        else:
            inner.save_pretrained(str(sdir), state_dict=sd)
        tok.save_pretrained(str(sdir))
        if not any(sdir.glob("*.safetensors")):
            raise MetaAlignError(f"{sdir}: no weights were written after the stage")
        if stage_info is not None:
            (sdir / STAGE_DONE).write_text(json.dumps(stage_info, indent=1), encoding="utf-8")

    run_on_main(state, write, f"saving {sdir}")


def _resume_plan(out: Path, stage_list: list[str], resume: bool, lora: bool, state) -> dict:
    """Which stages an earlier run finished (their stage.json) and the checkpoint each
    unfinished stage continues from, decided on the main process and broadcast, so every rank
    skips and resumes the same stages. Then every rank checks that it can read what it will
    load (the last finished stage's weights, the checkpoint): a rank that cannot (another
    node without a shared filesystem) makes every rank stop with one clear MetaAlignError
    instead of training different stages and hanging in a collective."""
    plan: dict = {"done": {}, "ckpt": {}}
    if state.is_main_process and resume:
        for stage in stage_list:
            done_file = out / "stages" / stage / STAGE_DONE
            if done_file.is_file():
                plan["done"][stage] = json.loads(done_file.read_text(encoding="utf-8"))
            else:
                ck = _latest_checkpoint(out / "checkpoints" / stage)
                plan["ckpt"][stage] = str(ck) if ck else None
    plan = _broadcast(plan, state)
    if state.num_processes > 1 and resume:
        need = [p for p in plan["ckpt"].values() if p]
        done = [s for s in stage_list if s in plan["done"]]
        if done:
            need.append(str(out / "stages" / done[-1] / ("adapter_config.json" if lora else "config.json")))
        missing = [p for p in need if not Path(p).exists()]
        from accelerate.utils import gather_object

        import socket

        seen = gather_object([(state.process_index, socket.gethostname(), missing)])
        bad = [(r, h, m) for r, h, m in seen if m]
        if bad:
            r, h, m = bad[0]
            raise MetaAlignError(f"--resume: rank {r} on {h} cannot see {m[0]}, which rank 0 wrote; "
                                 f"a run over several nodes needs --output on a filesystem they all share")
    return plan


def _show_setting(v: Any) -> str:
    """A setting as a user writes it on the command line (``none``, ``true``, ``f16,q8_0``)."""
    if v is None or v == []:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return str(v)


def _same_path(a: str, b: str) -> bool:
    """The same file or directory: equal strings, or two existing paths to one place (a run
    resumed from another working directory names its data by another relative path)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


_PATH_SETTINGS = ("base_model", "data_dir", "warmup_file", "equal_file", "preference_file")


def _same_setting(key: str, now: Any, then: Any) -> bool:
    """Whether setting ``key`` has the same meaning with value ``now`` as with ``then``: paths
    by what they name (:func:`_same_path`), stages as a set (they always run in paper order),
    the rest by value."""
    if key == "stages":
        return set(now) == set(then)
    if key in _PATH_SETTINGS and now is not None and then is not None:
        if isinstance(now, list):
            return len(now) == len(then) and all(_same_path(a, b) for a, b in zip(now, then))
        return _same_path(now, then)
    return now == then


def resume_config(cfg: TrainConfig, given: Collection[str] | None = None) -> TrainConfig:
    """The config a ``--resume`` of the run in ``cfg.output_dir`` continues with: the run's
    recorded ``train_config.yaml``, with the settings the caller set (``given``: field names
    from CLI flags and the config file; None: every field of ``cfg``) checked against it. A
    setting of :data:`RESUME_FREE` takes the caller's value; any other must have the run's,
    and one not given is the run's. ``cfg`` itself when the directory records no config (no
    run was started there).

    Raises MetaAlignError naming the first differing setting with both values (a resume with
    other settings would mix two runs in one model and rewrite the run's record), and
    ConfigError when the recorded config does not load."""
    out = Path(cfg.output_dir)
    path = out / CONFIG_FILE
    if not path.is_file():
        return cfg
    then = load_train_config(path)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    set_now = names if given is None else [k for k in names if k in set(given)]
    merged = {"output_dir": cfg.output_dir}
    for key in set_now:
        if key == "output_dir":
            continue
        now, old = getattr(cfg, key), getattr(then, key)
        if key not in RESUME_FREE and not _same_setting(key, now, old):
            raise MetaAlignError(f"{out}: --resume with other settings than the run was started with: {key} "
                                 f"{_show_setting(now)} (the run has {_show_setting(old)}); give the same flags, "
                                 f"or another -o")
        merged[key] = now
    resumed = dataclasses.replace(then, **merged)
    resumed.validate()
    return resumed


def _card_exports(out: Path) -> dict[str, str]:
    """The GGUF entries (``gguf``, ``lora``, ``gguf_lora``) of ``out``'s model card whose files
    are still there ({} without a readable card); paths as the card holds them."""
    try:
        card = json.loads((out / MODEL_CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(card, dict):
        return {}
    return {k: v for k, v in card.items() if k in ("gguf", "lora", "gguf_lora") and isinstance(v, str)
            and (v == "embedded" or (out / v).is_file())}


def completed_run(cfg: TrainConfig, stage_list: list[str]) -> TrainResult | None:
    """The result of the run in ``cfg.output_dir`` when it is complete for ``cfg`` (the
    resumed config, :func:`resume_config`), else None. Complete: every stage of
    ``stage_list`` has its ``stage.json`` (or has no rows in ``cfg``'s data, read only then, or
    is recorded in the card's ``training.skipped_too_long``: every sequence over max_length),
    the model card is no older than the newest ``stage.json`` (written after the final model
    and merge), the top holds model weights, ``loss.png`` is there with ``cfg.plot``, and
    with ``cfg.export_gguf`` each type's ``gguf/*-<type>.gguf`` exists and the card names its
    GGUF files (``gguf_lora`` too for a LoRA run), which export writes last. Reads only."""
    out = Path(cfg.output_dir)
    card_path = out / MODEL_CARD
    done = {s: out / "stages" / s / STAGE_DONE for s in stage_list}
    present = {s: f for s, f in done.items() if f.is_file()}
    if not present or not card_path.is_file() or not any(out.glob("*.safetensors")):
        return None
    if card_path.stat().st_mtime < max(f.stat().st_mtime for f in present.values()):
        return None  # a stage was trained again after the card: the final model is not made yet
    if cfg.plot and not (out / "loss.png").is_file():
        return None
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if cfg.export_gguf:
        exports = _card_exports(out)
        if "gguf" not in exports or (cfg.lora_r is not None and "gguf_lora" not in exports):
            return None
        if any(not any((out / "gguf").glob(f"*-{t}.gguf")) for t in cfg.export_gguf):
            return None
    too_long = set((card.get("training") or {}).get("skipped_too_long") or [])
    missing = [s for s in stage_list if s not in present and s not in too_long]
    data = load_stage_data(cfg) if missing else {}
    if any(data[s] for s in missing):
        return None
    reports = []
    for stage in stage_list:
        rep = StageReport(stage, skipped="done in an earlier run" if stage in present else
                          TOO_LONG if stage in too_long else "no data")
        if stage in present:
            info = json.loads(present[stage].read_text(encoding="utf-8"))
            for k in ("rows", "kept", "dropped_too_long", "truncated", "target_tokens", "steps", "final_loss",
                      "seconds"):
                if k in info:
                    setattr(rep, k, info[k])
        reports.append(rep)
    # Under a launcher every rank finds the run complete; rank 0 reports.
    main = os.environ.get("RANK", "0") == "0"
    return TrainResult(out, reports, card, 0.0, main_process=main, complete=True)


def train_corrector(cfg: TrainConfig, resume: bool = False,
                    on_event: Callable[[dict], None] | None = None,
                    log: Callable[[str], None] | None = None,
                    given: Collection[str] | None = None) -> TrainResult:
    """Run the three-step MetaAligner training (section 3.3) on ``cfg`` and write
    ``cfg.output_dir``:

    - the final model at the top (full fine-tune, or LoRA merged when ``cfg.merge``; the
      adapter alone when not), its tokenizer, ``metaalign.json`` (template, prompt format,
      base model, processes that trained) for ``correct --model DIR``, ``train_config.yaml``
      (resolved config), ``metrics.jsonl`` (one line per logged step), ``loss.png`` with
      ``cfg.plot``;
    - ``stages/<stage>/``: the weights after each stage; ``checkpoints/<stage>/checkpoint-N``
      every ``cfg.save_steps`` steps (for ``resume``);
    - ``adapter/`` for LoRA runs.

    Several processes (``torchrun`` / ``accelerate launch``; DDP, FSDP, DeepSpeed): every
    rank trains; the weights are gathered after each stage and written by the main process
    only; the final model, plot and GGUF export are made on the main process from the last
    stage's saved weights after a barrier, while the other ranks return at once (their
    result has ``main_process`` False and an empty card).

    ``resume``: continue with the settings the run recorded (:func:`resume_config`; ``given``:
    the names of the settings the caller set, CLI flags and config-file keys, the others are
    the run's; None: all of ``cfg``), leaving ``train_config.yaml`` as the run wrote it; skip
    finished stages (their weights are reloaded) and continue the current stage from its
    latest complete checkpoint (optimizer, schedule, RNG and data position restored). A run
    already complete (:func:`completed_run`) is left untouched: the result has ``complete``
    True and no model loads. ``on_event``: receives dicts (event begin/step/log/stage/skip)
    for progress display, on the main process only; ``log`` likewise.

    Raises InputError/ConfigError/MetaAlignError for bad data, config or model,
    MetaAlignError when ``output_dir`` already holds a run and ``resume`` is false, and when
    ``resume`` is given settings other than the run's.
    """
    say = log or (lambda m: None)
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise MetaAlignError(f"{out}: is a file; --output takes a directory")
    if out.exists() and (out / "stages").exists() and not resume:
        raise MetaAlignError(f"{out}: already holds a training run; use --resume to continue it or another --output")
    recorded = resume and (out / CONFIG_FILE).is_file()
    if resume:
        cfg = resume_config(cfg, given)
        finished = completed_run(cfg, [s for s in STAGES if s in cfg.stages])
        if finished is not None:
            exported = f" and GGUF {','.join(cfg.export_gguf)}" if cfg.export_gguf else ""
            trained = [r.stage for r in finished.reports if r.skipped == "done in an earlier run"]
            skipped = "".join(f", {r.stage} skipped ({r.skipped})" for r in finished.reports
                              if r.skipped != "done in an earlier run")
            say(f"{out}: the run is already complete ({', '.join(trained) or 'no stage'} trained{skipped}; "
                f"model, card{exported} written); nothing redone")
            finished.seconds = round(time.perf_counter() - t_start, 2)
            return finished
    # Cheap checks first: bad data or a missing model file fail before torch loads.
    data = load_stage_data(cfg)
    from metaalign_cli.models import resolve_base_model

    base = resolve_base_model(cfg.base_model)
    check_base_path(base)

    from metaalign_cli.templates import load_template

    used = sorted({e.template for s in cfg.stages for e in data[s] if e.template})
    if len(used) > 1 or (cfg.template and used and used != [load_template(cfg.template, kind="correction").name]):
        raise InputError(f"the rows were rendered with template(s) {', '.join(used)}"
                         + (f", not '{cfg.template}'" if cfg.template else "")
                         + "; a corrector is trained and used with one template (build-data --template)")
    tpl = load_template(cfg.template or (used[0] if used else "hh-rlhf"), kind="correction")
    prompt_format = cfg.prompt_format or tpl.prompt_format
    chat = prompt_format == "chat"
    check_report_to(cfg.report_to)
    check_trainer_names(cfg)

    import torch
    from transformers import set_seed

    from metaalign_cli.backends.hf import pick_attention, pick_device

    if cfg.device == "cuda":
        device = pick_device("cuda")  # raises when torch sees no CUDA GPU
    else:
        device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu"
    precision = pick_precision(cfg, device)
    attn = cfg.attn_implementation or pick_attention(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    pack = cfg.packing == "pack" or (cfg.packing == "auto" and attn == "flash_attention_2")
    group = cfg.packing == "group" or (cfg.packing == "auto" and not pack)
    stage_list = [s for s in STAGES if s in cfg.stages]

    # The trainer arguments come first: making them starts torch.distributed under a launcher
    # (accelerate's PartialState) and sets up DeepSpeed's config, so that the model load below
    # can use fsdp_cpu_ram_efficient_loading / ZeRO-3 zero.Init. They are kept alive for the
    # whole run (transformers holds the DeepSpeed config by weak reference).
    stage_args = {s: _sft_config(cfg, s, out, precision, pack, group, device) for s in stage_list}
    from accelerate import PartialState

    if stage_args:
        next(iter(stage_args.values())).device  # noqa: B018  (TrainingArguments sets up the process group)
    state = PartialState(cpu=device == "cpu")
    main = state.is_main_process
    if not main:
        say, on_event = (lambda m: None), None
    procs = process_info(state)
    if procs["world_size"] > 1:
        say(f"training on {procs['world_size']} processes ({procs['distributed_type']})")

    set_seed(cfg.seed)
    model, tok = load_base_model(base, attn_implementation=attn, qlora=cfg.qlora)
    if chat and not getattr(tok, "chat_template", None):
        raise MetaAlignError(f"{base}: prompt_format chat needs a tokenizer with a chat template")
    lora = cfg.lora_r is not None
    if lora:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if cfg.qlora:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        try:
            model = get_peft_model(model, lora_config(cfg))
        except ValueError as e:  # peft: no module of the model matches the names
            raise ConfigError(f"--lora-target {cfg.lora_target}: {str(e).splitlines()[0]}") from None

    plan = _resume_plan(out, stage_list, resume, lora, state)
    metrics_path = out / METRICS_FILE

    def prepare_output():
        out.mkdir(parents=True, exist_ok=True)
        if not recorded:  # a resumed run's record stays the one it was started with
            save_config(cfg, out / CONFIG_FILE)
        if not resume:
            metrics_path.unlink(missing_ok=True)

    run_on_main(state, prepare_output, f"writing {out / CONFIG_FILE}")

    reports: list[StageReport] = []
    global_offset = 0
    pending_load: Path | None = None
    last_weights: Path | None = None
    for stage in stage_list:
        rep = StageReport(stage)
        reports.append(rep)
        sdir = out / "stages" / stage
        if stage in plan["done"]:
            info = plan["done"][stage]
            for k in ("rows", "kept", "dropped_too_long", "truncated", "target_tokens", "steps", "final_loss", "seconds"):
                if k in info:
                    setattr(rep, k, info[k])
            rep.skipped = "done in an earlier run"
            global_offset += rep.steps
            pending_load = last_weights = sdir
            if on_event:
                on_event({"event": "skip", "stage": stage, "reason": rep.skipped})
            continue
        if pending_load is not None:
            model = _load_stage_weights(model, pending_load, lora)
            pending_load = None
        ds = build_stage_dataset(data[stage], tok, cfg, chat, rep)
        if rep.dropped_too_long or rep.truncated:
            say(f"{stage}: {rep.dropped_too_long} of {rep.rows} sequence(s) longer than max_length {cfg.max_length} "
                f"dropped, {rep.truncated} truncated")
        if ds is None:
            rep.skipped = "no data" if rep.rows == 0 else TOO_LONG
            if on_event:
                on_event({"event": "skip", "stage": stage, "reason": rep.skipped})
            say(f"{stage}: skipped ({rep.skipped})")
            continue
        t0 = time.perf_counter()
        trainer = _build_trainer(model, tok, ds, stage_args[stage], stage, metrics_path, on_event, global_offset)
        ckpt = plan["ckpt"].get(stage) if resume else None
        if ckpt is not None:
            say(f"{stage}: resuming from {ckpt}")
        res = trainer.train(resume_from_checkpoint=ckpt)
        model = trainer.model
        rep.steps = trainer.state.global_step
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        rep.final_loss = losses[-1] if losses else None
        rep.seconds = round(time.perf_counter() - t0, 2)
        global_offset += rep.steps
        info = {k: getattr(rep, k) for k in ("stage", "rows", "kept", "dropped_too_long", "truncated",
                                             "target_tokens", "steps", "final_loss", "seconds")}
        info.update(process_info(state))
        save_stage_weights(trainer.model_wrapped, tok, sdir, state, trainer.accelerator, info)
        last_weights = sdir
        if on_event:
            on_event({"event": "stage", "stage": stage, "steps": rep.steps, "loss": rep.final_loss,
                      "train_loss": res.training_loss})
        del trainer

    if last_weights is None:
        raise MetaAlignError(f"{out}: no stage was trained (every stage skipped), nothing to save")
    training = {**process_info(state), "device": device, "precision": precision, "attn_implementation": attn}
    too_long = [r.stage for r in reports if r.skipped == TOO_LONG]
    if too_long:  # recorded, so --resume finds the run complete (such a stage writes no stage.json)
        training["skipped_too_long"] = too_long
    # Everything after training happens on the main process, once every rank has finished
    # (the barrier); the other ranks are done and return without waiting for the export.
    state.wait_for_everyone()
    if not main:
        return TrainResult(out, reports, {}, round(time.perf_counter() - t_start, 2), main_process=False)
    card, gguf = finalize_run(tok, cfg, out, tpl.name, prompt_format, base, lora, last_weights, training, say)
    return TrainResult(out, reports, card, round(time.perf_counter() - t_start, 2), gguf)


def finalize_run(tok, cfg: TrainConfig, out: Path, template: str, prompt_format: str, base: str, lora: bool,
                 weights_dir: Path, training: dict | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[dict, dict[str, str]]:
    """The work after training, in one process (the main one, once every rank has finished):
    the final model and card from ``weights_dir`` (:func:`save_final_model`), ``loss.png``
    with ``cfg.plot``, the GGUF files of ``cfg.export_gguf``. Returns (card, {type: gguf
    path}). Raises MetaAlignError."""
    earlier = _card_exports(out)
    card = save_final_model(tok, cfg, out, template, prompt_format, base, lora, weights_dir, training)
    metrics_path = out / METRICS_FILE
    if cfg.plot and metrics_path.is_file():
        plot_losses(metrics_path, out / "loss.png")
    gguf: dict[str, str] = {}
    if cfg.export_gguf:
        from metaalign_cli.export import export_gguf

        gguf = export_gguf(out, cfg.export_gguf, log=log)
        card = json.loads((out / MODEL_CARD).read_text(encoding="utf-8"))
    elif earlier:
        # A resumed run keeps the card's GGUF entries of an earlier `metaalign export` (same
        # settings, same model): without them `correct --model DIR` would leave llama-cpp.
        card.update(earlier)
        (out / MODEL_CARD).write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if log:
            log(f"{out}: the card keeps the GGUF files of its earlier export ({', '.join(sorted(set(earlier.values())))}"
                f"); `metaalign export {out}` remakes them from this model")
    return card, gguf


def _sft_config(cfg: TrainConfig, stage: str, out: Path, precision: str, pack: bool, group: bool, device: str):
    """TRL's SFTConfig for one stage (checkpoints in ``out/checkpoints/<stage>``; trackers
    name the run ``<out name>-<stage>``)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out / "checkpoints" / stage),
        run_name=f"{out.resolve().name}-{stage}",
        num_train_epochs=cfg.stage_epochs(stage),
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        optim=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        packing=pack,
        packing_strategy="bfd",
        train_sampling_strategy="group_by_length" if group and not pack else "random",
        bf16=precision == "bf16",
        fp16=False,
        use_cpu=device == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to=cfg.report_to,
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        remove_unused_columns=True,
        completion_only_loss=None,  # labels are built by tokenize_example (prompt masked, EOS kept)
    )


def _build_trainer(model, tok, ds, args, stage: str, metrics_path: Path, on_event, global_offset: int):
    cb = _make_metrics_callback(stage, metrics_path, on_event, global_offset)
    Trainer = _make_trainer_class()
    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[cb])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # Our callback reports progress; transformers' printer would put log dicts on stdout.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _load_stage_weights(model, stage_dir: Path, lora: bool):
    """Load the weights saved after a finished stage into ``model`` (same architecture)."""
    from safetensors.torch import load_file

    if lora:
        from peft import set_peft_model_state_dict

        f = stage_dir / "adapter_model.safetensors"
        set_peft_model_state_dict(model, load_file(str(f)))
        return model
    state: dict = {}
    for f in sorted(stage_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise MetaAlignError(f"{stage_dir}: no saved weights to resume from")
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [m for m in missing if "lm_head" not in m]  # tied to the embeddings
    if bad or unexpected:
        raise MetaAlignError(f"{stage_dir}: saved weights do not match the model ({(bad + list(unexpected))[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def save_final_model(tok, cfg: TrainConfig, out: Path, template: str, prompt_format: str,
                     base: str, lora: bool, weights_dir: Path, training: dict | None = None) -> dict:
    """Save the trained corrector at the top of ``out`` from the last stage's saved weights
    (``weights_dir``, written by :func:`save_stage_weights`) and write ``metaalign.json``.
    Runs in one process (the main one) on the CPU, whatever sharding trained the weights.

    Full fine-tuning: the stage's weight files are copied (the saved model is exactly what
    the ranks trained). LoRA: the adapter is copied to ``out/adapter``; with ``cfg.merge``
    it is merged into the base reloaded unquantized (fp32; bf16 for QLoRA, whose 4-bit base
    would be re-quantized, lossily, by a merge) and the merged model goes to the top of
    ``out``, else the adapter does, beside the base's config.json. ``training``: the
    processes, device and precision that trained, recorded in the card. Returns the card."""
    import shutil

    for old in list(out.glob("*.safetensors")) + [out / "model.safetensors.index.json", out / "adapter_config.json"]:
        if old.exists():
            old.unlink()
    merged_dtype = None
    if lora:
        adapter = out / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(weights_dir / f, adapter / f)
        tok.save_pretrained(str(adapter))
        import torch
        from peft import PeftModel

        dtype = torch.bfloat16 if cfg.qlora else torch.float32
        base_model, _ = load_base_model(base, dtype=dtype)
        if cfg.merge:
            merged = PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload()
            merged.save_pretrained(str(out))
            merged_dtype = str(dtype).replace("torch.", "")
        else:
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(adapter / f, out / f)
            # The base architecture, for GGUF LoRA export (peft loads the adapter first).
            base_model.config.save_pretrained(str(out))
        del base_model
    else:
        for f in weights_dir.iterdir():
            if f.suffix == ".safetensors" or f.name in ("config.json", "generation_config.json",
                                                        "model.safetensors.index.json"):
                shutil.copy2(f, out / f.name)
    tok.save_pretrained(str(out))
    # "gguf" and "lora" (GGUF paths read by `correct`) are added by export.
    card = {"template": template, "prompt_format": prompt_format, "base_model": base,
            "trained_with": "metaalign train", "merged": bool(lora and cfg.merge) or not lora,
            "eos_token": tok.eos_token}
    if lora:
        card["adapter"] = "adapter"
        card["lora_r"] = cfg.lora_r
        if merged_dtype:
            card["merged_dtype"] = merged_dtype
    if training:
        card["training"] = training
    (out / MODEL_CARD).write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return card


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` written by :func:`train_corrector`."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_losses(metrics_path: str | Path, png: str | Path) -> Path:
    """Plot training loss against the global step, one colour per stage, into ``png``.
    Raises MetaAlignError when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MetaAlignError("--plot needs matplotlib: pip install 'metaalign-cli[plot]'") from None
    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for stage in STAGES:
        pts = [(r["global_step"], r["loss"]) for r in rows if r["stage"] == stage]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=stage, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (target tokens)")
    ax.set_title("MetaAligner training: warm-up, equal-preference, preference")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(png))
    plt.close(fig)
    return Path(png)
