"""Settings of the model and the worker: which backend runs the model, how jobs are batched
and leased, and how reports are generated (``docs/configuration.md``, "Model and worker").

A base of :class:`node.settings.Settings` (each field is ``CXR_NODE_<FIELD>``); the backend's
consistency with the remote servers is the ``Settings`` model's own check.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationInfo, field_validator

from node.settings.values import at_least, positive_seconds

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
    backend_threads: int | None = None
    backend_device: str = "cpu"
    worker_concurrency: int = 1
    worker_batch_size: int = 1
    worker_batch_memory_mb: int = 0
    lease_seconds: float = 60.0
    job_max_attempts: int = 3
    generation_greedy: bool = True
    generation_seed: int | None = None
    generation_max_new_tokens: int = 128
    # interactive model requests granted in a row before a waiting worker batch goes first
    model_interactive_burst: int = 3

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        name = v.strip().lower()
        if not re.fullmatch(r"[a-z0-9_.-]+", name):
            raise ValueError(f"backend: {v!r} is not a backend name")
        return name

    @field_validator("backend_threads")
    @classmethod
    def _threads(cls, v: int | None) -> int | None:
        return None if v is None else at_least(v, 1, setting="backend_threads")

    @field_validator(
        "worker_concurrency",
        "worker_batch_size",
        "job_max_attempts",
        "generation_max_new_tokens",
        "model_interactive_burst",
    )
    @classmethod
    def _at_least_one(cls, v: int, info: ValidationInfo) -> int:
        return at_least(v, 1, setting=str(info.field_name))

    @field_validator("worker_batch_memory_mb")
    @classmethod
    def _memory(cls, v: int) -> int:
        return at_least(v, 0, setting="worker_batch_memory_mb")

    @field_validator("lease_seconds")
    @classmethod
    def _lease(cls, v: float) -> float:
        return positive_seconds(v, setting="lease_seconds")
