"""Reading taming VQ-GAN checkpoints and loading them strictly into a ``VQModel``.

A published checkpoint is a Lightning ``.ckpt`` whose ``state_dict`` holds the tokenizer
under ``encoder.``, ``decoder.``, ``quantize.``, ``quant_conv.`` and ``post_quant_conv.``
next to the training loss (``loss.``). It is read without running code from the file
(:func:`read_taming_state_dict`) and loaded with strict key and shape matching; a
mismatch names the key, both shapes and the config fields that imply the expected one
(:func:`load_taming_state_dict`).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from models.vqgan_config import VQGANConfig, VQGANConfigError

if TYPE_CHECKING:
    from models.vqgan import VQModel

__all__ = [
    "IGNORED_CHECKPOINT_PREFIXES",
    "MODEL_PREFIXES",
    "CheckpointError",
    "load_taming_state_dict",
    "read_taming_state_dict",
]

# the tokenizer's public module, so that log configuration naming it keeps applying
log = logging.getLogger("models.vqgan")

#: State-dict prefixes of a taming ``VQModel`` checkpoint that are not part of the
#: image tokenizer: ``loss.`` holds the LPIPS/VGG perceptual loss and the
#: discriminator (training only); ``colorize`` is a buffer taming registers only for
#: segmentation inputs.
IGNORED_CHECKPOINT_PREFIXES: tuple[str, ...] = ("loss.", "colorize")

#: Prefixes every key of a loadable taming VQ-GAN state dict must start with.
MODEL_PREFIXES: tuple[str, ...] = (
    "encoder.",
    "decoder.",
    "quantize.",
    "quant_conv.",
    "post_quant_conv.",
)


class CheckpointError(ValueError):
    """A VQ-GAN checkpoint cannot be read or does not match the model strictly."""


class _Opaque:
    """Inert stand-in for a class a checkpoint pickles but the tokenizer never needs."""

    _qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def __repr__(self) -> str:
        return f"<opaque {self._qualname}>"


#: torch._utils functions a plain tensor state dict pickles; none of them calls back
#: into an object taken from the file (unlike ``_rebuild_from_type_v2``).
_TENSOR_REBUILDERS = frozenset(
    {
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_meta_tensor_no_storage",
    }
)

_TORCH_DTYPES = {n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}


def _tensor_global_allowed(module: str, name: str) -> bool:
    if module == "torch._utils" and name in _TENSOR_REBUILDERS:
        return True
    if module == "torch" and (
        name.endswith("Storage") or name in {"Size", "device", "dtype"} or name in _TORCH_DTYPES
    ):
        return True
    if module == "torch.storage" and name in {"UntypedStorage", "TypedStorage"}:
        return True
    return (module, name) in {("collections", "OrderedDict"), ("builtins", "set")} or (
        module == "builtins" and name in {"frozenset", "slice", "complex"}
    )


class _InertUnpickler(pickle.Unpickler):
    """Resolves only the globals a tensor state dict needs; all else becomes ``_Opaque``.

    Used when ``weights_only=True`` refuses a Lightning checkpoint because of its
    training metadata (OmegaConf hyper-parameters, callback states). No callable from
    the file is ever resolved, so nothing in it runs, and neither Lightning nor
    OmegaConf needs to be installed.
    """

    opaque_names: list[str]

    def find_class(self, module: str, name: str) -> Any:
        if _tensor_global_allowed(module, name):
            return super().find_class(module, name)
        if not hasattr(self, "opaque_names"):
            self.opaque_names = []
        self.opaque_names.append(f"{module}.{name}")
        return type(name, (_Opaque,), {"_qualname": f"{module}.{name}"})


class _InertPickleModule:
    """``pickle_module`` for :func:`torch.load` built around :class:`_InertUnpickler`."""

    Unpickler = _InertUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(f: Any, **kwargs: Any) -> Any:  # pragma: no cover - torch uses Unpickler
        return _InertUnpickler(f, **kwargs).load()


def _torch_load(path: Path) -> Any:
    """``torch.load`` of ``path`` on the CPU that never runs code from the file.

    ``weights_only=True`` first; a file it refuses (pickled training metadata) is
    re-read with :class:`_InertPickleModule`, which resolves only tensor rebuilders.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        log.info(
            "VQ-GAN checkpoint %s holds non-tensor objects (Lightning training metadata); "
            "re-reading with globals other than tensor rebuilders replaced by inert "
            "placeholders (%s)",
            path.name,
            str(exc).splitlines()[0][:200],
        )
    return torch.load(
        path,
        map_location="cpu",
        weights_only=False,
        pickle_module=_InertPickleModule,  # type: ignore[arg-type]
    )


