"""Generation backends behind one interface (``load``, ``warmup``, ``health``, ``generate``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.backends.base import (
    GenerationBackend,
    GenerationError,
    GenerationRequest,
    GenerationResult,
)

__all__ = [
    "BACKENDS",
    "OPTION_ALIASES",
    "GenerationBackend",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "backend_options",
    "make_backend",
]

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "llamacpp", "remote")

OPTION_ALIASES: dict[str, str] = {
    "backend_dtype": "dtype",
    "backend_quant": "quant",
    "backend_prefill_quant": "prefill_quant",
    "backend_threads": "threads",
    "backend_device": "device",
    "worker_batch_size": "max_batch",
}
"""The node's setting names (``node.settings.Settings``) -> backend keyword names."""

# Options every backend is offered; a backend that has no use for one drops it here.
_NOT_USED: dict[str, frozenset[str]] = {
    # precision is ``dtype``; the GGUF files are llama.cpp's
    "transformers": frozenset({"quant", "prefill_quant"}),
    "llamacpp": frozenset({"dtype"}),  # precision is the GGUF file's (``quant``)
    "remote": frozenset({"quant", "prefill_quant"}),  # the servers' own
}


def backend_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise options for backend ``name``.

    Setting names (``backend_dtype``, ``backend_quant``, ``backend_prefill_quant``,
    ``backend_threads``, ``backend_device``, ``worker_batch_size``) are mapped to the backend
    keywords (``dtype``, ``quant``, ``prefill_quant``, ``threads``, ``device``,
    ``max_batch``); ``None`` values are dropped (the backend's default applies); options the
    backend has no use for (``quant`` and ``prefill_quant`` for transformers, ``dtype`` for
    llama.cpp) are dropped. Other keywords pass through unchanged.

    Raises
    ------
    ValueError
        The same option given under both names with different values, or an unknown backend.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown generation backend {name!r} (known: {', '.join(BACKENDS)})")
    out: dict[str, Any] = {}
    for key, value in options.items():
        target = OPTION_ALIASES.get(key, key)
        if value is None:
            continue
        if target in out and out[target] != value:
            raise ValueError(f"backend option {target!r} given twice: {out[target]!r}, {value!r}")
        out[target] = value
    for key in _NOT_USED[name] & set(out):
        log.debug("backend %s ignores option %s=%r", name, key, out[key])
        del out[key]
    return out


def make_backend(name: str, model_dir: Path, **options: Any) -> GenerationBackend:
    """Build a backend by name: ``"transformers"``, ``"llamacpp"`` or ``"remote"``
    (OpenAI-compatible inference servers, :mod:`models.backends.remote`).

    Parameters
    ----------
    name
        Backend name as in the node's ``backend`` setting.
    model_dir
        The bundle's ``llm/`` folder (the llama.cpp backend finds its GGUF file through the
        bundle manifest next to it).
    options
        Backend keyword options, either as backend keywords (``dtype``, ``quant``,
        ``threads``, ``device``, ``max_batch``, and backend-specific ones such as ``cache``,
        ``compile``, ``kv_type``) or as the node's setting names (``backend_dtype``, ...):
        see :func:`backend_options`.

    Raises
    ------
    ValueError
        Unknown backend, an option the backend does not take, or a bad option value; a
        missing llama-cpp-python.
    """
    opts = backend_options(name, options)
    cls: Any
    if name == "transformers":
        from models.backends.transformers_backend import TransformersBackend

        cls = TransformersBackend
    elif name == "remote":
        from models.backends.remote import RemoteBackend

        cls = RemoteBackend
    else:
        try:
            from models.backends.llamacpp import LlamaCppBackend
        except ImportError as exc:  # pragma: no cover - numpy missing
            raise ValueError(f"backend {name!r} is not available: {exc}") from exc
        cls = LlamaCppBackend
    try:
        backend: GenerationBackend = cls(model_dir, **opts)
    except TypeError as exc:  # an option this backend does not take
        raise ValueError(f"backend {name!r}: {exc}") from exc
    return backend
