"""The model host: loads the LLM-CXR bundle once per process and shares it safely.

:class:`ModelHost` is a node component (``start()`` non-blocking, ``stop()`` waits). It opens
``settings.model_dir`` with :meth:`models.runtime.LLMCXR.from_bundle` in a background thread,
with the backend chosen by ``settings.backend`` and its options (dtype, quantisation,
threads, device), then warms it up (one tiny report through the ONNX encoder and the LLM).
Until then :attr:`ModelHost.ready` is false; when loading fails :attr:`ModelHost.error` says
why (a missing directory, a bad bundle) and the node keeps receiving and queueing studies
while the ``/ready`` endpoint reports the reason.

The worker and the admin API's interactive tasks share one model: every use goes through
:meth:`ModelHost.use`, a context manager holding a lock, so one request runs on the model at a
time (the backends batch internally; the worker batches studies itself). Interactive work
goes ahead of waiting batches without starving them (:mod:`node.runtime.model_lock`).

Batch memory estimate (:meth:`ModelHost.sequence_bytes`), used by the worker to honour
``worker_batch_memory_mb``: per sequence of ``T = prompt + max_new_tokens`` tokens,

- KV cache ``2 x layers x hidden x T x b`` bytes (``b`` = 2 for bf16/fp16 and llama.cpp's
  f16 cache, 4 for fp32),
- prefill attention scores ``heads x P^2 x 4`` bytes (eager attention, fp32 softmax),
- prefill MLP activations ``P x intermediate x b`` bytes and hidden states
  ``4 x P x hidden x b``,
- logits of one step ``vocab x 4`` bytes (generation keeps only the last position),

with ``P`` the prompt length. Weights are shared by the batch and not counted. The estimate
is an upper bound for the transformers backend's eager path and close for llama.cpp.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from node.runtime.model_lock import FairModelLock
from node.settings import Settings

if TYPE_CHECKING:
    from models.runtime import LLMCXR
    from node.runtime.service import NodeContext

__all__ = ["ModelHost", "ModelNotReady", "backend_options", "make_model_host"]

log = logging.getLogger(__name__)

EXTRAS_KEY = "model_host"
_DEFAULT_MAX_BATCH = {"transformers": 8, "llamacpp": 4}
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


class ModelNotReady(RuntimeError):
    """The model is not loaded (yet, or loading failed): HTTP 503 Service Unavailable."""

    http_status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def backend_options(settings: Settings) -> dict[str, Any]:
    """Keyword options of the configured backend's constructor (``models.backends``).

    transformers: ``dtype``, ``device``, ``threads``, ``max_batch``, ``warmup_batch`` (the
    worker batch size); llama.cpp: ``quant``, ``prefill_quant``, ``device``, ``threads``,
    ``max_batch``; remote: the ``remote_*`` settings and ``max_batch``.
    ``max_batch`` is at least the worker's batch size so that one worker batch is one
    backend batch.
    """
    name = settings.backend
    max_batch = max(settings.worker_batch_size, _DEFAULT_MAX_BATCH.get(name, 1))
    opts: dict[str, Any] = {"device": settings.backend_device, "max_batch": max_batch}
    if settings.backend_threads is not None:
        opts["threads"] = settings.backend_threads
    if name == "transformers":
        opts["dtype"] = settings.backend_dtype
        # what warmup compiles on a GPU (one compiled shape per power-of-two batch bucket)
        opts["warmup_batch"] = settings.worker_batch_size
    elif name == "remote":
        opts.update(settings.remote_options())
    elif name == "llamacpp":
        if settings.backend_quant is not None:
            opts["quant"] = settings.backend_quant
        if settings.backend_prefill_quant is not None:
            opts["prefill_quant"] = settings.backend_prefill_quant
    return opts


class ModelHost:
    """Loads the configured bundle in the background and hands it out under a lock.

    Parameters
    ----------
    settings
        ``model_dir``, ``backend`` and ``backend_*``, ``generation_max_new_tokens``,
        ``model_interactive_burst`` (interactive grants in a row before a waiting batch).
    warmup
        Run one tiny report after loading (default ``True``).
    """

    def __init__(self, settings: Settings, *, warmup: bool = True) -> None:
        self.settings = settings
        self.warmup = warmup
        self._runtime: LLMCXR | None = None
        self._error: str | None = None
        self._ready = threading.Event()
        self._done = threading.Event()  # loading finished, with or without success
        self._lock = FairModelLock(settings.model_interactive_burst)
        self._thread: threading.Thread | None = None
        self._loaded_at: datetime | None = None
        self._load_s: float | None = None
        self._prompt_tokens: int | None = None

    # --- component ------------------------------------------------------------------------

    def start(self) -> None:
        """Start loading in a background thread (returns at once)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._load, name="model-host", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Wait briefly for a load in progress; the model is released with the process."""
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _load(self) -> None:
        from models.runtime import LLMCXR

        model_dir = self.settings.model_dir
        t0 = time.perf_counter()
        try:
            if model_dir is None:
                raise ModelNotReady("model_dir is not set: no model bundle to load")
            if not Path(model_dir).is_dir():
                raise ModelNotReady(f"model_dir {model_dir} does not exist or is not a directory")
            log.info("loading model bundle %s (backend %s)", model_dir, self.settings.backend)
            runtime = LLMCXR.from_bundle(
                Path(model_dir),
                backend=self.settings.backend,
                backend_options=backend_options(self.settings),
            )
            if self.warmup:
                runtime.report(np.zeros((3, 256, 256), dtype=np.float32), max_new_tokens=2)
            self._runtime = runtime
            self._prompt_tokens = self._report_prompt_tokens(runtime)
            self._loaded_at = datetime.now(UTC)
            self._load_s = time.perf_counter() - t0
            self._ready.set()
            log.info(
                "model %s %s ready%s in %.1f s (backend %s)",
                runtime.model_name,
                runtime.model_version,
                " (DEMO model)" if runtime.bundle.demo else "",
                self._load_s,
                self.settings.backend,
            )
        except Exception as exc:  # any failure: keep the node up, say why
            self._error = (
                f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, ModelNotReady)
                else exc.message
            )
            log.error("model not loaded: %s", self._error)
        finally:
            self._done.set()

    @staticmethod
    def _report_prompt_tokens(runtime: LLMCXR) -> int:
        from models.layout import CODES_PER_IMAGE
        from models.prompts import report_prompt

        ids = runtime.tokenizer.encode_with_image(report_prompt(), [0] * CODES_PER_IMAGE)
        return len(ids)

    # --- state ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and warmed up."""
        return self._ready.is_set()

    @property
    def error(self) -> str | None:
        """Why loading failed (``None`` while loading or once ready)."""
        return self._error

    @property
    def loading(self) -> bool:
        """Whether the load is still in progress."""
        return self._thread is not None and not self._done.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until ready, loading failed, or ``timeout`` seconds; return :attr:`ready`."""
        self._done.wait(timeout)
        return self.ready

    @property
    def runtime(self) -> LLMCXR:
        """The loaded :class:`~models.runtime.LLMCXR` (use it inside :meth:`use`).

        Raises
        ------
        ModelNotReady
            While loading or after a failed load (HTTP 503).
        """
        if self._runtime is None or not self._ready.is_set():
            if self._error:
                raise ModelNotReady(f"model not available: {self._error}")
            raise ModelNotReady("model is still loading")
        return self._runtime

    @contextmanager
    def use(self, timeout: float | None = None, *, interactive: bool = False) -> Iterator[LLMCXR]:
        """Hold the model for one piece of work: ``with host.use() as runtime: ...``.

        Interactive work (a question, a report for an upload) goes ahead of waiting batch
        work without starving it (:mod:`node.runtime.model_lock`).

        Parameters
        ----------
        timeout
            Seconds to wait for the model; ``None`` waits as long as it takes.
        interactive
            A person is waiting for this piece of work.

        Raises
        ------
        ModelNotReady
            When the model is not loaded, or it stayed busy for ``timeout`` seconds (503).
        """
        runtime = self.runtime
        acquired = self._lock.acquire(interactive=interactive, timeout=timeout)
        if not acquired:
            raise ModelNotReady(f"model busy for more than {timeout} s")
        try:
            yield runtime
        finally:
            self._lock.release()

    @property
    def model_lock(self) -> FairModelLock:
        """The lock :meth:`use` takes (its ``grants`` and ``waiting()`` for diagnostics)."""
        return self._lock

    def info(self) -> dict[str, Any]:
        """Model identity and state for ``/ready`` and the web console (no patient data)."""
        out: dict[str, Any] = {
            "ready": self.ready,
            "loading": self.loading,
            "error": self._error,
            "model_dir": str(self.settings.model_dir) if self.settings.model_dir else None,
            "backend": self.settings.backend,
            "dtype": self.settings.backend_dtype,
            "quant": self.settings.backend_quant,
            "prefill_quant": self.settings.backend_prefill_quant,
            "device": self.settings.backend_device,
            "engine_version": None,
            "cpu_features": None,
            "model_name": None,
            "model_version": None,
            "demo": None,
            "loaded_at": self._loaded_at.isoformat() if self._loaded_at else None,
            "load_seconds": self._load_s,
        }
        if self._runtime is not None:
            rt = self._runtime
            out.update(
                model_name=rt.model_name, model_version=rt.model_version, demo=rt.bundle.demo
            )
            health = rt.backend.health()
            out["dtype"] = health.get("dtype", out["dtype"])
            out["quant"] = health.get("quant", out["quant"])
            out["device"] = health.get("device", out["device"])
            out["engine_version"] = health.get("engine_version")
            # llama.cpp: the instruction sets of the CPU kernels in use (None for transformers)
            out["cpu_features"] = health.get("cpu_features")
        return out

    # --- batch memory estimate ------------------------------------------------------------

    def _llm_shape(self) -> dict[str, int]:
        runtime = self.runtime
        config_path = runtime.bundle.llm_dir / "config.json"
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        hidden = int(cfg["hidden_size"])
        return {
            "layers": int(cfg["num_hidden_layers"]),
            "hidden": hidden,
            "heads": int(cfg["num_attention_heads"]),
            "intermediate": int(cfg.get("intermediate_size", 4 * hidden)),
            "vocab": int(cfg.get("vocab_size", 51305)),
        }

    def _element_bytes(self) -> int:
        if self.settings.backend == "llamacpp":
            return 2  # f16 KV cache
        dtype = str(self.runtime.backend.health().get("dtype", "float32"))
        return _DTYPE_BYTES.get(dtype, 4)

    def sequence_bytes(self, max_new_tokens: int) -> int:
        """Estimated KV-cache and activation bytes of one report sequence (module docstring).

        Raises
        ------
        ModelNotReady
            When the model is not loaded.
        """
        shape = self._llm_shape()
        b = self._element_bytes()
        prompt = self._prompt_tokens or 302
        total = prompt + max_new_tokens
        kv = 2 * shape["layers"] * shape["hidden"] * total * b
        attention = shape["heads"] * prompt * prompt * 4
        mlp = prompt * shape["intermediate"] * b + 4 * prompt * shape["hidden"] * b
        logits = shape["vocab"] * 4
        return int(kv + attention + mlp + logits)

    def max_batch_for_memory(self, *, budget_mb: int, max_new_tokens: int, limit: int) -> int:
        """Largest batch (1..``limit``) whose estimated memory fits ``budget_mb`` (0: no cap)."""
        if limit < 1:
            raise ValueError(f"batch limit must be at least 1, got {limit}")
        if budget_mb <= 0:
            return limit
        per_seq = self.sequence_bytes(max_new_tokens)
        return max(1, min(limit, (budget_mb * 1024 * 1024) // per_seq))


def make_model_host(ctx: NodeContext) -> ModelHost:
    """Component factory: a :class:`ModelHost` for ``ctx.settings``, stored in
    ``ctx.extras["model_host"]`` for the worker and the API."""
    host = ModelHost(ctx.settings)
    ctx.extras[EXTRAS_KEY] = host
    return host
