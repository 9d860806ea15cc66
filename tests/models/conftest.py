"""Shared fixtures for the model tests: tiny VQ-GAN configs and models, exported ONNX
graphs, and the real CXRs (NIH PNGs, a DICOM-derived RG1) as 8-bit arrays and model
inputs. Fixtures are session-scoped; tests must not modify what they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from models.onnx_export import export_decoder, export_encoder
from models.preprocess import to_model_batch, to_model_input
from models.vqgan import VQGANConfig, VQModel
from tests.helpers import require_nih_pngs, rg1_file

#: Seed of every randomly initialised test VQ-GAN.
VQGAN_SEED = 1234


def tiny_vqgan_config_value() -> VQGANConfig:
    """Published structure (5 levels -> 16x16 grid, attention at 16, 2 res blocks,
    1024-entry codebook) with narrow channels so that a forward pass takes ~0.5 s."""
    return VQGANConfig(
        ch=32,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        attn_resolutions=(16,),
        z_channels=64,
        double_z=False,
        dropout=0.0,
        in_channels=3,
        out_ch=3,
        resolution=256,
        n_embed=1024,
        embed_dim=64,
    )


def make_vqmodel(cfg: VQGANConfig, seed: int = VQGAN_SEED) -> VQModel:
    """A randomly initialised fp32 VQModel in eval mode, reproducible from ``seed``."""
    torch.manual_seed(seed)
    return VQModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_vqgan_config() -> VQGANConfig:
    """Small VQ-GAN config, structurally equal to the published one."""
    return tiny_vqgan_config_value()


@pytest.fixture(scope="session")
def tiny_vqmodel(tiny_vqgan_config: VQGANConfig) -> VQModel:
    """Randomly initialised tiny VQModel (seed :data:`VQGAN_SEED`), its parameters frozen so
    that its outputs carry no autograd graph. (Not a ``yield`` inside ``torch.no_grad()``:
    grad mode is per thread, so that switched autograd off for every later test of the
    session, the training tests included.)"""
    return make_vqmodel(tiny_vqgan_config).requires_grad_(False)


@dataclass(frozen=True)
class OnnxPair:
    """Paths of an exported encoder/decoder pair."""

    encoder: Path
    decoder: Path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_vqmodel: VQModel, tmp_path_factory: pytest.TempPathFactory) -> OnnxPair:
    """The tiny model exported to ONNX (encoder.onnx, decoder.onnx)."""
    d = tmp_path_factory.mktemp("vqgan-onnx")
    return OnnxPair(
        encoder=export_encoder(tiny_vqmodel, d / "encoder.onnx"),
        decoder=export_decoder(tiny_vqmodel, d / "decoder.onnx"),
    )


@pytest.fixture(scope="session")
def nih_gray8() -> list[npt.NDArray[np.uint8]]:
    """The two real NIH ChestX-ray14 CXRs as uint8 [512, 512] (skip when absent)."""
    from PIL import Image

    out = []
    for p in require_nih_pngs():
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("L"), dtype=np.uint8))
    return out


@pytest.fixture(scope="session")
def nih_inputs(nih_gray8: list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
    """The NIH CXRs through ``to_model_input``: float32 [2, 3, 256, 256]."""
    return to_model_batch(nih_gray8)


@pytest.fixture(scope="session")
def rg1_input() -> npt.NDArray[np.float32]:
    """RG1_UNCR (real CR, MONOCHROME1, 15-bit) via integration.pixels.to_gray8 and
    to_model_input: float32 [3, 256, 256] (skip when pydicom-data or the converter is absent)."""
    pydicom = pytest.importorskip("pydicom")
    try:
        from integration.pixels import to_gray8
    except ImportError:
        pytest.skip("integration.pixels.to_gray8 is not available")
    ds = pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))
    return to_model_input(to_gray8(ds))
