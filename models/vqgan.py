"""A taming-transformers compatible VQ-GAN (``VQModel``) for LLM-CXR's image tokens.

The module tree reproduces the parameter names and shapes of taming-transformers'
``taming.models.vqgan.VQModel`` (encoder, decoder, ``quantize.embedding``,
``quant_conv``, ``post_quant_conv``) so that a published Lightning ``.ckpt`` loads with
strict key matching. Written from the published architecture description; no taming
code is imported or copied.

Conventions kept from taming: GroupNorm(32 groups, eps=1e-6, affine), swish
activation, stride-2 3x3 down-sampling after an asymmetric (0, 1, 0, 1) zero pad,
nearest x2 up-sampling followed by a 3x3 conv, single-head spatial self-attention with
1x1 convs scaled by ``c ** -0.5``, the decoder's ``up`` list indexed by resolution level,
and nearest-code search by ``|z|^2 + |e|^2 - 2 z.e``.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

__all__ = [
    "IGNORED_CHECKPOINT_PREFIXES",
    "CheckpointError",
    "VQGANConfig",
    "VQGANConfigError",
    "VQModel",
    "load_taming_checkpoint",
    "load_taming_state_dict",
]

log = logging.getLogger(__name__)

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

_GROUPS = 32
_EPS = 1e-6


class VQGANConfigError(ValueError):
    """The VQ-GAN configuration is invalid or disagrees with a checkpoint's tensors."""


