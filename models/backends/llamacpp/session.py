"""Loading: which converted GGUF file(s) to use, their llama.cpp contexts, and the session
that holds them with the batch, the slots and the vocabulary while the backend is loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from models.backends.base import GenerationError
from models.backends.llamacpp.library import meta_str
from models.backends.llamacpp.slots import BatchDecoder, KvCopier, SlotCache
from models.backends.llamacpp.vocab import GgufVocab
from models.layout import VOCAB, TokenLayoutError

__all__ = [
    "KV_TYPES",
    "QUANT_PREFERENCE",
    "SHAPE_KEYS",
    "ContextSpec",
    "LoadedFile",
    "Session",
    "check_same_model",
    "find_tokenizer_dir",
    "open_file",
    "open_session",
    "resolve_gguf",
]

QUANT_PREFERENCE: tuple[str, ...] = ("q8_0", "f16", "bf16", "q4_k_m", "f32")
"""Which converted file a bundle uses when no quantisation is asked for."""
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
"""KV-cache precisions and their ``ggml_type`` values."""
SHAPE_KEYS = (
    "gptneox.context_length",
    "gptneox.embedding_length",
    "gptneox.block_count",
    "gptneox.attention.head_count",
    "gptneox.rope.dimension_count",
)
"""GGUF keys on which a prefill file and the decode file must agree."""


def resolve_gguf(model_path: Path, quant: str | None = None) -> tuple[Path, str | None]:
    """Find the GGUF file to load.

    Parameters
    ----------
    model_path
        A ``.gguf`` file, a bundle root or a bundle's ``llm/`` folder; a bundle's manifest
        lists its converted files under ``engines.llamacpp``.
    quant
        The converted file wanted; default: the first of :data:`QUANT_PREFERENCE` present.

    Returns
    -------
    (path, quant)
        ``quant`` is ``None`` for a bare file.

    Raises
    ------
    GenerationError
        An unreadable manifest, a bundle without (that) converted file, or a path that is
        neither a file nor a bundle.
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


def find_tokenizer_dir(model_path: Path) -> Path | None:
    """The bundle's ``llm/`` folder holding ``tokenizer.json`` next to ``model_path``, if
    any."""
    cands = [model_path, model_path / "llm", model_path.parent / "llm", model_path.parent]
    if model_path.is_file():
        cands = [model_path.parent, model_path.parent.parent / "llm", model_path.parents[2] / "llm"]
    return next((c for c in cands if (c / "tokenizer.json").is_file()), None)


@dataclass(frozen=True, kw_only=True)
class ContextSpec:
    """How a llama.cpp context is created (one per loaded file).

    Parameters
    ----------
    n_ctx
        Positions per sequence; the context holds ``n_ctx x max_batch``.
    n_batch
        Most tokens per ``llama_decode`` call (also the micro-batch).
    max_batch
        Sequences, each with its own KV stream (``kv_unified`` off).
    threads
        Threads for decode and prefill.
    kv_type
        ``"auto"`` (F32 for an F32 file, else F16) or a key of :data:`KV_TYPES`.
    flash_attn
        llama.cpp's flash attention.
    device
        ``"cpu"``; anything else offloads every layer and the KV cache.
    """

    n_ctx: int
    n_batch: int
    max_batch: int
    threads: int
    kv_type: str
    flash_attn: bool
    device: str


