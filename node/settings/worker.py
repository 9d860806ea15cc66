"""Settings of the model and the worker: which backend runs the model, how jobs are batched
and leased, and how reports are generated (``docs/configuration.md``, "Model and worker").

A base of :class:`node.settings.Settings` (each field is ``CXR_NODE_<FIELD>``); the backend's
consistency with the remote servers is the ``Settings`` model's own check.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, field_validator

from node.settings.values import NonNegative, PositiveCount, PositiveSeconds

__all__ = ["WorkerSettings"]

Quant = Literal["f32", "f16", "bf16", "q8_0", "q4_k_m"]


class WorkerSettings(BaseModel):
    """The model, its backend, the worker's batches and leases, and generation; every
    refusal names its setting."""

    model_dir: Path | None = None
    backend: str = "transformers"
    backend_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend_quant: Quant | None = None
    backend_prefill_quant: Quant | None = None
    backend_threads: PositiveCount | None = None
    backend_device: str = "cpu"
    worker_concurrency: PositiveCount = 1
    worker_batch_size: PositiveCount = 1
    worker_batch_memory_mb: NonNegative = 0
    lease_seconds: PositiveSeconds = 60.0
    job_max_attempts: PositiveCount = 3
    generation_greedy: bool = True
    generation_seed: int | None = None
    generation_max_new_tokens: PositiveCount = 128
    # interactive model requests granted in a row before a waiting worker batch goes first
    model_interactive_burst: PositiveCount = 3

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        name = v.strip().lower()
        if not re.fullmatch(r"[a-z0-9_.-]+", name):
            raise ValueError(f"backend: {v!r} is not a backend name")
        return name