def _fields_for_key(key: str) -> str:
    if key == "quantize.embedding.weight":
        return "n_embed, embed_dim"
    if key.startswith("quant_conv.") or key.startswith("post_quant_conv."):
        return "z_channels, embed_dim"
    if key == "encoder.conv_in.weight":
        return "ch, in_channels"
    if key.startswith("encoder.conv_out."):
        return "z_channels, double_z, ch, ch_mult"
    if key == "decoder.conv_in.weight":
        return "z_channels, ch, ch_mult"
    if key.startswith("decoder.conv_out."):
        return "out_ch, ch"
    return "ch, ch_mult"


def _describe(cfg: VQGANConfig, fields: str) -> str:
    d = cfg.to_dict()
    return ", ".join(f"{f}={d[f]}" for f in (s.strip() for s in fields.split(",")))


def _summarise(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_taming_state_dict(ckpt_path: Path) -> Mapping[str, Tensor]:
    """The taming state dict in ``ckpt_path``, read on the CPU without running its code.

    Parameters
    ----------
    ckpt_path : Path
        Lightning-style checkpoint (``{"state_dict": {...}, ...}``) or a bare state dict.

    Returns
    -------
    mapping of str to Tensor
        ``ckpt["state_dict"]``, or the file's mapping itself when it is a bare state dict;
        ``loss.*`` keys are still in it.

    Raises
    ------
    CheckpointError
        The file is missing or unreadable, or holds no taming state dict of tensors.
    """
    if not ckpt_path.is_file():
        raise CheckpointError(f"VQ-GAN checkpoint {ckpt_path} does not exist")
    try:
        obj = _torch_load(ckpt_path)
    except Exception as exc:
        raise CheckpointError(f"cannot read VQ-GAN checkpoint {ckpt_path}: {exc}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj:
        sd = obj["state_dict"]
    elif isinstance(obj, Mapping) and any(str(k).startswith(MODEL_PREFIXES) for k in obj):
        sd = obj
    else:
        raise CheckpointError(
            f"{ckpt_path} is not a taming checkpoint: no 'state_dict' entry and no "
            f"encoder./decoder. keys"
        )
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{ckpt_path}: 'state_dict' is not a mapping of tensors")
    return sd


def load_taming_state_dict(
    model: VQModel,
    state_dict: Mapping[str, Tensor],
    *,
    source: str = "the checkpoint",
    config_label: str = "config",
) -> None:
    """Strictly load a taming ``VQModel`` state dict into ``model``.

    Keys under :data:`IGNORED_CHECKPOINT_PREFIXES` (the training loss) are dropped;
    every other key must exist in the model with the same shape, and every model key
    must be present.

    Parameters
    ----------
    model : VQModel
        Target; its ``cfg`` is what the tensors are checked against.
    state_dict : mapping of str to Tensor
        Taming ``VQModel`` state dict (``ckpt["state_dict"]``).
    source : str
        Name of the checkpoint for messages.
    config_label : str
        Where ``model.cfg`` came from, for messages (``"YAML"``).

    Raises
    ------
    CheckpointError
        Shape mismatch (names the key, both shapes and the config fields that imply
        the expected one), missing keys or unexpected keys (named).
    """
    sd = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_CHECKPOINT_PREFIXES)}
    expected = model.state_dict()
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    problems: list[str] = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    # model order, so the first key named is the earliest (usually the root cause)
    mismatched = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if mismatched:
        problems.append(_describe_mismatches(model.cfg, sd, expected, mismatched, config_label))
    if problems:
        raise CheckpointError(
            f"VQ-GAN state dict from {source} does not match: " + " | ".join(problems)
        )
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{k} in {source} is {v.dtype}, expected a float tensor")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def _describe_mismatches(
    cfg: VQGANConfig,
    sd: Mapping[str, Tensor],
    expected: Mapping[str, Tensor],
    mismatched: list[str],
    config_label: str,
) -> str:
    """One message for the shape mismatches: the first eight keys with both shapes and
    the config fields behind the expected one, then the config the tensors imply."""
    try:
        derived: VQGANConfig | None = VQGANConfig.from_state_dict(sd, resolution=cfg.resolution)
    except VQGANConfigError:
        derived = None
    lines = []
    for k in mismatched[:8]:
        fields = _fields_for_key(k)
        lines.append(
            f"{k} has shape {list(sd[k].shape)} but the {config_label}'s "
            f"{_describe(cfg, fields)} implies {list(expected[k].shape)}"
        )
    if len(mismatched) > 8:
        lines.append(f"(+{len(mismatched) - 8} more mismatched keys)")
    if derived is not None and derived != cfg:
        diff = {f: v for f, v in derived.to_dict().items() if cfg.to_dict()[f] != v}
        lines.append(f"the tensors imply {diff}")
    return "; ".join(lines)