class CheckpointError(ValueError):
    """A VQ-GAN checkpoint cannot be read or does not match the model strictly."""


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
        for name in ("ch", "num_res_blocks", "z_channels", "in_channels", "out_ch"):
            if int(getattr(self, name)) < 1:
                raise VQGANConfigError(f"VQ-GAN {name} must be >= 1, got {getattr(self, name)}")
        for name in ("resolution", "n_embed", "embed_dim"):
            if int(getattr(self, name)) < 1:
                raise VQGANConfigError(f"VQ-GAN {name} must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise VQGANConfigError(
                f"VQ-GAN ch_mult must be non-empty positive ints: {self.ch_mult}"
            )
        for m in (1, *self.ch_mult):
            if (self.ch * m) % _GROUPS:
                raise VQGANConfigError(
                    f"VQ-GAN ch*ch_mult = {self.ch * m} is not a multiple of the {_GROUPS} "
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
        n_levels = max(levels) + 1
        ch_mult = []
        for i in range(n_levels):
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


# --------------------------------------------------------------------------- layers


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=_GROUPS, num_channels=channels, eps=_EPS, affine=True)


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """Taming's ResnetBlock without a time embedding (``temb_channels=0``)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions with 1x1 conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
        k = k.reshape(b, c, hh * ww)  # b, c, hw
        w = torch.bmm(q, k) * (int(c) ** -0.5)  # w[b, i, j] = <q_i, k_j>
        w = torch.softmax(w, dim=2)
        v = v.reshape(b, c, hh * ww)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero pad right/bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Holder for one resolution level (``block``, ``attn``, optional re-sampler)."""

    downsample: Downsample  # encoder levels but the last
    upsample: Upsample  # decoder levels but level 0

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Taming encoder: image -> ``z_channels`` (or ``2*z_channels``) latent."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, stride=1, padding=1)
        in_ch_mult = (1, *cfg.ch_mult)
        curr_res = cfg.resolution
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i_level in range(self.num_resolutions):
            level = _Level()
            block_in = cfg.ch * in_ch_mult[i_level]
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, cfg.dropout)
        self.norm_out = _norm(block_in)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv2d(block_in, z_out, 3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i_level, module in enumerate(self.down):
            level = cast(_Level, module)
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Taming decoder (``give_pre_end=False``, no ``tanh``): latent -> image."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.grid_size
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, stride=1, padding=1)
        self.mid = _Mid(block_in, cfg.dropout)
        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):
            level = _Level()
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, level)  # ``up[i]`` is resolution level i, as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            level = cast(_Level, self.up[i_level])
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Taming's plain nearest-code quantizer (inference part only).

    The codebook is ``embedding.weight`` ``[n_embed, embed_dim]``, initialised
    uniformly in ``[-1/n_embed, 1/n_embed]`` as taming does.
    """

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def indices(self, z: Tensor) -> Tensor:
        """Nearest-code indices of ``z[B, embed_dim, h, w]`` as ``[B, h*w]`` (row-major)."""
        b = z.shape[0]
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        e = self.embedding.weight
        # taming's expansion |z|^2 + |e|^2 - 2 z.e, kept verbatim so ties break the same way
        d = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(e**2, dim=1)
            - 2.0 * torch.matmul(flat, e.t())
        )
        return torch.argmin(d, dim=1).reshape(b, -1)

    def lookup(self, codes: Tensor, grid: int) -> Tensor:
        """Codebook vectors for ``codes[B, grid*grid]`` as ``[B, embed_dim, grid, grid]``."""
        b = codes.shape[0]
        zq = F.embedding(codes, self.embedding.weight)  # b, hw, c
        return zq.reshape(b, grid, grid, self.embed_dim).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """Taming-compatible VQ-GAN image tokenizer (inference only; no loss module).

    Parameters
    ----------
    cfg : VQGANConfig
        Architecture; parameter names and shapes follow taming's ``VQModel``.
    """

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def _check_images(self, x: Tensor) -> None:
        r = self.cfg.resolution
        expected = (self.cfg.in_channels, r, r)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"VQ-GAN input must be [batch, {expected[0]}, {r}, {r}], got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"VQ-GAN input must be floating point in [-1, 1], got {x.dtype}")

    def encode_latent(self, x: Tensor) -> Tensor:
        """``quant_conv(encoder(x))``: the pre-quantisation latent ``[B, embed_dim, g, g]``."""
        return self.quant_conv(self.encoder(x))

    def encode_to_codes(self, x: Tensor) -> Tensor:
        """Encode images ``x[B, 3, 256, 256]`` in [-1, 1] to codes ``LongTensor[B, 256]``.

        Codes are row-major over the 16x16 latent grid, each in ``[0, n_embed)``.
        """
        self._check_images(x)
        return self.quantize.indices(self.encode_latent(x))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Decode ``codes[B, 256]`` (int) to images ``[B, 3, 256, 256]`` (about [-1, 1])."""
        n = self.cfg.codes_per_image
        if codes.dim() != 2 or codes.shape[1] != n:
            raise ValueError(f"VQ-GAN codes must be [batch, {n}], got {list(codes.shape)}")
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"VQ-GAN codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.n_embed):
            raise ValueError(
                f"VQ-GAN codes must be in [0, {self.cfg.n_embed}), got "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        return self._decode_unchecked(codes.long())

    def _decode_unchecked(self, codes: Tensor) -> Tensor:
        zq = self.quantize.lookup(codes, self.cfg.grid_size)
        return self.decoder(self.post_quant_conv(zq))

    def forward(self, x: Tensor) -> Tensor:
        """Encode to codes (the tokenizer direction); see :meth:`encode_to_codes`."""
        return self.encode_to_codes(x)


# --------------------------------------------------------------------- checkpoints


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
        try:
            derived: VQGANConfig | None = VQGANConfig.from_state_dict(
                sd, resolution=model.cfg.resolution
            )
        except VQGANConfigError:
            derived = None
        lines = []
        for k in mismatched[:8]:
            fields = _fields_for_key(k)
            lines.append(
                f"{k} has shape {list(sd[k].shape)} but the {config_label}'s "
                f"{_describe(model.cfg, fields)} implies {list(expected[k].shape)}"
            )
        if len(mismatched) > 8:
            lines.append(f"(+{len(mismatched) - 8} more mismatched keys)")
        if derived is not None and derived != model.cfg:
            diff = {f: v for f, v in derived.to_dict().items() if model.cfg.to_dict()[f] != v}
            lines.append(f"the tensors imply {diff}")
        problems.append("; ".join(lines))
    if problems:
        raise CheckpointError(
            f"VQ-GAN state dict from {source} does not match: " + " | ".join(problems)
        )
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{k} in {source} is {v.dtype}, expected a float tensor")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def load_taming_checkpoint(
    ckpt_path: str | Path, yaml_path: str | Path, *, map_location: str = "cpu"
) -> VQModel:
    """Load a published taming/LLM-CXR VQ-GAN: ``.ckpt`` plus its OmegaConf YAML.

    The YAML fixes the architecture (:meth:`VQGANConfig.from_yaml`); every tensor of
    ``ckpt["state_dict"]`` outside ``loss.*`` must match it exactly. The file is read
    with ``torch.load(weights_only=True)`` first; Lightning checkpoints that pickle
    training metadata are re-read with an unpickler that resolves only tensor
    rebuilders (see :class:`_InertUnpickler`), so no code from the file runs.

    Parameters
    ----------
    ckpt_path : str or Path
        Lightning-style checkpoint (``{"state_dict": {...}, ...}``) or a bare state dict.
    yaml_path : str or Path
        The YAML shipped beside it.
    map_location : str
        Device for the returned model.

    Returns
    -------
    VQModel
        In eval mode, fp32.

    Raises
    ------
    CheckpointError, VQGANConfigError
    """
    ckpt_path = Path(ckpt_path)
    cfg = VQGANConfig.from_yaml(yaml_path)
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
    model = VQModel(cfg)
    load_taming_state_dict(model, sd, source=ckpt_path.name, config_label="YAML")
    return model.to(map_location).eval()


def state_dict_key_summary(model: VQModel) -> dict[str, list[int]]:
    """``{key: shape}`` of a model's state dict (for manifests and diagnostics)."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}
