"""The hyper-parameters of a taming ``VQModel`` and where they are read from.

:class:`VQGANConfig` is taming's ``ddconfig`` plus ``n_embed``/``embed_dim``. It is read
from the OmegaConf YAML that ships beside a published checkpoint (with PyYAML; no
OmegaConf dependency), or derived from a state dict's tensor shapes, and written back in
taming's YAML layout. The model itself is :class:`models.vqgan.VQModel`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

__all__ = ["NORM_GROUPS", "VQGANConfig", "VQGANConfigError"]

#: GroupNorm groups taming uses everywhere; every channel count must be a multiple.
NORM_GROUPS = 32


class VQGANConfigError(ValueError):
    """The VQ-GAN configuration is invalid or disagrees with a checkpoint's tensors."""


@dataclass(frozen=True)
class VQGANConfig:
    """Hyper-parameters of a taming ``VQModel`` (``ddconfig`` plus ``n_embed``/``embed_dim``).

    Defaults are the most likely LLM-CXR shape (taming's ``custom_vqgan`` settings); a
    real checkpoint's shapes always win, see :meth:`from_state_dict`.

    Parameters
    ----------
    ch : int
        Base channel count; a multiple of 32 (GroupNorm uses 32 groups).
    ch_mult : tuple of int
        Channel multiplier per resolution level; its length is the number of levels.
    num_res_blocks : int
        ResNet blocks per encoder level (the decoder has one more per level).
    attn_resolutions : tuple of int
        Feature-map sizes at which self-attention blocks follow the ResNet blocks.
    z_channels : int
        Channels of the latent before ``quant_conv``.
    double_z : bool
        Must be False (taming's VQModel has no double-z variant); kept for the YAML.
    dropout : float
        Dropout rate inside the ResNet blocks (inactive at inference).
    in_channels, out_ch : int
        Image channels in and out (3: the grey CXR replicated to RGB).
    resolution : int
        Input image side in pixels.
    n_embed : int
        Codebook size (1024 for LLM-CXR).
    embed_dim : int
        Codebook vector dimension (256 for LLM-CXR).

    Raises
    ------
    VQGANConfigError
        On construction, naming the first field that taming's ``VQModel`` cannot be
        built or loaded with.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    double_z: bool = False
    dropout: float = 0.0
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    n_embed: int = 1024
    embed_dim: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        for name in _POSITIVE_FIELDS:
            if int(getattr(self, name)) < 1:
                raise VQGANConfigError(f"VQ-GAN {name} must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise VQGANConfigError(
                f"VQ-GAN ch_mult must be non-empty positive ints: {self.ch_mult}"
            )
        for m in (1, *self.ch_mult):
            if (self.ch * m) % NORM_GROUPS:
                raise VQGANConfigError(
                    f"VQ-GAN ch*ch_mult = {self.ch * m} is not a multiple of the {NORM_GROUPS} "
                    "GroupNorm groups taming uses"
                )
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise VQGANConfigError(
                f"VQ-GAN resolution {self.resolution} is not divisible by "
                f"2**{len(self.ch_mult) - 1} (one halving per level after the first)"
            )
        if self.double_z:
            # taming's VQModel sizes quant_conv from z_channels, so double_z cannot load
            raise VQGANConfigError(
                "VQ-GAN double_z must be false: taming's VQModel (quant_conv takes "
                "z_channels inputs) has no double_z variant"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise VQGANConfigError(f"VQ-GAN dropout must be in [0, 1), got {self.dropout}")

    @property
    def grid_size(self) -> int:
        """Side of the latent code grid (16 for a 256 input and five levels)."""
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def codes_per_image(self) -> int:
        """Number of codes per image (``grid_size ** 2``; 256 for LLM-CXR)."""
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (lists for the tuples)."""
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VQGANConfig:
        """Build from a flat mapping with the field names; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise VQGANConfigError(f"unknown VQ-GAN config keys: {unknown}")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | Path) -> VQGANConfig:
        """Read the OmegaConf-layout YAML that ships beside a taming checkpoint.

        Expects ``model.params.ddconfig`` (``ch``, ``ch_mult``, ...),
        ``model.params.embed_dim`` and ``model.params.n_embed``. ``lossconfig`` and
        training keys are ignored. Read with PyYAML (no OmegaConf dependency).

        Parameters
        ----------
        path : str or Path
            The YAML file.

        Returns
        -------
        VQGANConfig

        Raises
        ------
        VQGANConfigError
            The file is missing keys, uses a Gumbel quantizer or index remapping
            (not the plain VQModel LLM-CXR uses), or holds invalid values.
        """
        path = Path(path)
        fields = _yaml_fields(path, *_read_yaml_params(path))
        try:
            return cls(
                ch=int(fields["ch"]),
                ch_mult=tuple(int(m) for m in fields["ch_mult"]),
                num_res_blocks=int(fields["num_res_blocks"]),
                attn_resolutions=tuple(int(r) for r in fields["attn_resolutions"]),
                z_channels=int(fields["z_channels"]),
                double_z=bool(fields["double_z"]),
                dropout=float(fields["dropout"]),
                in_channels=int(fields["in_channels"]),
                out_ch=int(fields["out_ch"]),
                resolution=int(fields["resolution"]),
                n_embed=int(fields["n_embed"]),
                embed_dim=int(fields["embed_dim"]),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, VQGANConfigError):
                raise VQGANConfigError(f"{path}: {exc}") from exc
            raise VQGANConfigError(f"{path}: invalid ddconfig value: {exc}") from exc

    def to_yaml_dict(self) -> dict[str, Any]:
        """The OmegaConf layout taming writes (``model.params.ddconfig`` etc.)."""
        dd = self.to_dict()
        n_embed, embed_dim = dd.pop("n_embed"), dd.pop("embed_dim")
        return {
            "model": {
                "target": "taming.models.vqgan.VQModel",
                "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dd},
            }
        }

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Tensor], *, resolution: int = 256, dropout: float = 0.0
    ) -> VQGANConfig:
        """Derive the configuration from a taming state dict's tensor shapes.

        ``resolution`` and ``dropout`` leave no trace in the weights and are taken
        from the arguments; attention resolutions are inferred from the encoder levels
        that carry ``attn`` blocks (level ``i`` works at ``resolution // 2**i``).

        Raises
        ------
        VQGANConfigError
            A key needed for the derivation is missing.
        """

        def shape(key: str) -> tuple[int, ...]:
            if key not in state_dict:
                raise VQGANConfigError(f"cannot derive the VQ-GAN config: {key} is missing")
            return tuple(state_dict[key].shape)

        ch, in_channels = shape("encoder.conv_in.weight")[:2]
        levels, attn_levels = _encoder_levels(state_dict)
        ch_mult = []
        for i in range(max(levels) + 1):
            out_c = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
            if out_c % ch:
                raise VQGANConfigError(
                    f"encoder.down.{i}.block.0.conv1.weight has {out_c} output channels, "
                    f"not a multiple of ch={ch}"
                )
            ch_mult.append(out_c // ch)
        z_channels = shape("decoder.conv_in.weight")[1]
        enc_out = shape("encoder.conv_out.weight")[0]
        n_embed, embed_dim = shape("quantize.embedding.weight")
        return cls(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=len(levels[0]),
            attn_resolutions=tuple(sorted(resolution // 2**i for i in attn_levels)),
            z_channels=z_channels,
            double_z=enc_out == 2 * z_channels,
            dropout=dropout,
            in_channels=in_channels,
            out_ch=shape("decoder.conv_out.weight")[0],
            resolution=resolution,
            n_embed=n_embed,
            embed_dim=embed_dim,
        )


#: Fields that must be at least 1, in the order they are checked (and reported).
_POSITIVE_FIELDS = (
    "ch",
    "num_res_blocks",
    "z_channels",
    "in_channels",
    "out_ch",
    "resolution",
    "n_embed",
    "embed_dim",
)


def _read_yaml_params(path: Path) -> tuple[Any, Any]:
    """``(model.params, model.params.ddconfig)`` of a taming YAML for the plain VQModel.

    Raises
    ------
    VQGANConfigError
        The file cannot be read, lacks the OmegaConf layout, ``embed_dim`` or
        ``n_embed``, or configures a Gumbel quantizer or index remapping.
    """
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise VQGANConfigError(f"cannot read VQ-GAN config {path}: {exc}") from exc
    try:
        model = doc["model"]
        params = model["params"]
        dd = params["ddconfig"]
    except (KeyError, TypeError) as exc:
        raise VQGANConfigError(
            f"{path}: expected the OmegaConf layout model.params.ddconfig, missing {exc}"
        ) from exc
    target = str(model.get("target", ""))
    if "gumbel" in target.lower():
        raise VQGANConfigError(
            f"{path}: model.target={target!r} is a Gumbel quantizer; only taming's plain "
            "VQModel (nearest-code quantizer) is supported"
        )
    if params.get("remap") is not None:
        raise VQGANConfigError(
            f"{path}: model.params.remap is set; index remapping changes the code "
            "numbering and is not supported"
        )
    for key in ("embed_dim", "n_embed"):
        if key not in params:
            raise VQGANConfigError(f"{path}: model.params.{key} is missing")
    return params, dd


def _yaml_fields(path: Path, params: Any, dd: Any) -> dict[str, Any]:
    """Every :class:`VQGANConfig` field as found in the YAML (taming's defaults filled in).

    Raises
    ------
    VQGANConfigError
        A field without a taming default is absent from ``ddconfig``.
    """
    fields = {
        "ch": dd.get("ch"),
        "ch_mult": dd.get("ch_mult"),
        "num_res_blocks": dd.get("num_res_blocks"),
        "attn_resolutions": dd.get("attn_resolutions"),
        "z_channels": dd.get("z_channels"),
        "double_z": dd.get("double_z", False),
        "dropout": dd.get("dropout", 0.0),
        "in_channels": dd.get("in_channels", 3),
        "out_ch": dd.get("out_ch", 3),
        "resolution": dd.get("resolution"),
        "n_embed": params["n_embed"],
        "embed_dim": params["embed_dim"],
    }
    missing = sorted(k for k, v in fields.items() if v is None)
    if missing:
        raise VQGANConfigError(f"{path}: model.params.ddconfig lacks {missing}")
    return fields


def _encoder_levels(state_dict: Mapping[str, Tensor]) -> tuple[dict[int, set[int]], set[int]]:
    """``({level: block indices}, levels with attention)`` of a state dict's encoder.

    Raises
    ------
    VQGANConfigError
        The state dict has no ``encoder.down.*`` blocks.
    """
    level_re = re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.")
    levels: dict[int, set[int]] = {}
    attn_levels: set[int] = set()
    for key in state_dict:
        m = level_re.match(key)
        if m:
            levels.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        m2 = re.match(r"^encoder\.down\.(\d+)\.attn\.", key)
        if m2:
            attn_levels.add(int(m2.group(1)))
    if not levels:
        raise VQGANConfigError("cannot derive the VQ-GAN config: no encoder.down.* blocks")
    return levels, attn_levels
