"""Options, sizes and model checks of the transformers backend.

The option values the backend accepts (:data:`CACHES`, :data:`DECODE_LOOPS`, :data:`DTYPES`),
how ``dtype="auto"`` resolves, how static KV caches and batches are bucketed so that compiled
graphs are reused, and the checks a loaded ``GPTNeoXForCausalLM`` must pass (the LLM-CXR
layout; the ``cache=`` forward API the own decode loop speaks).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from models.layout import VOCAB, TokenLayoutError

__all__ = [
    "CACHES",
    "DECODE_LOOPS",
    "DTYPES",
    "MAX_STATIC_CACHES",
    "STATIC_CACHE_BUCKET",
    "STOP_CHECK_EVERY",
    "WARMUP_PROMPT_TOKENS",
    "batch_bucket",
    "check_model_layout",
    "cpu_supports_bf16",
    "resolve_dtype",
    "static_cache_len",
    "takes_cache_kwarg",
]

CACHES = ("auto", "dynamic", "static")
DECODE_LOOPS = ("auto", "generate", "graph")
STOP_CHECK_EVERY = 16
"""The own decode loop looks for ``### End``/EOS in every row once per this many steps (the
only times it waits for the GPU); up to this many - 1 extra steps run after the last row ends."""
MAX_STATIC_CACHES = 8
"""Static caches kept for reuse, one per (batch, length) shape: the same tensors on every call
keep compiled graphs and CUDA graphs valid."""
STATIC_CACHE_BUCKET = 256
"""Static caches are sized up to a multiple of this, so that prompts of nearby lengths reuse
one cache shape (and one compiled graph)."""

WARMUP_PROMPT_TOKENS = 302  # a CXR->report prompt: instruction text + < 256 codes >

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``"auto"``: bf16 on CUDA with bf16 support or a bf16-capable CPU, else fp32."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}") from None


def static_cache_len(needed: int, max_positions: int) -> int:
    """Static-cache length for ``needed`` positions: rounded up to :data:`STATIC_CACHE_BUCKET`,
    at most ``max_positions``."""
    if needed < 1:
        raise ValueError(f"needed must be >= 1, got {needed}")
    bucketed = -(-needed // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
    return max(needed, min(bucketed, max_positions))


def batch_bucket(n: int) -> int:
    """The smallest power of two >= ``n``: the batch size the own decode loop runs ``n`` at."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return 1 << (n - 1).bit_length()


def takes_cache_kwarg(model: Any) -> bool:
    """Whether the model's ``forward`` takes ``cache=`` (transformers 5.2x; earlier releases
    take ``past_key_values=`` and ``cache_position=``), which the own decode loop speaks."""
    return "cache" in inspect.signature(model.forward).parameters


def check_model_layout(model: Any) -> None:
    """Raise :class:`TokenLayoutError` unless input and output embeddings have 51305 rows
    and are untied (the LLM-CXR layout on dolly-v2-3b)."""
    emb_in = model.get_input_embeddings().weight
    emb_out = model.get_output_embeddings().weight
    if emb_in.shape[0] != VOCAB:
        raise TokenLayoutError(f"input embedding has {emb_in.shape[0]} rows, need {VOCAB}")
    if emb_out.shape[0] != VOCAB:
        raise TokenLayoutError(
            f"output embedding (embed_out) has {emb_out.shape[0]} rows, need {VOCAB}"
        )
    if (
        getattr(model.config, "tie_word_embeddings", False)
        or emb_in.data_ptr() == emb_out.data_ptr()
    ):
        raise TokenLayoutError("input and output embeddings are tied; LLM-CXR's are untied")
