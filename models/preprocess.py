"""Array-level pre- and post-processing around the VQ-GAN (no DICOM here).

``integration/`` turns DICOM pixel data into an 8-bit, MIMIC-CXR-JPG-like grey image;
this module does what LLM-CXR's training pipeline did to those JPEGs: grey -> RGB
(replicated), shorter side -> 256 with Lanczos, centre crop 256x256, scale to [-1, 1].
The resize and crop follow torchvision's ``Resize(256)`` / ``CenterCrop(256)``
arithmetic (long side ``int(256 * long / short)``, crop offset ``round((n - 256) / 2)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = [
    "MAX_ASPECT_RATIO",
    "MODEL_SIDE",
    "resize_and_crop",
    "to_model_batch",
    "to_model_input",
    "to_uint8_image",
    "to_uint8_images",
]

#: Side of the square model input in pixels.
MODEL_SIDE = 256

#: Longest over shortest side accepted by :func:`resize_and_crop`. A chest radiograph is
#: about 1.2:1 (35 x 43 cm detectors); the resize scales the long side with the short one,
#: so a 1 x 65535 image (128 KiB of pixel data) would become 256 x 16776960 pixels, 4 GiB,
#: before the crop.
MAX_ASPECT_RATIO = 16


def _check_gray8(gray8: object, what: str = "image") -> npt.NDArray[np.uint8]:
    if not isinstance(gray8, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(gray8).__name__}")
    if gray8.dtype != np.uint8:
        raise TypeError(
            f"{what} must be uint8 (8-bit grey from the DICOM conversion), got {gray8.dtype}"
        )
    if gray8.ndim != 2:
        raise ValueError(f"{what} must be 2-D [rows, columns] grey, got shape {gray8.shape}")
    if gray8.size == 0 or min(gray8.shape) == 0:
        raise ValueError(f"{what} is empty: shape {gray8.shape}")
    return gray8


def resize_and_crop(
    gray8: npt.NDArray[np.uint8], *, side: int = MODEL_SIDE
) -> npt.NDArray[np.uint8]:
    """Resize the shorter side to ``side`` (PIL Lanczos) and centre-crop ``side x side``.

    Parameters
    ----------
    gray8 : ndarray of uint8, shape (rows, columns)
        Grey image.
    side : int
        Output side in pixels.

    Returns
    -------
    ndarray of uint8, shape (side, side)

    Raises
    ------
    ValueError
        ``side`` < 1, or the long side is more than :data:`MAX_ASPECT_RATIO` times the
        short one (not a radiograph; its resize would take gigabytes).
    """
    img = _check_gray8(gray8)
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    h, w = img.shape
    if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
        raise ValueError(
            f"image is {h} x {w} pixels: its aspect ratio exceeds {MAX_ASPECT_RATIO}:1, "
            "not a radiograph"
        )
    if h <= w:
        new_h, new_w = side, max(side, int(side * w / h))
    else:
        new_h, new_w = max(side, int(side * h / w)), side
    pil = Image.fromarray(np.ascontiguousarray(img), mode="L")
    if (new_w, new_h) != (w, h):
        pil = pil.resize((new_w, new_h), resample=Image.Resampling.LANCZOS)
    top = round((new_h - side) / 2.0)
    left = round((new_w - side) / 2.0)
    out = np.asarray(pil.crop((left, top, left + side, top + side)), dtype=np.uint8)
    return out


def to_model_input(gray8: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """8-bit grey CXR -> VQ-GAN input ``float32[3, 256, 256]`` in [-1, 1].

    Grey is replicated to three channels (the VQ-GAN was trained on RGB-converted
    MIMIC-CXR-JPG images), the shorter side is resized to 256 with Lanczos, the
    centre 256x256 is kept and ``v / 127.5 - 1`` maps 0..255 to [-1, 1].

    Parameters
    ----------
    gray8 : ndarray of uint8, shape (rows, columns)
        Output of the DICOM -> 8-bit conversion (windowed, MONOCHROME2, equalised).

    Returns
    -------
    ndarray of float32, shape (3, 256, 256)

    Raises
    ------
    TypeError
        Not a numpy array or not uint8.
    ValueError
        Not 2-D, empty, or longer than :data:`MAX_ASPECT_RATIO` times its width (or the
        other way round).
    """
    sq = resize_and_crop(gray8, side=MODEL_SIDE).astype(np.float32)
    x = sq / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(np.broadcast_to(x, (3, MODEL_SIDE, MODEL_SIDE)), dtype=np.float32)


def to_model_batch(images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
    """Several 8-bit grey images -> ``float32[B, 3, 256, 256]`` (see :func:`to_model_input`).

    Raises
    ------
    ValueError
        ``images`` is empty, or an element fails :func:`to_model_input` (index named).
    """
    if len(images) == 0:
        raise ValueError("to_model_batch needs at least one image")
    out = np.empty((len(images), 3, MODEL_SIDE, MODEL_SIDE), dtype=np.float32)
    for i, img in enumerate(images):
        try:
            out[i] = to_model_input(img)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"image {i}: {exc}") from exc
    return out


def to_uint8_images(x: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """Decoder output ``[B, 3, H, W]`` -> 8-bit grey ``[B, H, W]``.

    Each value is clipped to [-1, 1], mapped by ``(x + 1) / 2 * 255`` and rounded; the
    grey value is the **mean of the three channels** (the model was trained on grey
    replicated to RGB, so the channels agree up to decoder noise and the mean is the
    least noisy estimate). Non-finite values are an error.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"decoder output must be a numpy array, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"decoder output must be floating point, got {x.dtype}")
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"decoder output must be [batch, 3, H, W], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("decoder output contains NaN or infinite values")
    grey = np.clip(x.astype(np.float32), -1.0, 1.0).mean(axis=1)
    return np.rint((grey + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def to_uint8_image(x: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """Decoder output ``[3, 256, 256]`` -> 8-bit grey ``[256, 256]``.

    See :func:`to_uint8_images` for the mapping (clip, ``(x + 1) / 2 * 255``, round,
    mean over channels).
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"decoder output must be a numpy array, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"decoder output must be [3, H, W], got shape {x.shape}")
    return to_uint8_images(x[None])[0]
