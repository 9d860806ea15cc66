"""Fréchet Inception Distance (FID) of report -> CXR images against the real test images.

FID (Heusel et al. 2017) compares two image sets through the Gaussian statistics of their
features: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (:func:`frechet_distance`).
LLM-CXR used a TorchXRayVision DenseNet as the feature extractor. Nothing is downloaded
here: the site supplies the extractor as a **TorchScript file** (:func:`load_extractor`)
that maps a float tensor ``[B, C, S, S]`` (C = 1 or 3, values in [0, 1]) to features
``[B, D]``. ``docs/evaluation.md`` shows how to make one from TorchXRayVision on a machine
that has it; :func:`save_extractor` writes one with its input description.

The input description is a JSON file ``cxr_fid.json`` stored inside the TorchScript
archive (``_extra_files``): ``{"input_size": 224, "channels": 1}`` (the defaults when it is
absent). Each image, real or generated, is brought to the model's view as the model sees
it (:func:`models.preprocess.resize_and_crop`: shorter side to ``input_size``, centre
crop), scaled by 1/255 to [0, 1], and repeated to ``channels``.

The matrix square root uses no scipy: ``tr (S1 S2)^(1/2)`` is the sum of the square roots
of the eigenvalues of ``A S2 A`` with ``A = S1^(1/2)`` (symmetric eigen-decompositions;
``S1 S2`` and ``A S2 A`` share their eigenvalues), negative round-off clipped to 0.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.preprocess import resize_and_crop

__all__ = [
    "EXTRA_FILE",
    "FeatureExtractor",
    "fid",
    "frechet_distance",
    "image_features",
    "load_extractor",
    "save_extractor",
]

EXTRA_FILE = "cxr_fid.json"
"""Name of the input description inside the TorchScript archive."""


@dataclass(frozen=True)
class FeatureExtractor:
    """A loaded TorchScript feature extractor and its input description."""

    module: Any
    input_size: int = 224
    channels: int = 1
    name: str = "extractor"
    device: str = "cpu"


def _check_meta(meta: dict[str, Any], where: str) -> tuple[int, int]:
    size, channels = meta.get("input_size", 224), meta.get("channels", 1)
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"{where}: input_size must be an integer >= 8, got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"{where}: channels must be 1 or 3, got {channels!r}")
    return size, channels


def load_extractor(path: Path | str, *, device: str = "cpu") -> FeatureExtractor:
    """Load a TorchScript feature extractor (``torch.jit.load``) and its description.

    Raises
    ------
    ValueError
        The file is not a TorchScript archive, or its description is invalid.
    OSError
        The file cannot be read.
    """
    import torch

    path = Path(path)
    extra = {EXTRA_FILE: ""}
    try:
        with _no_jit_deprecation():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except RuntimeError as exc:
        raise ValueError(f"{path.name}: not a TorchScript file ({type(exc).__name__})") from None
    try:
        meta = json.loads(extra[EXTRA_FILE]) if extra[EXTRA_FILE] else {}
    except json.JSONDecodeError:
        raise ValueError(f"{path.name}: {EXTRA_FILE} is not JSON") from None
    size, channels = _check_meta(meta, path.name)
    module.eval()
    return FeatureExtractor(module, size, channels, path.name, device)


def save_extractor(
    module: Any,
    path: Path | str,
    *,
    input_size: int = 224,
    channels: int = 1,
) -> Path:
    """Write ``module`` as a TorchScript extractor file with its input description.

    A ``torch.nn.Module`` that is not scripted yet is traced with a batch of two
    ``[channels, input_size, input_size]`` inputs.
    """
    import torch

    _check_meta({"input_size": input_size, "channels": channels}, "save_extractor")
    meta = json.dumps({"input_size": input_size, "channels": channels})
    with _no_jit_deprecation():
        if not isinstance(module, torch.jit.ScriptModule):
            example = torch.rand(2, channels, input_size, input_size)
            module = torch.jit.trace(module.eval(), example)
        torch.jit.save(module, str(path), _extra_files={EXTRA_FILE: meta})
    return Path(path)


@contextlib.contextmanager
def _no_jit_deprecation() -> Iterator[None]:
    """Recent torch releases mark TorchScript deprecated (for torch.export) but keep it
    working; the file format asked of sites is TorchScript, so the warning is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        yield


def _batch(
    images: Sequence[npt.NDArray[np.uint8]], ex: FeatureExtractor
) -> npt.NDArray[np.float32]:
    arr = np.stack([resize_and_crop(im, side=ex.input_size) for im in images])
    x = arr.astype(np.float32)[:, None] / np.float32(255.0)
    return np.ascontiguousarray(np.repeat(x, ex.channels, axis=1))


def image_features(
    extractor: FeatureExtractor,
    images: Iterable[npt.NDArray[np.uint8]],
    *,
    batch_size: int = 16,
) -> npt.NDArray[np.float64]:
    """Features ``[N, D]`` (float64) of 8-bit grey images of any size (module docstring)."""
    import torch

    out: list[npt.NDArray[np.float64]] = []
    pending: list[npt.NDArray[np.uint8]] = []

    def flush() -> None:
        x = torch.from_numpy(_batch(pending, extractor)).to(extractor.device)
        with torch.no_grad():
            feats = extractor.module(x)
        f = feats.detach().to("cpu", torch.float64).numpy()
        if f.ndim != 2 or f.shape[0] != len(pending):
            raise ValueError(f"the extractor must return [B, D] features, got {list(f.shape)}")
        out.append(f)
        pending.clear()

    for image in images:
        pending.append(image)
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    if not out:
        return np.zeros((0, 0), dtype=np.float64)
    return np.concatenate(out)


def _sqrt_psd(s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    mu1: npt.NDArray[np.float64],
    s1: npt.NDArray[np.float64],
    mu2: npt.NDArray[np.float64],
    s2: npt.NDArray[np.float64],
) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` of two Gaussians (0 or more)."""
    a = _sqrt_psd(np.asarray(s1, dtype=np.float64))
    m = a @ np.asarray(s2, dtype=np.float64) @ a
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def fid(real: npt.NDArray[np.float64], generated: npt.NDArray[np.float64]) -> float:
    """FID of two feature sets ``[N, D]`` (sample means, unbiased sample covariances).

    Raises
    ------
    ValueError
        Fewer than two rows in a set, or different feature sizes.
    """
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"FID needs [N, D] features of one D, got {real.shape}, {generated.shape}")
    if len(real) < 2 or len(generated) < 2:
        raise ValueError("FID needs at least two images in each set")
    return frechet_distance(
        real.mean(axis=0),
        np.atleast_2d(np.cov(real, rowvar=False)),
        generated.mean(axis=0),
        np.atleast_2d(np.cov(generated, rowvar=False)),
    )
