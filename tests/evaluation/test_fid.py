"""FID: the Fréchet distance against closed forms, through a real TorchScript extractor."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.evaluation.fid import (
    fid,
    frechet_distance,
    image_features,
    load_extractor,
    save_extractor,
)


class HalfMeans(torch.nn.Module):
    """Features of a ``[B, C, S, S]`` image: the means of its left and right halves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean(dim=(1, 2, 3)), x[..., w:].mean(dim=(1, 2, 3))], 1)


def halves(left: int, right: int, side: int = 16) -> np.ndarray:
    img = np.empty((side, side), dtype=np.uint8)
    img[:, : side // 2], img[:, side // 2 :] = left, right
    return img


def test_frechet_distance_closed_forms() -> None:
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt s1 - sqrt s2)^2
    #   = (1 + 4) + ((2 - 1)^2 + (3 - 1)^2) = 10
    d = frechet_distance(np.zeros(2), np.diag([4.0, 9.0]), np.array([1.0, 2.0]), np.eye(2))
    assert d == pytest.approx(10.0, abs=1e-9)
    # S1 = [[2, 1], [1, 2]], S2 = diag(1, 4): S1 S2 = [[2, 4], [1, 8]], trace 10, det 12,
    # eigenvalues 5 +- sqrt(13); FID = tr S1 + tr S2 - 2 (sqrt(5 + r) + sqrt(5 - r))
    s1, s2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 4.0])
    r = math.sqrt(13.0)
    want = 4.0 + 5.0 - 2.0 * (math.sqrt(5.0 + r) + math.sqrt(5.0 - r))
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(want, abs=1e-9)
    # identical distributions: 0 (not a negative round-off)
    assert frechet_distance(np.ones(2), s1, np.ones(2), s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_through_a_torchscript_extractor(tmp_path: Path) -> None:
    path = save_extractor(HalfMeans(), tmp_path / "halves.pt", input_size=16, channels=1)
    ex = load_extractor(path)
    assert (ex.input_size, ex.channels, ex.name) == (16, 1, "halves.pt")
    # real: halves (0,0), (1,0), (0,1), (1,1) -> mean (.5, .5), unbiased covariance I/3
    real = image_features(ex, [halves(a, b) for a, b in ((0, 0), (255, 0), (0, 255), (255, 255))])
    # generated: (.2,.2), (.4,.4), (.6,.6) -> mean (.4, .4), covariance .04 [[1, 1], [1, 1]]
    gen = image_features(ex, [halves(v, v) for v in (51, 102, 153)], batch_size=2)
    assert real.shape == (4, 2) and gen.shape == (3, 2)
    # |mu1 - mu2|^2 = .02; tr S1 = 2/3; tr S2 = .08; S1 S2 = S2 / 3, whose square root
    # has trace sqrt(1/3) * sqrt(.08) (S2 has eigenvalues .08 and 0)
    want = 0.02 + 2 / 3 + 0.08 - 2 * math.sqrt(0.08 / 3)
    assert fid(real, gen) == pytest.approx(want, abs=1e-6)
    # three channels: the grey image is repeated, the half means do not change
    ex3 = load_extractor(save_extractor(HalfMeans(), tmp_path / "h3.pt", input_size=16, channels=3))
    assert np.allclose(image_features(ex3, [halves(51, 153)]), [[0.2, 0.6]], atol=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        fid(real[:1], gen)


def test_load_extractor_refuses_what_is_not_torchscript(tmp_path: Path) -> None:
    bad = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_extractor(bad)


def test_default_loader_reads_8_and_16_bit_png(tmp_path: Path) -> None:
    from PIL import Image

    from models.evaluation import load_gray8_pil

    Image.fromarray(halves(10, 200), mode="L").save(tmp_path / "g8.png")
    assert np.array_equal(load_gray8_pil(tmp_path / "g8.png"), halves(10, 200))
    wide = np.zeros((4, 4), dtype=np.uint16)
    wide[:, 2:] = 4000  # 16-bit: scaled min..max to 0..255
    Image.fromarray(wide).save(tmp_path / "g16.png")
    got = load_gray8_pil(tmp_path / "g16.png")
    assert got.dtype == np.uint8 and got[0, 0] == 0 and got[0, 3] == 255
