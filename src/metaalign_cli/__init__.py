"""metaalign: MetaAligner (Yang et al., NeurIPS 2024, arXiv 2403.17141) as a library and CLI.

The library is usable without the CLI: :mod:`objectives`, :mod:`templates`, :mod:`records`,
:mod:`correction`, :mod:`dataset`, :mod:`training`, :mod:`judging` and :mod:`backends`.
Heavy dependencies (torch, transformers, llama_cpp) are imported lazily by the backends.
"""

__version__ = "0.1.0"
