"""Generation backends behind one interface (``load``, ``warmup``, ``health``, ``generate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.backends.base import (
    GenerationBackend,
    GenerationError,
    GenerationRequest,
    GenerationResult,
)

__all__ = [
    "GenerationBackend",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "make_backend",
]


def make_backend(name: str, model_dir: Path, **options: Any) -> GenerationBackend:
    """Build a backend by name (``"transformers"``; others register here when present).

    Parameters
    ----------
    name
        Backend name as in the node's ``backend`` setting.
    model_dir
        The bundle's ``llm/`` folder.
    options
        Backend keyword options (e.g. ``dtype``, ``device``, ``threads``).
    """
    if name == "transformers":
        from models.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model_dir, **options)
    if name == "llamacpp":
        try:
            from models.backends.llamacpp_backend import LlamaCppBackend  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ValueError(f"backend {name!r} is not available: {exc}") from exc
        backend: GenerationBackend = LlamaCppBackend(model_dir, **options)
        return backend
    raise ValueError(f"unknown generation backend {name!r} (known: transformers, llamacpp)")
