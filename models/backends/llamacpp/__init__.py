"""The CPU engine: llama.cpp (through llama-cpp-python's C API) on a converted GGUF file.

Prompts go in as token ids (so the 256 image ids enter exactly), several requests decode
together as parallel llama.cpp sequences, and the next token is chosen in numpy from each
sequence's logits under the same rules as the transformers backend. Optionally a second
converted file of the same bundle computes the prompts (``prefill_quant``) and hands its K/V
to the decoding file's context.

Modules, by concept:

- :mod:`~models.backends.llamacpp.library`: llama-cpp-python in the process (import,
  log, the CPU backend loaded once, its features);
- :mod:`~models.backends.llamacpp.session`: which GGUF file(s) to load, their contexts;
- :mod:`~models.backends.llamacpp.slots`: decode calls, sequence slots, their KV cache
  and prefix reuse;
- :mod:`~models.backends.llamacpp.sampling`: the next token and when a sequence stops;
- :mod:`~models.backends.llamacpp.vocab`: the GGUF vocabulary;
- :mod:`~models.backends.llamacpp.backend`: :class:`LlamaCppBackend`, which runs batches.
"""

from __future__ import annotations

from models.backends.llamacpp.backend import LlamaCppBackend
from models.backends.llamacpp.library import cpu_features, init_llama
from models.backends.llamacpp.sampling import sample_next
from models.backends.llamacpp.session import QUANT_PREFERENCE, resolve_gguf
from models.backends.llamacpp.slots import common_prefix

__all__ = [
    "QUANT_PREFERENCE",
    "LlamaCppBackend",
    "common_prefix",
    "cpu_features",
    "init_llama",
    "resolve_gguf",
    "sample_next",
]
