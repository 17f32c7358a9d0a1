"""The GGUF weight types metaalign writes and loads, declared once (llama.cpp's file types)."""

#: GGUF types `export` / `train --export-gguf` write, with llama.cpp's file-type numbers
#: (``LLAMA_FTYPE_*``): f32/f16 by the gguf package, the rest by llama.cpp's quantizer.
GGUF_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}

#: Near-lossless types a GGUF may be re-quantized to before loading (`correct --quant`).
REQUANT_TYPES = ("q8_0", "f16", "f32")

#: The values of ``--quant``: ``auto`` (q8_0 for the embedded SmolLM2's Q4_1, else as is), ``none``, or a type.
QUANT_CHOICES = ("auto", "none", *REQUANT_TYPES)
