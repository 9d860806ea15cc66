"""Convert an LLM-CXR bundle's GPT-NeoX LLM to GGUF for llama.cpp (the CPU engine).

The file is written with the ``gguf`` package for llama.cpp's ``gptneox`` architecture:

- tensors renamed with :class:`gguf.TensorNameMap` (``token_embd``, ``blk.N.attn_qkv``, ...,
  ``output`` kept separate: LLM-CXR's embeddings are untied);
- the fused QKV projection reordered from Hugging Face's per-head ``[q k v]`` interleaving to
  the ``[Q | K | V]`` blocks that llama.cpp's GPT-NeoX graph slices;
- hyper-parameters: context length, rotary dimensions (``partial_rotary_factor * head_dim``),
  rotary base, parallel residual, layer-norm epsilon;
- a vocabulary of exactly 51,305 entries: the 50,281 text entries of the bundle's
  ``tokenizer.json`` (GPT-2 style byte-level BPE: ``tokenizer.ggml.model = "gpt2"``, tokens,
  types, merges) followed by 1,024 placeholders ``<img_0000>`` .. ``<img_1023>`` of type
  USER_DEFINED, so image code ``c`` keeps id ``50281 + c`` and a llama.cpp server reads and
  writes it as that text (the node itself passes ids; see :mod:`models.backends.remote`).

Quantisations: ``f32``, ``f16`` and ``bf16`` are written directly; ``q8_0`` is quantised with
``gguf.quants`` from the fp32 weights (bit-exact with ggml's reference quantiser); ``q4_k_m``
goes through llama.cpp's own quantiser (``llama_model_quantize``) from an F16 intermediate.
Matrices whose row length is not a multiple of the quantisation block stay F16, and 1-D
tensors (norms, biases) stay F32, as llama.cpp does.

This module holds the conversion entry points and the bundle manifest records; the layout
a file carries is :mod:`models.gguf_layout` and the tensor writer :mod:`models.gguf_writer`,
whose public names are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.gguf_layout import (
    ARCH,
    GGUF_KEY_PREFIX,
    LAYOUT_KEYS,
    ConversionError,
    GGUFVocab,
    NeoXShape,
    build_gguf_vocab,
    check_gguf_layout,
    check_layout_metadata,
    gguf_tensor_types,
    image_token_text,
    read_gguf_metadata,
)
from models.gguf_writer import (
    QUANTS,
    Quant,
    TensorPlan,
    TensorSource,
    add_neox_metadata,
    choose_qtype,
    encode_tensor,
    file_type_of,
    neox_tensor_plans,
    write_gguf,
)

__all__ = [
    "ARCH",
    "ENGINE",
    "ENGINES_DIR",
    "GGUF_KEY_PREFIX",
    "LAYOUT_KEYS",
    "QUANTS",
    "ConversionError",
    "ConversionResult",
    "GGUFVocab",
    "NeoXShape",
    "Quant",
    "TensorPlan",
    "add_engine_to_manifest",
    "add_neox_metadata",
    "build_gguf_vocab",
    "bundle_engine_files",
    "check_gguf_layout",
    "check_layout_metadata",
    "choose_qtype",
    "convert_bundle",
    "convert_bundle_llm",
    "encode_tensor",
    "engine_rel_path",
    "file_type_of",
    "gguf_tensor_types",
    "image_token_text",
    "llama_quantize",
    "neox_tensor_plans",
    "read_gguf_metadata",
    "write_gguf",
]

ENGINE = "llamacpp"
ENGINES_DIR = "engines"


@dataclass(frozen=True, kw_only=True)
class ConversionResult:
    """What :func:`convert_bundle_llm` wrote."""

    path: Path
    quant: str
    sha256: str
    size: int
    seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)

    def to_manifest(self, rel_path: str) -> dict[str, Any]:
        """The ``engines.llamacpp.<quant>`` manifest entry."""
        return {
            "path": rel_path,
            "format": "gguf",
            "arch": ARCH,
            "quant": self.quant,
            "sha256": self.sha256,
            "size": self.size,
            "tensor_types": self.tensor_types,
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def llama_quantize(src: Path, dst: Path, *, quant: str, threads: int | None = None) -> None:
    """Quantise a GGUF file with llama.cpp's quantiser (``llama_model_quantize``)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConversionError(
            f"quant {quant!r} needs llama-cpp-python: pip install 'llm-cxr-node[llamacpp]'"
        ) from exc
    ftype = {
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    }
    if quant not in ftype:
        raise ConversionError(f"llama.cpp quantisation to {quant!r} is not offered")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype[quant]
    params.nthread = int(threads or 0)
    rc = llama_cpp.llama_model_quantize(str(src).encode("utf-8"), str(dst).encode("utf-8"), params)
    if rc != 0:
        raise ConversionError(f"llama_model_quantize({src} -> {quant}) failed with code {rc}")


