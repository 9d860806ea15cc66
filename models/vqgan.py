"""A taming-transformers compatible VQ-GAN (``VQModel``) for LLM-CXR's image tokens.

The module tree reproduces the parameter names and shapes of taming-transformers'
``taming.models.vqgan.VQModel`` (encoder, decoder, ``quantize.embedding``,
``quant_conv``, ``post_quant_conv``) so that a published Lightning ``.ckpt`` loads with
strict key matching. Written from the published architecture description; no taming
code is imported or copied.

This module is the tokenizer's public face: :class:`VQModel` and
:func:`load_taming_checkpoint`, with the configuration (:mod:`models.vqgan_config`),
the building blocks (:mod:`models.vqgan_layers`) and strict checkpoint loading
(:mod:`models.vqgan_checkpoint`) re-exported from where they are defined.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from models.vqgan_checkpoint import (
    IGNORED_CHECKPOINT_PREFIXES,
    CheckpointError,
    load_taming_state_dict,
    read_taming_state_dict,
)
from models.vqgan_config import VQGANConfig, VQGANConfigError
from models.vqgan_layers import Decoder, Encoder, VectorQuantizer

__all__ = [
    "IGNORED_CHECKPOINT_PREFIXES",
    "CheckpointError",
    "VQGANConfig",
    "VQGANConfigError",
    "VQModel",
    "load_taming_checkpoint",
    "load_taming_state_dict",
]


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


def load_taming_checkpoint(
    ckpt_path: str | Path, yaml_path: str | Path, *, map_location: str = "cpu"
) -> VQModel:
    """Load a published taming/LLM-CXR VQ-GAN: ``.ckpt`` plus its OmegaConf YAML.

    The YAML fixes the architecture (:meth:`VQGANConfig.from_yaml`); every tensor of
    ``ckpt["state_dict"]`` outside ``loss.*`` must match it exactly. The file is read
    with ``torch.load(weights_only=True)`` first; Lightning checkpoints that pickle
    training metadata are re-read with an unpickler that resolves only tensor
    rebuilders (see :func:`models.vqgan_checkpoint.read_taming_state_dict`), so no code
    from the file runs.

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
    sd = read_taming_state_dict(ckpt_path)
    model = VQModel(cfg)
    load_taming_state_dict(model, sd, source=ckpt_path.name, config_label="YAML")
    return model.to(map_location).eval()


def state_dict_key_summary(model: VQModel) -> dict[str, list[int]]:
    """``{key: shape}`` of a model's state dict (for manifests and diagnostics)."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}
