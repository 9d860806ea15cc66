"""Writing a GPT-NeoX checkpoint as a ``gptneox`` GGUF file, one tensor at a time.

Tensors are read lazily from the Hugging Face folder (:class:`TensorSource`), renamed with
:class:`gguf.TensorNameMap` (``token_embd``, ``blk.N.attn_qkv``, ..., ``output`` kept
separate: LLM-CXR's embeddings are untied), and the fused QKV projection is reordered from
Hugging Face's per-head ``[q k v]`` interleaving to the ``[Q | K | V]`` blocks that
llama.cpp's GPT-NeoX graph slices (:func:`neox_tensor_plans`). :func:`write_gguf` streams
the planned tensors to disk atomically after the key/values of :func:`add_neox_metadata`.

Types per file quantisation (:func:`choose_qtype`): ``f32``, ``f16`` and ``bf16`` are
written directly; ``q8_0`` is quantised with ``gguf.quants`` from the fp32 weights;
``q4_k_m`` is written as F16 for llama.cpp's own quantiser. Matrices whose row length is
not a multiple of the quantisation block stay F16, and 1-D tensors (norms, biases) stay
F32, as llama.cpp does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from models.gguf_layout import (
    ARCH,
    GGUF_KEY_PREFIX,
    ConversionError,
    GGUFVocab,
    NeoXShape,
    import_gguf,
    layout_metadata,
)
from models.layout import VOCAB, TokenLayoutError

__all__ = [
    "QUANTS",
    "Quant",
    "TensorPlan",
    "TensorSource",
    "add_neox_metadata",
    "choose_qtype",
    "encode_tensor",
    "file_type_of",
    "neox_tensor_plans",
    "write_gguf",
]

Quant = Literal["f32", "f16", "bf16", "q8_0", "q4_k_m"]
QUANTS: tuple[str, ...] = get_args(Quant)
# Buffers of older GPT-NeoX checkpoints that are not weights.
_SKIP_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


class TensorSource:
    """Lazy access to the weights of a Hugging Face folder (safetensors or torch .bin).

    Parameters
    ----------
    llm_dir : Path
        The folder; ``*.safetensors`` are used when present, else ``pytorch_model*.bin``
        (memory-mapped).

    Raises
    ------
    ConversionError
        The folder holds neither.
    """

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
        """Every tensor name in the folder, in file order."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (read from the file headers, no data loaded)."""
        return self._shapes[name]

    def load(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a contiguous float32 array."""
        import torch

        f = self._where[name]
        if f in self._bins:
            t = self._bins[f][name]
        else:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                t = fh.get_tensor(name)
        return np.ascontiguousarray(t.to(torch.float32).numpy())


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
        gguf = import_gguf()
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        if n % block:
            raise ConversionError(f"tensor {self.name}: {n} values not a multiple of {block}")
        return n // block * size


def choose_qtype(shape: Sequence[int], quant: str) -> Any:
    """GGML type of a tensor for a file quantisation (llama.cpp's fallbacks included)."""
    t = import_gguf().GGMLQuantizationType
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
    gguf = import_gguf()
    t = gguf.GGMLQuantizationType
    if qtype == t.F32:
        return data.astype(np.float32, copy=False)
    if qtype == t.F16:
        return data.astype(np.float16)
    return np.asarray(gguf.quants.quantize(data.astype(np.float32, copy=False), qtype))


def file_type_of(quant: str) -> int:
    """``general.file_type`` (llama.cpp's ``LLAMA_FTYPE_*``) of a quantisation name."""
    ft = import_gguf().LlamaFileType
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
    """Add the key/values of a ``gptneox`` GGUF file to ``writer``, in llama.cpp's order.

    Parameters
    ----------
    writer
        A :class:`gguf.GGUFWriter` before its header is written.
    shape
        The hyper-parameters (context length, rotary dimensions and base, ...).
    vocab
        The 51,305-entry vocabulary with its merges and special ids.
    quant
        The file quantisation (``general.file_type``; ``llmcxr.quant``).
    name
        ``general.name``.
    extra
        More ``llmcxr.*`` keys (ints as uint32, anything else as a string).
    """
    gguf = import_gguf()
    writer.add_name(name)
    writer.add_file_type(file_type_of(quant))
    if quant in ("q8_0", "q4_k_m"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    hparams = (
        (writer.add_context_length, shape.max_positions),
        (writer.add_embedding_length, shape.hidden),
        (writer.add_block_count, shape.layers),
        (writer.add_feed_forward_length, shape.intermediate),
        (writer.add_head_count, shape.heads),
        (writer.add_rope_dimension_count, shape.rotary_dims),
        (writer.add_rope_freq_base, shape.rope_theta),
        (writer.add_parallel_residual, shape.parallel_residual),
        (writer.add_layer_norm_eps, shape.layer_norm_eps),
    )
    for add, hparam in hparams:
        add(hparam)
    _add_vocab(writer, vocab)
    for key, value in layout_metadata(quant, extra).items():
        if isinstance(value, int):
            writer.add_uint32(GGUF_KEY_PREFIX + key, value)
        else:
            writer.add_string(GGUF_KEY_PREFIX + key, str(value))


def _add_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """The GPT-2 style BPE tokenizer keys: tokens, types, merges, special ids, no BOS/EOS
    added by llama.cpp."""
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
    gguf = import_gguf()
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
    gguf = import_gguf()
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