def convert_bundle_llm(
    llm_dir: Path | str,
    out_path: Path | str,
    *,
    quant: Quant = "f16",
    tokenizer_json: Path | None = None,
    model_name: str = "LLM-CXR",
    threads: int | None = None,
) -> ConversionResult:
    """Convert a Hugging Face GPT-NeoX folder in the LLM-CXR layout to one GGUF file.

    Parameters
    ----------
    llm_dir
        The bundle's ``llm/`` folder: ``config.json``, ``*.safetensors`` or
        ``pytorch_model*.bin``, ``tokenizer.json`` (50,281 text entries).
    out_path
        The ``.gguf`` to write (atomically; overwritten if present).
    quant
        ``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"`` or ``"q4_k_m"``.
    tokenizer_json
        Tokenizer to take the vocabulary from; default ``llm_dir/tokenizer.json``.
    model_name
        ``general.name`` of the file.
    threads
        Threads for llama.cpp's quantiser (``q4_k_m``); default: all cores.

    Returns
    -------
    ConversionResult
        Path, sha256, size, seconds and the count of tensors per GGML type.

    Raises
    ------
    ConversionError, TokenLayoutError
        Naming the file, field or tensor that does not fit the LLM-CXR layout.
    """
    t0 = time.perf_counter()
    if quant not in QUANTS:
        raise ConversionError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    llm_dir = Path(llm_dir)
    out_path = Path(out_path)
    shape = _read_neox_shape(llm_dir / "config.json")
    vocab = build_gguf_vocab(tokenizer_json or llm_dir / "tokenizer.json")
    source = TensorSource(llm_dir)
    write_quant = "f16" if quant == "q4_k_m" else quant
    plans = neox_tensor_plans(source, shape, write_quant)

    def metadata(writer: Any) -> None:
        add_neox_metadata(writer, shape=shape, vocab=vocab, quant=quant, name=model_name)

    if quant == "q4_k_m":
        _write_through_llama_quantize(out_path, metadata, plans, quant=quant, threads=threads)
        types = gguf_tensor_types(out_path)  # llama.cpp chose the per-tensor types
    else:
        write_gguf(out_path, metadata=metadata, plans=plans)
        types = {}
        for p in plans:
            types[p.qtype.name] = types.get(p.qtype.name, 0) + 1
    return ConversionResult(
        path=out_path,
        quant=quant,
        sha256=_sha256(out_path),
        size=out_path.stat().st_size,
        seconds=time.perf_counter() - t0,
        tensor_types=types,
    )


def _read_neox_shape(cfg_path: Path) -> NeoXShape:
    """The :class:`NeoXShape` of a ``config.json``; unreadable files are a ConversionError."""
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{cfg_path}: cannot read config: {exc}") from exc
    return NeoXShape.from_config(cfg)


def _write_through_llama_quantize(
    out_path: Path,
    metadata: Callable[[Any], None],
    plans: Sequence[TensorPlan],
    *,
    quant: str,
    threads: int | None,
) -> None:
    """Write an F16 intermediate beside ``out_path``, quantise it with llama.cpp into
    ``out_path`` (atomically), and remove the intermediate whatever happens."""
    inter = out_path.with_name(out_path.name + ".f16-intermediate")
    try:
        write_gguf(inter, metadata=metadata, plans=plans)
        tmp = out_path.with_name(out_path.name + ".partial")
        llama_quantize(inter, tmp, quant=quant, threads=threads)
        os.replace(tmp, out_path)
    finally:
        inter.unlink(missing_ok=True)


def engine_rel_path(quant: str, engine: str = ENGINE) -> str:
    """Where a converted model lives inside a bundle: ``engines/llamacpp/llm-<quant>.gguf``."""
    return f"{ENGINES_DIR}/{engine}/llm-{quant}.gguf"


def add_engine_to_manifest(
    bundle_dir: Path | str,
    *,
    engine: str = ENGINE,
    quant: str,
    path: Path | str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Record a converted model in ``manifest.json``: ``files`` (sha256, size) and ``engines``.

    Parameters
    ----------
    bundle_dir
        The bundle root (holding ``manifest.json``).
    engine
        Engine name (``"llamacpp"``).
    quant
        The quantisation of the file.
    path
        The converted file, inside the bundle (absolute or relative to ``bundle_dir``).
    extra
        More fields for the ``engines.<engine>.<quant>`` entry.

    Returns
    -------
    dict
        The new ``engines.<engine>.<quant>`` entry.
    """
    root = Path(bundle_dir)
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{manifest_path}: cannot read the bundle manifest: {exc}") from exc
    file = Path(path)
    file = file if file.is_absolute() else root / file
    try:
        rel = file.resolve().relative_to(root.resolve()).as_posix()
    except ValueError as exc:
        raise ConversionError(f"{file} is not inside the bundle {root}") from exc
    digest, size = _sha256(file), file.stat().st_size
    entry = {
        "path": rel,
        "format": "gguf",
        "arch": ARCH,
        "quant": quant,
        "sha256": digest,
        "size": size,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    manifest.setdefault("files", {})[rel] = {"sha256": digest, "size": size}
    manifest.setdefault("engines", {}).setdefault(engine, {})[quant] = entry
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    return entry


def convert_bundle(
    bundle_dir: Path | str, *, quant: Quant = "q8_0", threads: int | None = None
) -> ConversionResult:
    """Convert a bundle's LLM for llama.cpp and record it in the manifest (the CLI step).

    Writes ``engines/llamacpp/llm-<quant>.gguf`` inside the bundle, then
    :func:`add_engine_to_manifest`. ``model_name`` / ``model_version`` come from the manifest.
    """
    root = Path(bundle_dir)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    name = f"{manifest.get('model_name', 'LLM-CXR')} {manifest.get('model_version', '')}".strip()
    llm_dir = root / str(manifest.get("llm", {}).get("dir", "llm"))
    rel = engine_rel_path(quant)
    result = convert_bundle_llm(llm_dir, root / rel, quant=quant, model_name=name, threads=threads)
    add_engine_to_manifest(
        root,
        quant=quant,
        path=rel,
        extra={"tensor_types": result.tensor_types, "seconds": round(result.seconds, 2)},
    )
    return result


def bundle_engine_files(bundle_dir: Path | str, engine: str = ENGINE) -> dict[str, Path]:
    """``{quant: path}`` of the converted models a bundle's manifest lists for ``engine``."""
    root = Path(bundle_dir)
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    entries = manifest.get("engines", {}).get(engine, {})
    return {q: root / str(e["path"]) for q, e in entries.items() if isinstance(e, dict)}
