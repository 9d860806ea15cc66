"""The LLM-CXR layout as a GGUF file carries it, and reading it back.

A converted file describes llama.cpp's ``gptneox`` architecture: the hyper-parameters of
the bundle's ``config.json`` (:class:`NeoXShape`), a vocabulary of exactly 51,305 entries
(:class:`GGUFVocab`: the 50,281 text entries of ``tokenizer.json`` followed by 1,024
USER_DEFINED placeholders ``<img_0000>`` .. ``<img_1023>``, so image code ``c`` keeps id
``50281 + c`` and an OpenAI-compatible llama.cpp server reads and writes it as that
text), and ``llmcxr.*`` keys that mark the token layout (:data:`LAYOUT_KEYS`, checked by
:func:`check_layout_metadata`). Writing is :mod:`models.gguf_writer`;
the conversion entry points are :mod:`models.gguf_convert`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

__all__ = [
    "ARCH",
    "GGUF_KEY_PREFIX",
    "LAYOUT_KEYS",
    "ConversionError",
    "GGUFVocab",
    "NeoXShape",
    "build_gguf_vocab",
    "check_gguf_layout",
    "check_layout_metadata",
    "gguf_tensor_types",
    "image_token_text",
    "import_gguf",
    "layout_metadata",
    "read_gguf_metadata",
]

ARCH = "gptneox"
GGUF_KEY_PREFIX = "llmcxr."


class ConversionError(ValueError):
    """The LLM folder cannot be converted (names the file, tensor or field at fault)."""


def import_gguf() -> Any:
    """The ``gguf`` package (the ``llamacpp`` extra), imported on first use.

    Raises
    ------
    ConversionError
        The package is not installed.
    """
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
    50281..51304 are the image placeholders (USER_DEFINED: llama.cpp's tokenizer maps the
    text ``<img_0042>`` to its id and renders the id as that text, which is how
    :mod:`models.backends.remote` passes image ids to a llama.cpp server).

    Raises
    ------
    TokenLayoutError
        If the tokenizer is not byte-level BPE or its ids are not exactly 0..50280.
    """
    gguf = import_gguf()
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
    token_types += [int(gguf.TokenType.USER_DEFINED)] * N_IMAGE_CODES
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab(tokens=tokens, token_types=token_types, merges=merges)


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """Count of tensors per GGML type in a GGUF file (``{"Q8_0": 97, "F32": 196}``)."""
    gguf = import_gguf()
    reader = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in reader.tensors:
        name = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        counts[name] = counts.get(name, 0) + 1
    return counts


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Scalar and string key/values of a GGUF file (arrays left out), e.g. ``llmcxr.*``."""
    gguf = import_gguf()
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


def layout_metadata(quant: str, extra: dict[str, str | int] | None = None) -> dict[str, str | int]:
    """The ``llmcxr.*`` key/values of a converted file, without the prefix, in file order.

    The token layout (what :func:`check_layout_metadata` looks for), the codes per image,
    the file's quantisation, then ``extra``.
    """
    return {
        "text_vocab": TEXT_VOCAB,
        "image_token_offset": IMAGE_TOKEN_OFFSET,
        "n_image_codes": N_IMAGE_CODES,
        "codes_per_image": CODES_PER_IMAGE,
        "quant": quant,
        **(extra or {}),
    }


def check_layout_metadata(meta: dict[str, Any], *, where: str) -> None:
    """Raise :class:`TokenLayoutError` unless ``meta`` (key -> value or its string) carries
    the LLM-CXR layout keys written by :func:`models.gguf_writer.add_neox_metadata`."""
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
