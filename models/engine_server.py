"""An OpenAI-compatible inference server for the remote backend: llama-cpp-python's own
server application (``llama_cpp.server``) on a bundle's GGUF file.

Node workers with ``backend = "remote"`` (:mod:`models.backends.remote`, dialect
``"llamacpp"``) share one such server. It is llama-cpp-python's server, unchanged; this
module only prepares llama.cpp the way the node's in-process backend does
(:func:`models.backends.llamacpp.library.init_llama`: the CPU backend modules beside
``libggml`` are loaded first, which llama-cpp-python's ``python -m llama_cpp.server`` does
not do for a build with dynamically loaded backends) and picks the bundle's converted file.
Prompts and answers are never logged (no access log; llama.cpp's log goes to Python
logging at warning level).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from models.backends.llamacpp.library import import_llama_cpp, init_llama
from models.backends.llamacpp.session import KV_TYPES, resolve_gguf

__all__ = ["serve"]

log = logging.getLogger(__name__)


def serve(
    model_path: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    quant: str | None = None,
    n_ctx: int = 2048,
    threads: int | None = None,
    kv_type: str = "f16",
    api_key: str | None = None,
) -> None:
    """Serve ``/v1/completions`` (and llama-cpp-python's other routes) until stopped.

    Parameters
    ----------
    model_path
        A bundle root, its ``llm/`` folder or a ``.gguf`` file (as the llama.cpp backend).
    quant
        Which converted file of the bundle (default: the backend's preference).
    n_ctx
        Positions of the one context (LLM-CXR's window is 2,048).
    threads
        CPU threads (default: llama-cpp-python's, all cores).
    kv_type
        KV-cache precision: ``"f32"``, ``"f16"`` or ``"q8_0"``.
    api_key
        When set, requests must carry ``Authorization: Bearer <api_key>``.

    Raises
    ------
    models.backends.base.GenerationError
        No GGUF file, or llama.cpp cannot be loaded.
    ValueError
        An unknown ``kv_type``.
    """
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    if kv_type not in KV_TYPES:
        raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
    gguf, _quant = resolve_gguf(Path(model_path), quant)
    init_llama(import_llama_cpp())
    fields: dict[str, Any] = {
        "model": str(gguf),
        "n_ctx": n_ctx,
        "type_k": KV_TYPES[kv_type],
        "type_v": KV_TYPES[kv_type],
        "verbose": False,
    }
    if threads:
        fields.update(n_threads=threads, n_threads_batch=threads)
    model = ModelSettings.model_validate(fields)
    app = create_app(
        # one request at a time, in turn: by default a new request interrupts the running one
        server_settings=ServerSettings(
            host=host, port=port, api_key=api_key, interrupt_requests=False
        ),
        model_settings=[model],
    )
    log.warning("inference server on %s:%d serving %s", host, port, gguf.name)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