@dataclass(frozen=True)
class LoadedFile:
    """A GGUF file loaded by llama.cpp, and its context.

    ``model`` and ``ctx`` are llama.cpp handles, freed by :meth:`free`; ``meta`` holds the
    layout keys, :data:`SHAPE_KEYS` and ``llmcxr.quant``; ``kv_type`` is the resolved
    KV-cache precision.
    """

    path: Path
    model: Any
    ctx: Any
    meta: dict[str, str | None]
    kv_type: str

    def free(self, llama_cpp: Any) -> None:
        """Free the context and the model (once; the handles must not be used after)."""
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def open_file(llama_cpp: Any, path: Path, spec: ContextSpec, *, quant: str | None) -> LoadedFile:
    """Load ``path``, check its vocabulary layout, and create its context.

    Parameters
    ----------
    llama_cpp
        The initialised ``llama_cpp`` module.
    path
        A GGUF file written by :mod:`models.gguf_convert`.
    spec
        The context to create; ``kv_type="auto"`` is resolved from ``quant`` or the file's
        ``llmcxr.quant``.
    quant
        The file's quantisation when known from the bundle manifest.

    Raises
    ------
    GenerationError
        A missing or unloadable file, or no context.
    TokenLayoutError
        The file's vocabulary or layout keys are not LLM-CXR's.
    """
    from models.gguf_convert import LAYOUT_KEYS, check_layout_metadata

    if not path.is_file():
        raise GenerationError(f"llama.cpp model file {path} is missing")
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0 if spec.device == "cpu" else -1
    model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
    if not model:
        raise GenerationError(f"llama.cpp could not load {path}")
    try:
        keys = [*LAYOUT_KEYS, *SHAPE_KEYS, "llmcxr.quant"]
        meta = {k: meta_str(llama_cpp, model, k) for k in keys}
        check_layout_metadata(meta, where=str(path))
        n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
        if n_vocab != VOCAB:
            raise TokenLayoutError(f"{path}: GGUF vocabulary has {n_vocab} entries, need {VOCAB}")
        kv_type = spec.kv_type
        if kv_type == "auto":
            kv_type = "f32" if (quant or meta.get("llmcxr.quant")) == "f32" else "f16"
        ctx = llama_cpp.llama_init_from_model(model, _context_params(llama_cpp, spec, kv_type))
        if not ctx:
            raise GenerationError(f"llama.cpp could not create a context for {path}")
    except BaseException:
        llama_cpp.llama_model_free(model)
        raise
    return LoadedFile(path=path, model=model, ctx=ctx, meta=meta, kv_type=kv_type)


def _context_params(llama_cpp: Any, spec: ContextSpec, kv_type: str) -> Any:
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = spec.n_ctx * spec.max_batch
    cparams.n_batch = spec.n_batch
    cparams.n_ubatch = spec.n_batch
    cparams.n_seq_max = spec.max_batch
    cparams.kv_unified = False
    cparams.n_threads = spec.threads
    cparams.n_threads_batch = spec.threads
    cparams.type_k = KV_TYPES[kv_type]
    cparams.type_v = KV_TYPES[kv_type]
    cparams.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if spec.flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    cparams.no_perf = True
    cparams.offload_kqv = spec.device != "cpu"
    return cparams


def check_same_model(prefill: LoadedFile, decode: LoadedFile) -> None:
    """Raise :class:`GenerationError` unless the two files agree on :data:`SHAPE_KEYS`
    (a prefill file's K/V must fit the decode file's context)."""
    for key in SHAPE_KEYS:
        if prefill.meta.get(key) != decode.meta.get(key):
            raise GenerationError(
                f"{prefill.path.name} and {decode.path.name} are not the same model: {key} "
                f"is {prefill.meta.get(key)!r} against {decode.meta.get(key)!r}"
            )


