"""The CPU engine: llama.cpp (through llama-cpp-python's C API) on a converted GGUF file.

Prompts go in as token ids (so the 256 image ids enter exactly), several requests decode
together as parallel llama.cpp sequences (one weight pass per step for the whole batch), and
the next token is chosen in numpy from each sequence's logits: greedy or seeded sampling,
image ids masked in text mode, and in image mode only image ids (50281..51304) for 256
steps, then ``>``: the same rules as the transformers backend.

Optionally a second converted file of the same bundle computes the prompts
(``prefill_quant``): its K/V are copied into the decoding file's context, so prefill runs on
the format whose matrix kernels are fastest for many tokens at once and decode on the one
that reads the fewest bytes per token.

Optionally greedy text generation is speculative (``speculative``): each decode step also
checks up to *k* tokens proposed from n-gram counts (:mod:`models.backends.speculative`),
as many as the measured cost of a longer step makes pay, and keeps those the model agrees
with: several tokens for one pass over the weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.backends.base import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    error_result,
)
from models.backends.speculative import NgramDrafter, SequenceIndex
from models.layout import (
    CODES_PER_IMAGE,
    END_ID,
    EOS_ID,
    IMAGE_TOKEN_OFFSET,
    VOCAB,
    TokenLayoutError,
    id_to_code,
)

log = logging.getLogger(__name__)

QUANT_PREFERENCE: tuple[str, ...] = ("q8_0", "f16", "bf16", "q4_k_m", "f32")
"""Which converted file a bundle uses when no quantisation is asked for."""
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
SHAPE_KEYS = (
    "gptneox.context_length",
    "gptneox.embedding_length",
    "gptneox.block_count",
    "gptneox.attention.head_count",
    "gptneox.rope.dimension_count",
)
"""GGUF keys on which a prefill file and the decode file must agree."""
STOP_IDS = (END_ID, EOS_ID)

_LOG_CALLBACK: Any = None  # keeps the ctypes callback alive for the process
_BACKEND_READY = False
_CPU_FEATURES: list[str] = []
_INIT_LOCK = threading.Lock()


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise GenerationError(
            "llama-cpp-python is not installed: pip install 'llm-cxr-node[llamacpp]'"
        ) from exc
    return llama_cpp


def _init_llama(llama_cpp: Any) -> None:
    """Initialise llama.cpp once and route its log to Python logging (warnings and up)."""
    global _LOG_CALLBACK, _BACKEND_READY
    with _INIT_LOCK:
        if _BACKEND_READY:
            return

        def _log(level: int, text: bytes | None, _user: Any) -> None:
            # ggml levels: 3 = warn (to debug), 4 = error (to warning); the rest is dropped
            if text and level in (3, 4):
                msg = text.decode("utf-8", "replace").rstrip()
                log.log(logging.WARNING if level == 4 else logging.DEBUG, "llama.cpp: %s", msg)

        _LOG_CALLBACK = llama_cpp.llama_log_callback(_log)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        features = cpu_features(llama_cpp.llama_print_system_info())
        if not features:
            # a GGML_BACKEND_DL build whose CPU backends were not found next to libggml
            raise GenerationError(
                f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} loaded no CPU "
                "backend; rebuild it with scripts/build-llama-cpp.sh"
            )
        _CPU_FEATURES[:] = features
        _BACKEND_READY = True


def cpu_features(system_info: bytes | str) -> list[str]:
    """The features of ggml's CPU backend, from ``llama_print_system_info()``.

    With the node's build (``scripts/build-llama-cpp.sh``: every x86 CPU variant, the best
    one for this CPU loaded at start) they name the instruction sets in use, e.g. ``AVX2`` on
    a Haswell-class server or ``AVX512``, ``AVX512_VNNI`` and ``AVX512_BF16`` on a newer one.

    Parameters
    ----------
    system_info
        The text, e.g. ``"CPU : SSE3 = 1 | AVX2 = 1 | LLAMAFILE = 1 | "``.

    Returns
    -------
    list of str
        The names set to 1 in the ``CPU`` section, in order; empty when there is none.
    """
    text = system_info.decode("utf-8", "replace") if isinstance(system_info, bytes) else system_info
    _, sep, rest = text.partition("CPU :")
    if not sep:
        return []
    feats: list[str] = []
    for item in rest.split("|"):
        name, eq, value = item.partition("=")
        if not eq or ":" in name:
            break  # the end, or the next backend's "NAME : FEATURE = ..." section
        if value.strip() == "1":
            feats.append(name.strip())
    return feats


def _meta_str(llama_cpp: Any, model: Any, key: str) -> str | None:
    """A GGUF key/value of a loaded model as text (``None`` if absent)."""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode("utf-8"), buf, 256)
    return None if n < 0 else buf.value.decode("utf-8", "replace")


def resolve_gguf(model_path: Path, quant: str | None = None) -> tuple[Path, str | None]:
    """Find the GGUF file to load.

    ``model_path`` is a ``.gguf`` file, a bundle root or a bundle's ``llm/`` folder; a bundle's
    manifest lists its converted files under ``engines.llamacpp``. Without ``quant`` the first
    of :data:`QUANT_PREFERENCE` present is used.

    Returns
    -------
    (path, quant)
        ``quant`` is ``None`` for a bare file.
    """
    model_path = Path(model_path)
    if model_path.is_file():
        return model_path, quant
    for root in (model_path, model_path.parent):
        manifest = root / "manifest.json"
        if not manifest.is_file():
            continue
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise GenerationError(f"{manifest}: unreadable manifest: {exc}") from exc
        entries = data.get("engines", {}).get("llamacpp", {})
        if not entries:
            raise GenerationError(
                f"bundle {root} has no llama.cpp model: run "
                "'cxr-node models convert BUNDLE --engine llamacpp --quant q8_0'"
            )
        if quant is not None:
            if quant not in entries:
                raise GenerationError(
                    f"bundle {root} has no llama.cpp {quant} model (has {', '.join(entries)})"
                )
            chosen = quant
        else:
            chosen = next((q for q in QUANT_PREFERENCE if q in entries), next(iter(entries)))
        return root / str(entries[chosen]["path"]), chosen
    raise GenerationError(f"{model_path} is neither a .gguf file nor a model bundle")


def _find_tokenizer_dir(model_path: Path) -> Path | None:
    """The bundle's ``llm/`` folder holding ``tokenizer.json``, if any."""
    cands = [model_path, model_path / "llm", model_path.parent / "llm", model_path.parent]
    if model_path.is_file():
        cands = [model_path.parent, model_path.parent.parent / "llm", model_path.parents[2] / "llm"]
    return next((c for c in cands if (c / "tokenizer.json").is_file()), None)


