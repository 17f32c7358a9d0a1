"""GGUF export of a trained corrector, for ``correct --backend llama-cpp``.

- :func:`write_llama_gguf`: a Llama-family HF checkpoint (LlamaForCausalLM: SmolLM2,
  TinyLlama, Llama 2/3...) to an f32/f16 GGUF with the ``gguf`` package (llama.cpp's own
  Python writer): hyperparameters, BPE tokenizer, and the Q/K row permutation llama.cpp's
  rotary embedding expects (as in llama.cpp's ``convert_hf_to_gguf.py``, not vendored here).
- :func:`write_lora_gguf`: a peft LoRA adapter to a GGUF LoRA adapter (``lora_path=``).
- :func:`quantize_gguf`: Q8_0, Q4_K_M... through llama-cpp-python's
  ``llama_model_quantize`` API.
- :func:`export_gguf`: all of it for a ``metaalign train`` output directory, updating its
  ``metaalign.json`` (``gguf``, and ``lora`` plus ``lora_base`` for an unmerged adapter).

numpy, torch, safetensors and gguf are imported inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from metaalign_cli.errors import MetaAlignError
from metaalign_cli.gguf_types import GGUF_TYPES

# llama.cpp's llama_ftype values for the types we name.


def _permute(w, n_head: int):
    """HF's rotate-half Q/K row order -> llama.cpp's interleaved order (rows = output dim)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _load_state_dict(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    state: dict = {}
    files = sorted(model_dir.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if not files:
        raise MetaAlignError(f"{model_dir}: no *.safetensors weights to export")
    for f in files:
        try:
            state.update(load_file(str(f)))
        except TypeError:  # bf16 has no numpy dtype: go through torch
            from safetensors.torch import load_file as load_pt

            state.update({k: v.float().numpy() for k, v in load_pt(str(f)).items()})
    return state


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    rs = cfg.get("rope_scaling") or {}
    kind = (rp.get("rope_type") or rs.get("rope_type") or rs.get("type") or "default")
    if kind not in ("default", None):
        raise MetaAlignError(f"GGUF export supports plain RoPE only, not rope_type '{kind}'")
    return float(rp.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def _pre_tokenizer_name(model_dir: Path, reference_gguf: str | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer: copied from the
    base GGUF when there is one, else read off tokenizer.json (digits split one by one before
    byte-level: ``smollm``; byte-level alone: ``gpt-2``)."""
    if reference_gguf and Path(reference_gguf).is_file():
        from gguf import GGUFReader

        r = GGUFReader(reference_gguf)
        f = r.fields.get("tokenizer.ggml.pre")
        if f is not None:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [(p.get("type"), p.get("individual_digits")) for p in parts]
    if types == [("ByteLevel", None)]:
        return "gpt-2"
    if types == [("Digits", True), ("ByteLevel", None)]:
        return "smollm"
    raise MetaAlignError(f"{model_dir}: cannot tell llama.cpp's pre-tokenizer for this tokenizer ({types})")


def write_llama_gguf(model_dir: str | Path, out_path: str | Path, out_type: str = "f16",
                     reference_gguf: str | None = None, name: str | None = None) -> Path:
    """Write ``model_dir`` (HF LlamaForCausalLM + byte-level BPE tokenizer) as a GGUF.

    ``out_type``: ``f16`` (2-D weights f16, norms f32) or ``f32``. ``reference_gguf``: the
    base GGUF, whose pre-tokenizer name is copied. Raises MetaAlignError for another
    architecture, RoPE scaling, or a tokenizer llama.cpp would not read the same way.
    """
    import numpy as np
    import gguf
    from transformers import AutoTokenizer

    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise MetaAlignError(f"{model_dir}: GGUF export supports Llama-family models, not {archs or cfg.get('model_type')}")
    if out_type not in ("f16", "f32"):
        raise MetaAlignError(f"unsupported GGUF base type '{out_type}' (f16 or f32; quantize afterwards)")
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    state = _load_state_dict(model_dir)
    vocab_size = state["model.embed_tokens.weight"].shape[0]

    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_name(name or model_dir.name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if out_type == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_vocab_size(vocab_size)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)

    # Vocabulary, as convert_hf_to_gguf.py's get_vocab_base does for byte-level BPE.
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(model_dir, reference_gguf))
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(str(model_dir), load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(w, quiet=True)
    # llama.cpp adds BOS to raw prompts exactly when the HF tokenizer does, as at training.
    probe = tok("a", add_special_tokens=True)["input_ids"]
    w.add_add_bos_token(bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id))

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    tied = cfg.get("tie_word_embeddings", False)
    for hf_name, arr in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue
        new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise MetaAlignError(f"{model_dir}: no GGUF name for tensor '{hf_name}'")
        arr = np.asarray(arr, dtype=np.float32)
        if hf_name.endswith("q_proj.weight"):
            arr = _permute(arr, n_head)
        elif hf_name.endswith("k_proj.weight"):
            arr = _permute(arr, n_kv)
        if out_type == "f16" and arr.ndim == 2:
            arr = arr.astype(np.float16)
        w.add_tensor(new, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def write_lora_gguf(adapter_dir: str | Path, model_config_dir: str | Path, out_path: str | Path,
                    out_type: str = "f16") -> Path:
    """Write a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) as a
    GGUF LoRA adapter for llama.cpp (``general.type = adapter``, ``adapter.lora.alpha``;
    tensors ``blk.N.attn_q.weight.lora_a`` (r x in) and ``.lora_b`` (out x r) in ``out_type``
    f16 or f32, with the Q/K row permutation applied to B). ``model_config_dir`` holds the base model's
    config.json. Raises MetaAlignError for settings llama.cpp cannot apply (DoRA, rank
    patterns, biases, embedding adapters)."""
    import numpy as np
    import gguf

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if acfg.get("use_dora") or acfg.get("rank_pattern") or acfg.get("alpha_pattern") or acfg.get("use_rslora"):
        raise MetaAlignError(f"{adapter_dir}: DoRA/rsLoRA/per-module ranks cannot be exported to a GGUF LoRA")
    cfg = json.loads((Path(model_config_dir) / "config.json").read_text(encoding="utf-8"))
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    from safetensors.numpy import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(acfg.get("lora_alpha", acfg.get("r", 8))))
    for key, arr in sorted(state.items()):
        name = key.removeprefix("base_model.model.")
        if ".lora_A." in name:
            base, part = name.split(".lora_A.")[0], "lora_a"
        elif ".lora_B." in name:
            base, part = name.split(".lora_B.")[0], "lora_b"
        else:
            raise MetaAlignError(f"{adapter_dir}: cannot export adapter tensor '{key}' to a GGUF LoRA")
        new = tmap.get_name(base + ".weight", try_suffixes=(".weight",))
        if new is None or "token_embd" in new:
            raise MetaAlignError(f"{adapter_dir}: no GGUF LoRA target for '{base}'")
        arr = np.asarray(arr, dtype=np.float32)
        if part == "lora_b" and base.endswith("q_proj"):
            arr = _permute(arr, n_head)
        elif part == "lora_b" and base.endswith("k_proj"):
            arr = _permute(arr, n_kv)
        if out_type == "f16":
            arr = arr.astype(np.float16)
        w.add_tensor(f"{new}.{part}", np.ascontiguousarray(arr))  # new ends in ".weight"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, threads: int | None = None) -> Path:
    """Quantize an f16/f32 GGUF to ``qtype`` (q8_0, q4_k_m, q4_0, q5_k_m, q6_k) with
    llama-cpp-python's ``llama_model_quantize``. Raises MetaAlignError on failure."""
    import os

    try:
        import llama_cpp
    except ImportError:
        raise MetaAlignError("quantizing needs llama-cpp-python: pip install llama-cpp-python") from None
    if qtype not in GGUF_TYPES or qtype in ("f16", "f32"):
        raise MetaAlignError(f"unknown quantization type '{qtype}' (q8_0, q4_k_m, q4_0, q5_k_m, q6_k)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[qtype]
    params.nthread = threads or os.cpu_count() or 1
    with _native_output_to_file() as log_path:
        rc = llama_cpp.llama_model_quantize(str(src).encode("utf-8"), str(dst).encode("utf-8"), params)
    if rc != 0 or not Path(dst).is_file():
        tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-1:] if Path(log_path).exists() else []
        raise MetaAlignError(f"{src}: llama.cpp quantization to {qtype} failed (code {rc}){': ' + tail[0] if tail else ''}")
    return Path(dst)


class _native_output_to_file:
    """Send C-level stdout/stderr (llama.cpp's per-tensor quantize log) to a temp file."""

    def __enter__(self):
        import os
        import sys
        import tempfile

        sys.stdout.flush()
        sys.stderr.flush()
        fd, self.path = tempfile.mkstemp(prefix="metaalign-quantize-", suffix=".log")
        self.saved = [os.dup(1), os.dup(2)]
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        return self.path

    def __exit__(self, *exc):
        import os

        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for f in self.saved:
            os.close(f)
        if exc[0] is None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        return False


def export_gguf(model_dir: str | Path, types: list[str], out_dir: str | Path | None = None, lora: bool = True,
                log: Callable[[str], None] | None = None) -> dict[str, str]:
    """Export a ``metaalign train`` output directory to GGUF: one file per type in ``types``
    (``f16``/``f32`` written directly, others quantized from an f16 intermediate), and with
    ``lora`` a GGUF LoRA adapter from ``model_dir/adapter`` when present (f32 when ``types``
    is just f32, else f16).

    Updates ``model_dir/metaalign.json``: ``gguf`` = the first file of ``types`` (what
    ``correct --model DIR`` then loads with llama-cpp); an unmerged LoRA run (no full model at
    the top) instead records ``gguf`` = the base GGUF and ``lora`` = the adapter GGUF. Paths
    are relative to the card when inside ``model_dir`` (see
    :func:`metaalign_cli.correctors.path_in_card`).
    Returns {type: path} (the adapter under ``lora``). Raises MetaAlignError.
    """
    from metaalign_cli.correctors import check_finished_run

    say = log or (lambda m: None)
    model_dir = Path(model_dir)
    check_finished_run(model_dir)
    if not model_dir.is_dir():
        raise MetaAlignError(f"{model_dir}: not a directory")
    types = [t.lower() for t in types] or ["f16"]
    for t in types:
        if t not in GGUF_TYPES:
            raise MetaAlignError(f"unknown GGUF type '{t}' (known: {', '.join(GGUF_TYPES)})")
    card_path = model_dir / "metaalign.json"
    from metaalign_cli.correctors import load_card_json

    card = load_card_json(card_path) if card_path.is_file() else {}
    base = card.get("base_model")
    ref = base if base and str(base).endswith(".gguf") else None
    out = Path(out_dir) if out_dir else model_dir / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    stem = model_dir.resolve().name
    written: dict[str, str] = {}
    full = (model_dir / "config.json").is_file() and any(
        p for p in model_dir.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if full:
        base_type = "f32" if types == ["f32"] else "f16"
        inter = out / f"{stem}-{base_type}.gguf"
        say(f"writing {inter}")
        write_llama_gguf(model_dir, inter, base_type, reference_gguf=ref, name=stem)
        for t in types:
            if t in ("f16", "f32"):
                if t != base_type:
                    write_llama_gguf(model_dir, out / f"{stem}-{t}.gguf", t, reference_gguf=ref, name=stem)
                written[t] = str(out / f"{stem}-{t}.gguf")
            else:
                dst = out / f"{stem}-{t}.gguf"
                say(f"quantizing to {dst}")
                written[t] = str(quantize_gguf(inter, dst, t))
        if base_type not in types:
            inter.unlink()
    adapter = model_dir / "adapter"
    if lora and (adapter / "adapter_config.json").is_file():
        cfg_dir = model_dir if (model_dir / "config.json").is_file() else None
        if cfg_dir is None:
            raise MetaAlignError(f"{model_dir}: no config.json to read the base architecture from")
        lora_type = "f32" if types == ["f32"] else "f16"
        dst = out / f"{stem}-lora-{lora_type}.gguf"
        say(f"writing {dst}")
        written["lora"] = str(write_lora_gguf(adapter, cfg_dir, dst, lora_type))
    if card:
        from metaalign_cli.correctors import path_in_card

        # Relative to the card (a moved or copied run keeps working); "embedded" for the shipped base.
        firsts = [written[t] for t in types if t in written]
        if firsts:
            card["gguf"] = path_in_card(firsts[0], model_dir)
            card.pop("lora", None)
        elif "lora" in written and ref:
            card["gguf"] = path_in_card(ref, model_dir)
            card["lora"] = path_in_card(written["lora"], model_dir)
        if "lora" in written:
            card["gguf_lora"] = path_in_card(written["lora"], model_dir)
        card_path.write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if not written:
        raise MetaAlignError(f"{model_dir}: nothing to export (no model weights and no LoRA adapter)")
    return written
