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
  CONTROL, so image code ``c`` keeps id ``50281 + c`` and no text ever tokenizes to an image id.

Quantisations: ``f32``, ``f16`` and ``bf16`` are written directly; ``q8_0`` is quantised with
``gguf.quants`` from the fp32 weights (bit-exact with ggml's reference quantiser); ``q4_k_m``
goes through llama.cpp's own quantiser (``llama_model_quantize``) from an F16 intermediate.
Matrices whose row length is not a multiple of the quantisation block stay F16, and 1-D
tensors (norms, biases) stay F32, as llama.cpp does.
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
from typing import Any, Literal, get_args

import numpy as np

from models.layout import (
    CODES_PER_IMAGE,
    END_ID,
    EOS_ID,
    IMAGE_TOKEN_OFFSET,
    N_IMAGE_CODES,
    TEXT_VOCAB,
    VOCAB,
    TokenLayoutError,
)

Quant = Literal["f32", "f16", "bf16", "q8_0", "q4_k_m"]
QUANTS: tuple[str, ...] = get_args(Quant)
ENGINE = "llamacpp"
ENGINES_DIR = "engines"
ARCH = "gptneox"
GGUF_KEY_PREFIX = "llmcxr."
# Buffers of older GPT-NeoX checkpoints that are not weights.
_SKIP_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


class ConversionError(ValueError):
    """The LLM folder cannot be converted (names the file, tensor or field at fault)."""


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConversionError(
            "the 'gguf' package is required for conversion: pip install 'llm-cxr-node[llamacpp]'"
        ) from exc
    return gguf


def image_token_text(code: int) -> str:
    """Placeholder text of image code ``code`` in the GGUF vocabulary (``<img_0042>``)."""
    if not 0 <= code < N_IMAGE_CODES:
        raise TokenLayoutError(f"image code {code} outside 0..{N_IMAGE_CODES - 1}")
    return f"<img_{code:04d}>"


@dataclass(frozen=True, kw_only=True)
class NeoXShape:
    """The GPT-NeoX hyper-parameters llama.cpp needs, read from ``config.json``."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    rotary_dims: int
    rope_theta: float
    layer_norm_eps: float
    parallel_residual: bool
    hidden_act: str
    tied: bool

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> NeoXShape:
        """Read a GPT-NeoX ``config.json`` (old ``rotary_pct`` or new ``rope_parameters``)."""
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            pct = float(rope.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
            theta = float(rope.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
            shape = cls(
                hidden=hidden,
                layers=int(cfg["num_hidden_layers"]),
                heads=heads,
                intermediate=int(cfg["intermediate_size"]),
                vocab=int(cfg["vocab_size"]),
                max_positions=int(cfg.get("max_position_embeddings", 2048)),
                rotary_dims=int(pct * (hidden // heads)),
                rope_theta=theta,
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
                parallel_residual=bool(cfg.get("use_parallel_residual", True)),
                hidden_act=str(cfg.get("hidden_act", "gelu")),
                tied=bool(cfg.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"config.json: missing or bad GPT-NeoX field: {exc}") from exc
        if cfg.get("model_type", "gpt_neox") != "gpt_neox":
            raise ConversionError(f"config.json: model_type {cfg.get('model_type')!r} != gpt_neox")
        if hidden % heads:
            raise ConversionError(f"config.json: hidden_size {hidden} not divisible by {heads}")
        if shape.vocab != VOCAB:
            raise TokenLayoutError(f"config.json: vocab_size {shape.vocab} != LLM-CXR's {VOCAB}")
        if shape.tied:
            raise TokenLayoutError("config.json: tie_word_embeddings is true; LLM-CXR's are untied")
        if not shape.hidden_act.startswith("gelu"):
            raise ConversionError(f"config.json: hidden_act {shape.hidden_act!r} is not GELU")
        return shape


@dataclass(frozen=True, kw_only=True)
class GGUFVocab:
    """The 51,305-entry vocabulary written to the GGUF file."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int = EOS_ID
    eos_id: int = EOS_ID
    eot_id: int = END_ID
    pad_id: int = EOS_ID

    def __post_init__(self) -> None:
        if len(self.tokens) != VOCAB or len(self.token_types) != VOCAB:
            raise TokenLayoutError(f"GGUF vocabulary has {len(self.tokens)} entries, need {VOCAB}")
        if len(set(self.tokens)) != VOCAB:
            raise TokenLayoutError("GGUF vocabulary has duplicate token strings")


def build_gguf_vocab(tokenizer_json: Path) -> GGUFVocab:
    """Lay out the GGUF vocabulary from a Hugging Face ``tokenizer.json``.

    Text ids 0..50280 come from the tokenizer (byte-level BPE strings as stored, added
    special tokens as CONTROL, other added tokens as USER_DEFINED raw text); ids
    50281..51304 are the image placeholders (CONTROL).

    Raises
    ------
    TokenLayoutError
        If the tokenizer is not byte-level BPE or its ids are not exactly 0..50280.
    """
    gguf = _gguf()
    try:
        data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        model = data["model"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ConversionError(f"{tokenizer_json}: not a tokenizers JSON file: {exc}") from exc
    if model.get("type") != "BPE":
        raise TokenLayoutError(f"{tokenizer_json}: model type {model.get('type')!r} is not BPE")
    by_id: dict[int, str] = {int(i): str(t) for t, i in model["vocab"].items()}
    types: dict[int, int] = dict.fromkeys(by_id, int(gguf.TokenType.NORMAL))
    for added in data.get("added_tokens", []):
        tid = int(added["id"])
        by_id[tid] = str(added["content"])
        special = bool(added.get("special", False))
        types[tid] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    if sorted(by_id) != list(range(TEXT_VOCAB)):
        raise TokenLayoutError(
            f"{tokenizer_json}: text ids are not exactly 0..{TEXT_VOCAB - 1} "
            f"({len(by_id)} entries, max id {max(by_id)})"
        )
    tokens = [by_id[i] for i in range(TEXT_VOCAB)]
    token_types = [types[i] for i in range(TEXT_VOCAB)]
    tokens += [image_token_text(c) for c in range(N_IMAGE_CODES)]
    token_types += [int(gguf.TokenType.CONTROL)] * N_IMAGE_CODES
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab(tokens=tokens, token_types=token_types, merges=merges)


# --- tensor sources -------------------------------------------------------------------------


class _TensorSource:
    """Lazy access to the weights of a Hugging Face folder (safetensors or torch .bin)."""

    def __init__(self, llm_dir: Path) -> None:
        self.llm_dir = llm_dir
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._bins: dict[Path, dict[str, Any]] = {}
        st_files = sorted(llm_dir.glob("*.safetensors"))
        bin_files = sorted(llm_dir.glob("pytorch_model*.bin"))
        if st_files:
            from safetensors import safe_open

            for f in st_files:
                with safe_open(str(f), framework="pt") as fh:
                    for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                        self._where[key] = f
                        self._shapes[key] = tuple(fh.get_slice(key).get_shape())
        elif bin_files:
            import torch

            for f in bin_files:
                sd = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
                self._bins[f] = sd
                for key, t in sd.items():
                    self._where[key] = f
                    self._shapes[key] = tuple(t.shape)
        else:
            raise ConversionError(f"{llm_dir}: no *.safetensors or pytorch_model*.bin weights")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def load(self, name: str) -> np.ndarray:
        import torch

        f = self._where[name]
        if f in self._bins:
            t = self._bins[f][name]
        else:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                t = fh.get_tensor(name)
        return np.ascontiguousarray(t.to(torch.float32).numpy())


# --- tensor plans and the streaming writer ---------------------------------------------------


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the output file: name, logical shape (rows first), type, producer.

    ``produce`` returns the data already encoded in ``qtype`` (float32 / float16 arrays, or
    the uint8 blocks of a quantised type); it is called once, while writing.
    """

    name: str
    shape: tuple[int, ...]
    qtype: Any
    produce: Callable[[], np.ndarray]

    def nbytes(self) -> int:
        """Encoded size in bytes."""
        gguf = _gguf()
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        if n % block:
            raise ConversionError(f"tensor {self.name}: {n} values not a multiple of {block}")
        return n // block * size


def choose_qtype(shape: Sequence[int], quant: str) -> Any:
    """GGML type of a tensor for a file quantisation (llama.cpp's fallbacks included)."""
    t = _gguf().GGMLQuantizationType
    if len(shape) < 2 or quant == "f32":
        return t.F32
    if quant in ("f16", "q4_k_m"):  # q4_k_m: F16 intermediate, then llama.cpp's quantiser
        return t.F16
    if quant == "bf16":
        return t.BF16
    if quant == "q8_0":
        return t.Q8_0 if shape[-1] % 32 == 0 else t.F16
    raise ConversionError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")


def encode_tensor(data: np.ndarray, qtype: Any) -> np.ndarray:
    """Encode float32 ``data`` as ``qtype`` (gguf.quants; F32/F16 by numpy casts)."""
    gguf = _gguf()
    t = gguf.GGMLQuantizationType
    if qtype == t.F32:
        return data.astype(np.float32, copy=False)
    if qtype == t.F16:
        return data.astype(np.float16)
    return np.asarray(gguf.quants.quantize(data.astype(np.float32, copy=False), qtype))


def file_type_of(quant: str) -> int:
    """``general.file_type`` (llama.cpp's ``LLAMA_FTYPE_*``) of a quantisation name."""
    ft = _gguf().LlamaFileType
    return int(
        {
            "f32": ft.ALL_F32,
            "f16": ft.MOSTLY_F16,
            "bf16": ft.MOSTLY_BF16,
            "q8_0": ft.MOSTLY_Q8_0,
            "q4_k_m": ft.MOSTLY_Q4_K_M,
        }[quant]
    )


def add_neox_metadata(
    writer: Any,
    *,
    shape: NeoXShape,
    vocab: GGUFVocab,
    quant: str,
    name: str,
    extra: dict[str, str | int] | None = None,
) -> None:
    """Hyper-parameters, vocabulary and LLM-CXR layout keys of a ``gptneox`` GGUF file."""
    gguf = _gguf()
    writer.add_name(name)
    writer.add_file_type(file_type_of(quant))
    if quant in ("q8_0", "q4_k_m"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(shape.max_positions)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_rope_dimension_count(shape.rotary_dims)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_parallel_residual(shape.parallel_residual)
    writer.add_layer_norm_eps(shape.layer_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_eot_token_id(vocab.eot_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    layout: dict[str, str | int] = {
        "text_vocab": TEXT_VOCAB,
        "image_token_offset": IMAGE_TOKEN_OFFSET,
        "n_image_codes": N_IMAGE_CODES,
        "codes_per_image": CODES_PER_IMAGE,
        "quant": quant,
        **(extra or {}),
    }
    for key, value in layout.items():
        if isinstance(value, int):
            writer.add_uint32(GGUF_KEY_PREFIX + key, value)
        else:
            writer.add_string(GGUF_KEY_PREFIX + key, str(value))


def write_gguf(
    out_path: Path, *, metadata: Callable[[Any], None], plans: Sequence[TensorPlan]
) -> None:
    """Write a GGUF file tensor by tensor (peak memory: one tensor), atomically.

    Parameters
    ----------
    out_path
        Destination; written as ``<out_path>.partial`` then renamed.
    metadata
        Called with the :class:`gguf.GGUFWriter` to add key/values before the tensors.
    plans
        The tensors, in file order.
    """
    gguf = _gguf()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        metadata(writer)
        sizes = []
        for p in plans:
            n = p.nbytes()
            sizes.append(n)
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), n, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p, n in zip(plans, sizes, strict=True):
            data = p.produce()
            if data.nbytes != n:
                raise ConversionError(f"tensor {p.name}: {data.nbytes} bytes encoded, expected {n}")
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _reorder_qkv(data: np.ndarray, heads: int) -> np.ndarray:
    """HF per-head ``[q k v]`` rows -> ``[Q | K | V]`` blocks (weight ``[3h, h]`` or bias)."""
    rest = data.shape[1:]
    head_dim = data.shape[0] // (3 * heads)
    out = data.reshape((heads, 3, head_dim, *rest)).swapaxes(0, 1)
    return np.ascontiguousarray(out.reshape(data.shape))


def _tensor_order(plan: TensorPlan) -> tuple[int, str]:
    """File order independent of the checkpoint's: embeddings, blocks, final norm, output."""
    if plan.name.startswith("blk."):
        return int(plan.name.split(".")[1]), plan.name
    return (-1 if plan.name.startswith("token_embd") else 1 << 30), plan.name


def neox_tensor_plans(source: Any, shape: NeoXShape, quant: str) -> list[TensorPlan]:
    """Plans for every weight of a GPT-NeoX checkpoint (names mapped, QKV reordered)."""
    gguf = _gguf()
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.GPTNEOX, shape.layers)
    plans: list[TensorPlan] = []
    seen: set[str] = set()
    for hf_name in source.names():
        if hf_name.endswith(_SKIP_SUFFIXES):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(f"tensor {hf_name!r} has no GPT-NeoX GGUF name")
        tshape = tuple(int(d) for d in source.shape(hf_name))
        if gguf_name in ("token_embd.weight", "output.weight") and tshape[0] != VOCAB:
            raise TokenLayoutError(f"{hf_name} has {tshape[0]} rows, LLM-CXR needs {VOCAB}")
        qtype = choose_qtype(tshape, quant)
        is_qkv = ".attn_qkv." in gguf_name

        def produce(
            hf_name: str = hf_name, qtype: Any = qtype, is_qkv: bool = is_qkv
        ) -> np.ndarray:
            data = source.load(hf_name)
            if is_qkv:
                data = _reorder_qkv(data, shape.heads)
            return encode_tensor(data, qtype)

        plans.append(TensorPlan(gguf_name, tshape, qtype, produce))
        seen.add(gguf_name)
    plans.sort(key=_tensor_order)
    needed = {"token_embd.weight", "output.weight", "output_norm.weight"}
    needed |= {f"blk.{i}.attn_qkv.weight" for i in range(shape.layers)}
    if missing := sorted(needed - seen):
        raise ConversionError(f"checkpoint lacks tensor(s) {', '.join(missing[:4])}")
    return plans


# --- public conversion API ------------------------------------------------------------------


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


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """Count of tensors per GGML type in a GGUF file (``{"Q8_0": 97, "F32": 196}``)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in reader.tensors:
        name = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        counts[name] = counts.get(name, 0) + 1
    return counts


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Scalar and string key/values of a GGUF file (arrays left out), e.g. ``llmcxr.*``."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        types = list(fld.types)
        if not types or types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = fld.parts[fld.data[0]]
        if types[0] == gguf.GGUFValueType.STRING:
            out[key] = bytes(value).decode("utf-8")
        else:
            out[key] = value.tolist()[0]
    return out


LAYOUT_KEYS: dict[str, str | int] = {
    "general.architecture": ARCH,
    f"{GGUF_KEY_PREFIX}text_vocab": TEXT_VOCAB,
    f"{GGUF_KEY_PREFIX}image_token_offset": IMAGE_TOKEN_OFFSET,
    f"{GGUF_KEY_PREFIX}n_image_codes": N_IMAGE_CODES,
}
"""GGUF key/values that mark a file converted for the LLM-CXR token layout."""


def check_layout_metadata(meta: dict[str, Any], *, where: str) -> None:
    """Raise :class:`TokenLayoutError` unless ``meta`` (key -> value or its string) carries
    the LLM-CXR layout keys written by :func:`add_neox_metadata`."""
    for key, value in LAYOUT_KEYS.items():
        if str(meta.get(key)) != str(value):
            raise TokenLayoutError(f"{where}: GGUF key {key} is {meta.get(key)!r}, need {value!r}")


def check_gguf_layout(path: Path) -> dict[str, Any]:
    """Read ``path``'s metadata with :class:`gguf.GGUFReader` and check the layout keys.

    The reader parses the whole 51,305-entry vocabulary (a few seconds); the backend reads
    the keys through llama.cpp instead.
    """
    meta = read_gguf_metadata(path)
    check_layout_metadata(meta, where=str(path))
    return meta


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
    cfg_path = llm_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{cfg_path}: cannot read config: {exc}") from exc
    shape = NeoXShape.from_config(cfg)
    vocab = build_gguf_vocab(tokenizer_json or llm_dir / "tokenizer.json")
    source = _TensorSource(llm_dir)
    write_quant = "f16" if quant == "q4_k_m" else quant
    plans = neox_tensor_plans(source, shape, write_quant)

    def metadata(writer: Any) -> None:
        add_neox_metadata(writer, shape=shape, vocab=vocab, quant=quant, name=model_name)

    if quant == "q4_k_m":
        inter = out_path.with_name(out_path.name + ".f16-intermediate")
        try:
            write_gguf(inter, metadata=metadata, plans=plans)
            tmp = out_path.with_name(out_path.name + ".partial")
            llama_quantize(inter, tmp, quant=quant, threads=threads)
            os.replace(tmp, out_path)
        finally:
            inter.unlink(missing_ok=True)
    else:
        write_gguf(out_path, metadata=metadata, plans=plans)
    if quant == "q4_k_m":  # llama.cpp chose the per-tensor types
        types = gguf_tensor_types(out_path)
    else:
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