@dataclass
class Session:
    """What :func:`open_session` loaded: the decode file, the optional prefill file, and
    the objects that work on their contexts. Freed by :meth:`close`.

    ``quant`` is the decode file's quantisation (the bundle's name for it, else the file's
    ``llmcxr.quant``); ``slots`` describes the prefilling context (the prefill file's, else
    the decode file's); ``open_id``/``close_id`` are the ids of ``<`` and ``>``; ``max_pos`` is the
    model's context length; ``tokenizer`` is the bundle's
    :class:`~models.text.LLMCXRTokenizer` when one is next to the file (else ``None``:
    text comes from the GGUF vocabulary).
    """

    decode: LoadedFile
    prefill: LoadedFile | None
    quant: str | None
    batch: BatchDecoder
    slots: SlotCache
    kv: KvCopier
    vocab: GgufVocab
    tokenizer: Any
    open_id: int
    close_id: int
    max_pos: int

    @property
    def prefill_ctx(self) -> Any:
        """The context that computes the prompts."""
        return (self.prefill or self.decode).ctx

    def clear(self, llama_cpp: Any) -> None:
        """Forget every sequence's K/V in both contexts."""
        for f in (self.decode, self.prefill):
            if f is not None:
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(f.ctx), True)
        self.slots.forget()

    def close(self, llama_cpp: Any) -> None:
        """Free the batch, the contexts and the models (once)."""
        self.batch.close()
        for f in (self.decode, self.prefill):
            if f is not None:
                f.free(llama_cpp)


def open_session(
    llama_cpp: Any,
    model_dir: Path,
    spec: ContextSpec,
    *,
    quant: str | None,
    prefill_quant: str | None,
) -> Session:
    """Load the decode file (and the prefill file) of ``model_dir`` and their contexts.

    Parameters
    ----------
    llama_cpp
        The initialised ``llama_cpp`` module.
    model_dir
        A bundle root, its ``llm/`` folder or a ``.gguf`` file (:func:`resolve_gguf`).
    spec
        The contexts; the prefill file's takes the decode file's resolved KV type, so that
        its K/V can be copied over.
    quant
        The decode file's quantisation (default: :data:`QUANT_PREFERENCE`).
    prefill_quant
        Another converted file of the bundle that computes the prompts, or ``None``.

    Raises
    ------
    GenerationError
        A file is missing or unloadable, ``prefill_quant`` names the decode file or is used
        with a single file, or the two files are not the same model.
    TokenLayoutError
        A file's vocabulary is not LLM-CXR's.
    """
    path, quant = resolve_gguf(model_dir, quant)
    ppath: Path | None = None
    if prefill_quant is not None:
        if model_dir.is_file():
            raise GenerationError(
                "prefill_quant needs a model bundle holding both converted files, "
                f"not the single file {model_dir}"
            )
        ppath, _ = resolve_gguf(model_dir, prefill_quant)
        if ppath == path:
            raise GenerationError(f"prefill_quant {prefill_quant!r} is the decode file")
    opened: list[LoadedFile] = []
    try:
        decode = open_file(llama_cpp, path, spec, quant=quant)
        opened.append(decode)
        prefill = None
        if ppath is not None:
            prefill = open_file(llama_cpp, ppath, replace(spec, kv_type=decode.kv_type), quant=None)
            opened.append(prefill)
            check_same_model(prefill, decode)
        vocab = GgufVocab(llama_cpp, decode.model)
        tokenizer, open_id, close_id = _tokenizer(model_dir, vocab)
    except BaseException:
        for f in opened:
            f.free(llama_cpp)
        raise
    return Session(
        decode=decode,
        prefill=prefill,
        quant=quant or decode.meta.get("llmcxr.quant"),
        batch=BatchDecoder(llama_cpp, spec.n_batch),
        slots=SlotCache(llama_cpp, (prefill or decode).ctx, spec.max_batch),
        kv=KvCopier(llama_cpp),
        vocab=vocab,
        tokenizer=tokenizer,
        open_id=open_id,
        close_id=close_id,
        max_pos=int(decode.meta["gptneox.context_length"] or 2048),
    )


def _tokenizer(model_dir: Path, vocab: GgufVocab) -> tuple[Any, int, int]:
    """The bundle's tokenizer (or ``None``) and the ids of ``<`` and ``>``."""
    tok_dir = find_tokenizer_dir(model_dir)
    if tok_dir is None:
        return None, vocab.single_token("<"), vocab.single_token(">")
    from models.text import LLMCXRTokenizer

    tokenizer = LLMCXRTokenizer.from_dir(tok_dir)
    return tokenizer, tokenizer.image_open_id, tokenizer.image_close_id