def sample_next(
    logits: np.ndarray,
    *,
    greedy: bool,
    rng: np.random.Generator | None,
    temperature: float,
    top_p: float,
    top_k: int,
) -> int:
    """Pick the next id from (already masked) logits: argmax, or temperature/top-k/top-p."""
    if greedy or rng is None:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    finite = np.isfinite(z)
    idx = np.flatnonzero(finite)
    z = z[idx]
    if top_k > 0 and top_k < z.size:
        keep = np.argpartition(-z, top_k - 1)[:top_k]
        idx, z = idx[keep], z[keep]
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        n = int(np.searchsorted(cum, top_p) + 1)
        order = order[:n]
        idx, p = idx[order], p[order] / p[order].sum()
    return int(idx[rng.choice(p.size, p=p)])


@dataclass
class _Seq:
    """Decoding state of one request (one llama.cpp sequence)."""

    req: GenerationRequest
    prompt: list[int]
    rng: np.random.Generator | None
    max_new: int
    out: list[int] = field(default_factory=list)
    logits: np.ndarray | None = None
    stop: str | None = None
    slot: int = 0
    reused: int = 0
    # the n-gram index of prompt + output, for greedy text with speculation on
    index: SequenceIndex | None = None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class LlamaCppBackend:
    """Generation with llama.cpp on a GGUF file made by :mod:`models.gguf_convert`.

    Parameters
    ----------
    model_dir
        A bundle root, its ``llm/`` folder (the converted files are found through the
        manifest's ``engines.llamacpp``) or a ``.gguf`` file.
    quant
        Which converted file to use (``"q8_0"``, ``"f16"``, ...); default: see
        :data:`QUANT_PREFERENCE`.
    threads
        CPU threads for decode and prefill (default: all cores).
    n_ctx
        Context per sequence (prompt + new tokens), at most the model's 2048 positions.
    n_batch
        Most tokens per ``llama_decode`` call (prefill chunk).
    max_batch
        Most requests decoded together (llama.cpp parallel sequences).
    kv_type
        KV-cache precision: ``"f16"``, ``"f32"`` (exact agreement checks), ``"q8_0"``, or
        ``"auto"`` (default): F32 for an F32 file (so ``--quant f32`` reproduces the
        transformers fp32 reference), else F16.
    flash_attn
        Use llama.cpp's flash attention (needs an F16 KV cache).
    prefix_cache
        Keep each sequence's K/V after a call and, when the next prompt given to that
        sequence starts with the same ids, prefill only the rest (default on). Report
        prompts share about 40 template ids before the image; the results are the same
        either way, since cached K/V are exactly what prefilling those ids again computes.
    device
        ``"cpu"``, or ``"cuda"``/``"gpu"`` to offload every layer when llama-cpp-python was
        built with a GPU backend.
    prefill_quant
        Another converted file of the bundle (``"f16"``, ``"bf16"``, ...) that computes the
        prompts; each sequence's K/V are then copied into the ``quant`` file's context
        (``llama_state_seq_get_data``/``set_data``) and decoding continues there. Prefill is
        compute-bound, and ggml's F16/BF16 matrix kernels beat its Q8_0 ones there on many
        CPUs, while decode reads every weight per token and favours the smaller file. Costs
        the memory of both files; the first new token comes from the prefill file's
        logits. Default: one file does both.
    speculative
        Greedy text generation checks up to this many proposed tokens per decode step
        (0: off, the default). Proposals come from n-gram counts in the sequence and in the
        last ``speculative_memory`` reports this backend generated
        (:class:`~models.backends.speculative.NgramDrafter`); a proposal is kept only where
        it is the model's own argmax, so the answer is greedy decoding's (up to the
        summation order of a several-token matrix product against a one-token one).
        Sampling and image generation decode one token per step.
    speculative_memory
        Reports remembered for the lookups (token ids, in memory only).
    speculative_step_costs
        Relative seconds of a decode step of 1, 2, ... tokens, from which the drafter sizes
        its proposals (as many as lower the expected seconds per token; in a batch, for
        all sequences of the step together; longer steps priced by the last difference).
        Default: measured by :meth:`load` on this machine (:meth:`measure_step_costs`, a
        few seconds at full size); ``[1.0]`` treats longer steps as free and always
        proposes up to ``speculative`` tokens.
    speculative_batch
        Most sequences one decode step is expected to hold (the node passes its worker
        batch size), which bounds the step sizes :meth:`measure_step_costs` times: up to
        ``speculative_batch x (speculative + 1)`` tokens, at most 9. Default: ``max_batch``.
        A step that holds more sequences is still sized; its cost is extrapolated.
    dtype
        Ignored (the precision is the GGUF file's); accepted so the node can pass the same
        options to every backend.
    """

    name = "llamacpp"

    def __init__(
        self,
        model_dir: Path | str,
        *,
        quant: str | None = None,
        threads: int | None = None,
        n_ctx: int = 1024,
        n_batch: int = 512,
        max_batch: int = 4,
        kv_type: str = "auto",
        flash_attn: bool = False,
        prefix_cache: bool = True,
        device: str = "cpu",
        prefill_quant: str | None = None,
        speculative: int = 0,
        speculative_memory: int = 256,
        speculative_step_costs: Sequence[float] | None = None,
        speculative_batch: int | None = None,
        dtype: str | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if speculative_batch is not None and not 1 <= speculative_batch <= max_batch:
            raise ValueError(
                f"speculative_batch must be in 1..max_batch ({max_batch}), got {speculative_batch}"
            )
        if not 16 <= n_ctx <= 32768:
            raise ValueError(f"n_ctx must be in 16..32768, got {n_ctx}")
        if n_batch < 1:
            raise ValueError("n_batch must be >= 1")
        if not 0 <= speculative <= 16:
            raise ValueError(f"speculative must be in 0..16, got {speculative}")
        if max_batch * (speculative + 1) > n_batch:
            raise ValueError(
                f"n_batch ({n_batch}) must hold max_batch x (speculative + 1) = "
                f"{max_batch * (speculative + 1)} tokens"
            )
        if kv_type != "auto" and kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be auto or one of {sorted(KV_TYPES)}, got {kv_type!r}")
        if device not in ("cpu", "cuda", "gpu") and not device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        self.model_dir = Path(model_dir)
        self.quant = quant
        self.threads = int(threads or os.cpu_count() or 1)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.max_batch = max_batch
        self.kv_type = kv_type
        self.flash_attn = flash_attn
        self.prefix_cache = prefix_cache
        self.device = device
        self.prefill_quant = prefill_quant
        self.speculative = speculative
        self.speculative_batch = speculative_batch or max_batch
        # text mode never emits image ids: proposals stop before one
        self._drafter = (
            NgramDrafter(
                max_tokens=speculative,
                memory=speculative_memory,
                max_id=IMAGE_TOKEN_OFFSET,
                step_costs=speculative_step_costs,
            )
            if speculative
            else None
        )
        self.gguf_path: Path | None = None
        self.prefill_path: Path | None = None
        self._llama: Any = None
        self._model: Any = None
        self._ctx: Any = None
        # the prefill file's model and context (None: self._model/_ctx prefill too)
        self._pmodel: Any = None
        self._pctx: Any = None
        self._state_buf = np.empty(0, dtype=np.uint8)
        self._batch: Any = None
        self._vocab: Any = None
        self._tokenizer: Any = None
        self._open_id: int | None = None
        self._close_id: int | None = None
        self._max_pos = 2048
        self._lock = threading.Lock()
        self._counters = {
            "requests": 0,
            "errors": 0,
            "new_tokens": 0,
            "prompt_tokens": 0,
            "prompt_tokens_reused": 0,
            # llama_decode calls after the prompts, and speculation's proposals
            "decode_steps": 0,
            "draft_tokens": 0,
            "draft_tokens_accepted": 0,
            # rows fed to idle sequences between running ones, so that a batch step stays
            # one pass over the weights (:meth:`_filler_rows`)
            "filler_rows": 0,
        }
        # Token ids whose K/V each llama.cpp sequence (slot) of the prefilling context
        # holds from the previous call:
        # a new prompt sharing a prefix with them (every report prompt shares the template,
        # the instruction and "Input:\n<") prefills only what differs.
        self._slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]

    # -- lifecycle --------------------------------------------------------------------------

    def load(self) -> None:
        """Load the GGUF file(s), check the vocabulary layout, create the context(s);
        idempotent."""
        if self._ctx is not None:
            return
        llama_cpp = _import_llama_cpp()
        _init_llama(llama_cpp)
        self._llama = llama_cpp
        path, quant = resolve_gguf(self.model_dir, self.quant)
        ppath: Path | None = None
        if self.prefill_quant is not None:
            if self.model_dir.is_file():
                raise GenerationError(
                    "prefill_quant needs a model bundle holding both converted files, "
                    f"not the single file {self.model_dir}"
                )
            ppath, _ = resolve_gguf(self.model_dir, self.prefill_quant)
            if ppath == path:
                raise GenerationError(f"prefill_quant {self.prefill_quant!r} is the decode file")
        model, ctx, meta = self._open(path, kv_type=self.kv_type, quant=quant)
        self._model, self._ctx = model, ctx
        self._max_pos = int(meta["gptneox.context_length"] or 2048)
        self.gguf_path, self.quant = path, quant or meta.get("llmcxr.quant")
        if ppath is not None:
            try:
                pmodel, pctx, pmeta = self._open(ppath, kv_type=self.kv_type, quant=None)
            except BaseException:
                self.close()
                raise
            self._pmodel, self._pctx, self.prefill_path = pmodel, pctx, ppath
            for key in SHAPE_KEYS:
                if pmeta.get(key) != meta.get(key):
                    self.close()
                    raise GenerationError(
                        f"{ppath.name} and {path.name} are not the same model: {key} is "
                        f"{pmeta.get(key)!r} against {meta.get(key)!r}"
                    )
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        tok_dir = _find_tokenizer_dir(self.model_dir)
        if tok_dir is not None:
            from models.text import LLMCXRTokenizer

            self._tokenizer = LLMCXRTokenizer.from_dir(tok_dir)
            self._open_id = self._tokenizer.image_open_id
            self._close_id = self._tokenizer.image_close_id
        else:
            self._open_id = self._single_token("<")
            self._close_id = self._single_token(">")
        if self._drafter is not None and self._drafter.step_costs is None:
            self._drafter.step_costs = self.measure_step_costs()
        log.info(
            "llama.cpp backend loaded (%s, quant=%s, prefill=%s, threads=%d, max_batch=%d)",
            path.name,
            self.quant,
            ppath.name if ppath else "same file",
            self.threads,
            self.max_batch,
        )

    def _open(
        self, path: Path, *, kv_type: str, quant: str | None
    ) -> tuple[Any, Any, dict[str, str | None]]:
        """Load one GGUF file and create its context; returns (model, context, metadata).

        ``kv_type="auto"`` is resolved here (and stored) from the file's quantisation.
        """
        from models.gguf_convert import LAYOUT_KEYS, check_layout_metadata

        llama_cpp = self._llama
        if not path.is_file():
            raise GenerationError(f"llama.cpp model file {path} is missing")
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0 if self.device == "cpu" else -1
        model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
        if not model:
            raise GenerationError(f"llama.cpp could not load {path}")
        try:
            keys = [*LAYOUT_KEYS, *SHAPE_KEYS, "llmcxr.quant"]
            meta = {k: _meta_str(llama_cpp, model, k) for k in keys}
            check_layout_metadata(meta, where=str(path))
            vocab = llama_cpp.llama_model_get_vocab(model)
            n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
            if n_vocab != VOCAB:
                raise TokenLayoutError(
                    f"{path}: GGUF vocabulary has {n_vocab} entries, need {VOCAB}"
                )
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = self.n_ctx * self.max_batch
            cparams.n_batch = self.n_batch
            cparams.n_ubatch = self.n_batch
            cparams.n_seq_max = self.max_batch
            cparams.kv_unified = False
            cparams.n_threads = self.threads
            cparams.n_threads_batch = self.threads
            if kv_type == "auto":
                file_quant = quant or meta.get("llmcxr.quant")
                self.kv_type = kv_type = "f32" if file_quant == "f32" else "f16"
            cparams.type_k = KV_TYPES[kv_type]
            cparams.type_v = KV_TYPES[kv_type]
            cparams.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if self.flash_attn
                else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            cparams.no_perf = True
            cparams.offload_kqv = self.device != "cpu"
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                raise GenerationError(f"llama.cpp could not create a context for {path}")
        except BaseException:
            llama_cpp.llama_model_free(model)
            raise
        return model, ctx, meta

    def close(self) -> None:
        """Free the context, the batch and the model."""
        if self._llama is None:
            return
        if self._batch is not None:
            self._llama.llama_batch_free(self._batch)
        for ctx in (self._ctx, self._pctx):
            if ctx:
                self._llama.llama_free(ctx)
        for model in (self._model, self._pmodel):
            if model:
                self._llama.llama_model_free(model)
        self._batch = self._ctx = self._model = self._pctx = self._pmodel = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        with contextlib.suppress(Exception):
            self.close()

    def warmup(self) -> None:
        """One tiny greedy generation."""
        self.load()
        self.generate([GenerationRequest(prompt_ids=[EOS_ID, END_ID], max_new_tokens=2)])

    def health(self) -> dict[str, Any]:
        """Loaded flag, model file, quantisation, threads, llama-cpp-python version, counters."""
        out: dict[str, Any] = {
            "backend": self.name,
            "loaded": self._ctx is not None,
            "device": self.device,
            "model_path": str(self.gguf_path or self.model_dir),
            "quant": self.quant,
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "max_batch": self.max_batch,
            "kv_type": self.kv_type,
            "prefix_cache": self.prefix_cache,
            "prefill_quant": self.prefill_quant,
            "prefill_model_path": str(self.prefill_path) if self.prefill_path else None,
            "speculative": self.speculative,
            "speculative_batch": self.speculative_batch,
            "speculative_step_costs": (
                self._drafter.step_costs if self._drafter is not None else None
            ),
            # "+cxrnode.N": built with the node's patch (scripts/build-llama-cpp.sh)
            "engine_version": f"llama-cpp-python {getattr(self._llama, '__version__', '?')}"
            if self._llama is not None
            else None,
            # the instruction sets of the ggml CPU backend in use (one of the build's variants)
            "cpu_features": list(_CPU_FEATURES) if self._llama is not None else None,
            **self._counters,
        }
        if self._model is not None:
            out["model_bytes"] = int(self._llama.llama_model_size(self._model))
            out["parameters"] = int(self._llama.llama_model_n_params(self._model))
        return out

    # -- text helpers -----------------------------------------------------------------------

    def _single_token(self, text: str) -> int:
        buf = (self._llama.llama_token * 8)()
        data = text.encode("utf-8")
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, 8, False, False)
        if n != 1:
            raise TokenLayoutError(f"{text!r} is not a single token in the GGUF vocabulary")
        return int(buf[0])

    def vocab_entry(self, token_id: int) -> tuple[str, str]:
        """``(text, kind)`` of a GGUF vocabulary entry as llama.cpp sees it; ``kind`` is
        ``"control"``, ``"user_defined"``, ``"normal"`` or ``"other"``."""
        self.load()
        raw = self._llama.llama_vocab_get_text(self._vocab, int(token_id))
        attr = int(self._llama.llama_vocab_get_attr(self._vocab, int(token_id)))
        kinds = (
            (self._llama.LLAMA_TOKEN_ATTR_CONTROL, "control"),
            (self._llama.LLAMA_TOKEN_ATTR_USER_DEFINED, "user_defined"),
            (self._llama.LLAMA_TOKEN_ATTR_NORMAL, "normal"),
        )
        kind = next((name for bit, name in kinds if attr & bit), "other")
        return (raw or b"").decode("utf-8", "replace"), kind

    def tokenize(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` with llama.cpp's tokenizer (the GGUF vocabulary)."""
        self.load()
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._llama.llama_token * cap)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, cap, False, parse_special)
        if n < 0:
            raise GenerationError(f"llama.cpp tokenization needs {-n} tokens")
        return [int(buf[i]) for i in range(n)]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` from the GGUF vocabulary (control tokens and image ids dropped)."""
        self.load()
        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for i in ids:
            if IMAGE_TOKEN_OFFSET <= int(i) < VOCAB:
                continue
            n = self._llama.llama_token_to_piece(self._vocab, int(i), buf, 256, 0, False)
            out += buf.raw[: max(n, 0)]
        return out.decode("utf-8", "replace")

    def _decode_text(self, ids: list[int]) -> str:
        if self._tokenizer is not None:
            return str(self._tokenizer.decode(ids, skip_special_tokens=True)).strip()
        return self.detokenize(ids).strip()

    # -- generation -------------------------------------------------------------------------

    def _validate(self, req: GenerationRequest) -> str | None:
        try:
            req.validate()
        except GenerationError as exc:
            return str(exc)
        new = CODES_PER_IMAGE + 2 if req.mode == "image" else req.max_new_tokens
        limit = min(self.n_ctx, self._max_pos)
        if len(req.prompt_ids) + new > limit:
            return f"prompt ({len(req.prompt_ids)}) + new tokens ({new}) exceed {limit} positions"
        return None

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run requests, up to ``max_batch`` at a time as parallel sequences.

        Invalid requests get a ``stop_reason="error"`` result; a failing batch fails only its
        own requests. Greedy results do not depend on what else is in the batch (up to
        floating-point summation order of batched matrix products).
        """
        self.load()
        results: list[GenerationResult | None] = [None] * len(requests)
        with self._lock:
            runnable: list[int] = []
            for i, req in enumerate(requests):
                self._counters["requests"] += 1
                err = self._validate(req)
                if err is not None:
                    self._counters["errors"] += 1
                    results[i] = error_result(req, err)
                else:
                    runnable.append(i)
            for k in range(0, len(runnable), self.max_batch):
                chunk = runnable[k : k + self.max_batch]
                try:
                    outs = self._run([(j, requests[j]) for j in chunk])
                except (GenerationError, RuntimeError, ValueError) as exc:
                    log.exception("llama.cpp generation failed")
                    outs = [error_result(requests[j], f"generation failed: {exc}") for j in chunk]
                    self._counters["errors"] += len(chunk)
                for j, res in zip(chunk, outs, strict=True):
                    results[j] = res
                    self._counters["new_tokens"] += res.new_tokens
        return [r for r in results if r is not None]

    def _decode_batch(self, items: list[tuple[int, int, int, bool]], ctx: Any = None) -> None:
        """One ``llama_decode`` on ``ctx`` (default: the decoding context): items are
        (token, position, sequence, wants_logits)."""
        b = self._batch
        for n, (tok, pos, seq, want) in enumerate(items):
            b.token[n] = tok
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq
            b.logits[n] = 1 if want else 0
        b.n_tokens = len(items)
        rc = self._llama.llama_decode(ctx or self._ctx, b)
        if rc != 0:
            raise GenerationError(f"llama_decode failed with code {rc}")

    def _logits_row(self, index: int, ctx: Any = None) -> np.ndarray:
        ptr = self._llama.llama_get_logits_ith(ctx or self._ctx, index)
        if not ptr:
            raise GenerationError(f"llama.cpp returned no logits for batch row {index}")
        return np.ctypeslib.as_array(ptr, shape=(VOCAB,)).copy()

    def _next_token(self, s: _Seq) -> int:
        assert s.logits is not None
        logits = s.logits
        if s.req.mode == "image":
            masked = np.full_like(logits, -np.inf)
            masked[IMAGE_TOKEN_OFFSET:VOCAB] = logits[IMAGE_TOKEN_OFFSET:VOCAB]
        else:
            masked = logits
            masked[IMAGE_TOKEN_OFFSET:] = -np.inf
        r = s.req
        return sample_next(
            masked,
            greedy=r.greedy,
            rng=s.rng,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
        )

    def step_seconds(
        self, sizes: Sequence[int], *, rounds: int = 3, prompt: Sequence[int] | None = None
    ) -> dict[int, float]:
        """Seconds of one decode step of each of ``sizes`` tokens after ``prompt`` (default:
        64 random text ids), logits of every row read as a speculative step does: the least
        of ``rounds`` (other work on the machine only adds time), the sizes taking turns. A
        one-token step is timed as the third of three in a row, as in plain decoding, where
        llama.cpp reuses the previous step's graph and caches are warm. Clears the cache.
        """
        if self._ctx is None:
            raise GenerationError("load() the model first")
        if not sizes or min(sizes) < 1 or max(sizes) > self.n_batch:
            raise ValueError(f"step sizes must be in 1..n_batch ({self.n_batch}): {sizes}")
        if prompt is None:
            n = max(1, min(64, self.n_ctx - max(sizes) - 1))
            prompt = [int(t) for t in np.random.default_rng(0).integers(1, IMAGE_TOKEN_OFFSET, n)]
        ids = [int(t) for t in prompt]
        start = len(ids)
        if start == 0:
            raise ValueError("the prompt before the measured steps is empty")
        if start + max(sizes) > self.n_ctx:
            raise ValueError(f"prompt ({start}) + step ({max(sizes)}) > n_ctx ({self.n_ctx})")
        mem = self._llama.llama_get_memory(self._ctx)
        times: dict[int, list[float]] = {int(n): [] for n in sizes}

        def step(n: int) -> float:
            t0 = time.perf_counter()
            self._decode_batch([(ids[i % start], start + i, 0, True) for i in range(n)])
            for i in range(n):
                self._logits_row(i)
            dt = time.perf_counter() - t0
            if not self._llama.llama_memory_seq_rm(mem, 0, start, -1):
                raise GenerationError("could not drop the measured step's K/V")
            return dt

        try:
            self._clear_cache()
            for lo in range(0, start, self.n_batch):
                chunk = ids[lo : lo + self.n_batch]
                self._decode_batch([(t, lo + i, 0, False) for i, t in enumerate(chunk)])
            for r in range(rounds + 1):  # the first round warms up
                for n in times:
                    if n == 1:
                        step(1)
                        step(1)
                    dt = step(n)
                    if r:
                        times[n].append(dt)
        finally:
            self._clear_cache()
        return {n: min(v) for n, v in times.items()}

    def measure_step_costs(self, *, rounds: int = 3) -> list[float]:
        """Seconds of a decode step of 1 to ``speculative + 1`` tokens relative to one token
        (:meth:`step_seconds`), made non-decreasing: what the drafter sizes proposals by.

        With ``speculative_batch`` (default ``max_batch``) > 1 a step holds every running
        sequence's token and proposals, so the sizes go on up to 9 (or
        ``speculative_batch x (speculative + 1)``, the longest step, when fewer): the
        patch's kernel multiplies 2 to 8 rows, tinyBLAS 9 and more, and the drafter prices
        still longer steps by the last difference, 8 to 9 rows.
        Speed does not depend on the weights' values, so these are the trained model's
        costs on this machine too.
        """
        n_max = max(self.speculative, 1) + 1
        if self.speculative_batch > 1:
            n_max = max(n_max, min(self.speculative_batch * n_max, 9))
        secs = self.step_seconds(range(1, n_max + 1), rounds=rounds)
        costs, running = [1.0], 1.0
        for n in range(2, n_max + 1):
            running = max(running, secs[n] / secs[1])
            costs.append(round(running, 3))
        log.info("speculation: step costs of 1..%d tokens %s", n_max, costs)
        return costs

    def clear_cache(self) -> None:
        """Forget every sequence's cached K/V: the next prompts are prefilled in full."""
        if self._ctx is None:
            return
        with self._lock:
            self._clear_cache()

    def _clear_cache(self) -> None:
        for ctx in (self._ctx, self._pctx):
            if ctx:
                self._llama.llama_memory_clear(self._llama.llama_get_memory(ctx), True)
        self._slot_tokens = [[] for _ in range(self.max_batch)]

    def _copy_sequence(self, slot: int) -> None:
        """Move sequence ``slot``'s K/V from the prefill context to the decoding one."""
        llama = self._llama
        size = int(llama.llama_state_seq_get_size(self._pctx, slot))
        if self._state_buf.size < size:
            self._state_buf = np.empty(size, dtype=np.uint8)
        ptr = self._state_buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        written = int(llama.llama_state_seq_get_data(self._pctx, ptr, size, slot))
        # set_data replaces the sequence in this llama.cpp; emptying it first does not
        # depend on that
        llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), slot, -1, -1)
        if written == 0 or int(llama.llama_state_seq_set_data(self._ctx, ptr, written, slot)) == 0:
            raise GenerationError(f"copying sequence {slot}'s K/V to the decoding context failed")

    def _assign_slots(self, seqs: list[_Seq]) -> None:
        """Give each sequence the free slot whose cached tokens share its longest prefix,
        and drop from that slot's KV cache everything after the shared prefix."""
        llama = self._llama
        mem = llama.llama_get_memory(self._pctx or self._ctx)
        free = list(range(self.max_batch))
        for s in seqs:
            # at least the last prompt token is evaluated again: its logits start decoding
            scored = [
                (min(common_prefix(self._slot_tokens[k], s.prompt), len(s.prompt) - 1), k)
                for k in free
            ]
            keep, slot = max(scored, key=lambda x: (x[0], -x[1]))
            free.remove(slot)
            if not llama.llama_memory_seq_rm(mem, slot, keep, -1):
                llama.llama_memory_seq_rm(mem, slot, -1, -1)
                keep = 0
            s.slot, s.reused = slot, keep
            self._counters["prompt_tokens"] += len(s.prompt)
            self._counters["prompt_tokens_reused"] += keep

    def _run(self, batch: list[tuple[int, GenerationRequest]]) -> list[GenerationResult]:
        seqs: list[_Seq] = []
        for _, req in batch:
            prompt = [int(t) for t in req.prompt_ids]
            if req.mode == "image" and prompt[-1] != self._open_id:
                assert self._open_id is not None
                prompt.append(self._open_id)
            rng = None if req.greedy else np.random.default_rng(req.seed)
            max_new = CODES_PER_IMAGE + 1 if req.mode == "image" else req.max_new_tokens
            s = _Seq(req=req, prompt=prompt, rng=rng, max_new=max_new)
            if self._drafter is not None and req.greedy and req.mode == "text":
                s.index = self._drafter.sequence(prompt)
            seqs.append(s)
        try:
            return self._run_seqs(seqs)
        except BaseException:
            # a failed llama_decode leaves the cache in an unknown state: start clean
            self._clear_cache()
            raise

    def _run_seqs(self, seqs: list[_Seq]) -> list[GenerationResult]:
        if not self.prefix_cache:
            self._clear_cache()
        self._assign_slots(seqs)
        t0 = time.perf_counter()
        # prefill what is not cached: pack the prompts' remaining tokens of all sequences
        # into n_batch-token decode calls
        pending = [
            (s.prompt[p], p, s.slot, p == len(s.prompt) - 1)
            for s in seqs
            for p in range(s.reused, len(s.prompt))
        ]
        by_slot = {s.slot: s for s in seqs}
        pctx = self._pctx or self._ctx
        for lo in range(0, len(pending), self.n_batch):
            items = pending[lo : lo + self.n_batch]
            self._decode_batch(items, pctx)
            for row, (_, _, slot, want) in enumerate(items):
                if want:
                    by_slot[slot].logits = self._logits_row(row, pctx)
        for s in seqs:
            self._slot_tokens[s.slot] = list(s.prompt)
            if self._pctx is not None:
                self._copy_sequence(s.slot)
        t1 = time.perf_counter()

        active = list(seqs)
        while active:
            going: list[tuple[_Seq, int]] = []  # the sequences that go on, their token
            for s in active:
                tok = self._next_token(s)
                if s.req.mode == "text" and tok in STOP_IDS:
                    s.stop = "end" if tok == END_ID else "eos"
                    continue
                s.out.append(tok)
                if s.req.mode == "image" and len(s.out) == CODES_PER_IMAGE:
                    assert self._close_id is not None
                    s.out.append(self._close_id)  # forced: no need to run the model for it
                if len(s.out) >= s.max_new:
                    s.stop = "image_complete" if s.req.mode == "image" else "max_new_tokens"
                    continue
                going.append((s, tok))
            drafted = list(zip(going, self._propose(going), strict=True))
            fillers = self._filler_rows(drafted)
            # the step's rows in slot order, fillers included (llama.cpp's passes take
            # consecutive sequence ids in the order fed); the sequences keep their order
            # (the drafter's ties depend on it)
            rows: dict[int, list[tuple[int, int, int, bool]]] = {}
            for (s, tok), drafts in drafted:
                pos = len(s.prompt) + len(s.out) - 1
                rows[s.slot] = [(tok, pos, s.slot, True)]
                rows[s.slot] += [(d, pos + 1 + i, s.slot, True) for i, d in enumerate(drafts)]
            for f in fillers:
                rows.setdefault(f[2], []).append(f)
            step: list[tuple[int, int, int, bool]] = []
            first_row: dict[int, int] = {}  # each slot's first row in the step
            for slot in sorted(rows):
                first_row[slot] = len(step)
                step += rows[slot]
            active = []
            if drafted:
                self._decode_batch(step)
                self._counters["decode_steps"] += 1
                if fillers:
                    self._counters["filler_rows"] += len(fillers)
                    mem = self._llama.llama_get_memory(self._ctx)
                    for slot in {f[2] for f in fillers}:
                        first = min(f[1] for f in fillers if f[2] == slot)
                        if not self._llama.llama_memory_seq_rm(mem, slot, first, -1):
                            raise GenerationError(f"could not drop sequence {slot}'s filler rows")
                for (s, _), drafts in drafted:
                    row = first_row[s.slot]
                    if self._verify(s, row, step[row], drafts):
                        active.append(s)
        t2 = time.perf_counter()
        if self._drafter is not None:
            for s in seqs:
                if s.index is not None:
                    stop = {"end": [END_ID], "eos": [EOS_ID]}.get(s.stop or "", [])
                    self._drafter.remember(s.prompt, s.out + stop)
        return [self._result(s, t1 - t0, t2 - t1) for s in seqs]

    def _filler_rows(
        self, drafted: list[tuple[tuple[_Seq, int], list[int]]]
    ) -> list[tuple[int, int, int, bool]]:
        """Rows for the idle sequences between the running ones of a batch step.

        With a KV stream per sequence, ``llama_decode`` splits a step into passes over
        the weights that each hold consecutive sequence ids with as many rows each
        (``llama_batch_allocr::split_equal``): sequences 0 and 2 take two passes, sequences
        0 to 3 one. So the step's rows go in slot order (the caller) and, when every
        running sequence feeds as many rows, each idle slot between them gets as many
        throw-away rows after its cached ones (no logits; their K/V dropped after the step,
        so its cache is unchanged), fed in its place among the slots. At full size on 2
        cores a step of sequences 0 and 2 cost 2.01x a one-sequence step, and 1.58x with
        slot 1 filled (``benchmarks/bench_batch_layout.py``).
        """
        fillers: list[tuple[int, int, int, bool]] = []
        if len(drafted) < 2:
            return fillers
        rows = {len(drafts) for _, drafts in drafted}
        slots = {s.slot for (s, _), _ in drafted}
        if len(rows) != 1 or len(slots) == max(slots) - min(slots) + 1:
            return fillers
        n = 1 + rows.pop()
        mem = self._llama.llama_get_memory(self._ctx)
        tok = drafted[0][0][1]
        for slot in range(min(slots), max(slots)):
            if slot in slots:
                continue
            start = int(self._llama.llama_memory_seq_pos_max(mem, slot)) + 1
            if start + n > self.n_ctx:
                return []  # no room in that stream: the step takes two passes instead
            fillers += [(tok, start + i, slot, False) for i in range(n)]
        return fillers

    def _propose(self, going: list[tuple[_Seq, int]]) -> list[list[int]]:
        """Speculation's proposals to check after each sequence's latest token (empty when
        off or no match), sized together for the step they share
        (:meth:`~models.backends.speculative.NgramDrafter.plan`).

        :func:`models.backends.speculative.replay_batch` walks this loop (here,
        :meth:`_verify` and :meth:`_run_seqs`) without the model: keep the two in step."""
        out: list[list[int]] = [[] for _ in going]
        if self._drafter is None:
            return out
        seqs: list[tuple[SequenceIndex, int | None]] = []
        drafting: list[int] = []
        for i, (s, tok) in enumerate(going):
            if s.index is not None:
                s.index.extend([tok])
                drafting.append(i)
                # never past max_new (positions stay inside the validated context)
                seqs.append((s.index, s.max_new - len(s.out)))
        plans = self._drafter.plan(seqs, other_rows=len(going) - len(seqs))
        for i, drafts in zip(drafting, plans, strict=True):
            out[i] = drafts
            self._counters["draft_tokens"] += len(drafts)
        return out

    def _verify(
        self, s: _Seq, row: int, first: tuple[int, int, int, bool], drafts: list[int]
    ) -> bool:
        """Take sequence ``s``'s logits from the step's rows from ``row`` on; keep the
        proposals the model's argmax agrees with, drop the others' K/V. Returns whether
        ``s`` goes on."""
        tok, pos = first[0], first[1]
        kept = [tok]
        s.logits = self._logits_row(row)
        for i, d in enumerate(drafts):
            if self._next_token(s) != d:
                break
            if d in STOP_IDS:  # the model ends here, as it would have one step later
                s.stop = "end" if d == END_ID else "eos"
                break
            s.out.append(d)
            kept.append(d)
            assert s.index is not None
            s.index.extend([d])
            s.logits = self._logits_row(row + 1 + i)
            if len(s.out) >= s.max_new:
                s.stop = "max_new_tokens"
                break
        self._counters["draft_tokens_accepted"] += len(kept) - 1
        if len(kept) <= len(drafts):
            # the rejected proposals' K/V: the next step writes those positions again
            mem = self._llama.llama_get_memory(self._ctx)
            if not self._llama.llama_memory_seq_rm(mem, s.slot, pos + len(kept), -1):
                raise GenerationError(f"could not drop rejected tokens of sequence {s.slot}")
        if self._pctx is None:
            self._slot_tokens[s.slot] += kept  # now in its K/V
        return s.stop is None

    def _result(self, s: _Seq, prefill: float, decode: float) -> GenerationResult:
        if s.req.mode == "image":
            codes = s.out[:CODES_PER_IMAGE]
            if len(codes) != CODES_PER_IMAGE or not all(
                IMAGE_TOKEN_OFFSET <= t < VOCAB for t in codes
            ):
                raise GenerationError(f"constrained decoding produced {len(codes)} image ids")
            return GenerationResult(
                token_ids=list(s.out),
                text=None,
                image_codes=[id_to_code(t) for t in codes],
                prompt_tokens=len(s.prompt),
                new_tokens=len(s.out),
                prefill_s=prefill,
                decode_s=decode,
                stop_reason="image_complete",
            )
        return GenerationResult(
            token_ids=list(s.out),
            text=self._decode_text(s.out),
            image_codes=None,
            prompt_tokens=len(s.prompt),
            new_tokens=len(s.out),
            prefill_s=prefill,
            decode_s=decode,
            stop_reason=s.stop or "max_new_tokens",
        )

    def next_token_logits(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Logits (float32 [51305]) of the token after ``prompt_ids`` (for agreement checks),
        from the ``quant`` file (not the prefill file)."""
        self.load()
        ids = [int(t) for t in prompt_ids]
        if not ids or len(ids) > min(self.n_ctx, self._max_pos):
            raise GenerationError(f"prompt length {len(ids)} outside 1..{self.n_ctx}")
        with self._lock:
            self._clear_cache()
            logits: np.ndarray | None = None
            for lo in range(0, len(ids), self.n_batch):
                chunk = ids[lo : lo + self.n_batch]
                items = [(t, lo + p, 0, lo + p == len(ids) - 1) for p, t in enumerate(chunk)]
                self._decode_batch(items)
                if items[-1][3]:
                    logits = self._logits_row(len(items) - 1)
        assert logits is not None
        return logits
