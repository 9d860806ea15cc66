"""Array preprocessing: 8-bit grey -> model input, decoder output -> 8-bit grey."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from models.preprocess import (
    resize_and_crop,
    to_model_batch,
    to_model_input,
    to_uint8_image,
    to_uint8_images,
)


def _three_bands(rows: int, cols: int, *, horizontal: bool) -> npt.NDArray[np.uint8]:
    """Black first quarter, grey 128 middle half, white last quarter (along the long axis)."""
    n = cols if horizontal else rows
    line = np.full(n, 128, np.uint8)
    line[: n // 4] = 0
    line[n - n // 4 :] = 255
    return np.tile(line, (rows, 1)) if horizontal else np.tile(line[:, None], (1, cols))


@pytest.mark.parametrize("horizontal", [True, False])
def test_non_square_input_keeps_the_centre(horizontal: bool) -> None:
    # 300 x 600 (or 600 x 300): shorter side -> 256, long side -> 512, centre 256 kept,
    # which is exactly the middle half of the original: the grey band.
    img = (
        _three_bands(300, 600, horizontal=horizontal)
        if horizontal
        else _three_bands(600, 300, horizontal=False)
    )
    out = resize_and_crop(img)
    assert out.shape == (256, 256) and out.dtype == np.uint8
    inner = out[:, 4:-4] if horizontal else out[4:-4, :]
    assert np.all(np.abs(inner.astype(int) - 128) <= 1)
    # the bands just outside the crop leak in only through the Lanczos kernel at the edges
    first = out[:, 0] if horizontal else out[0, :]
    last = out[:, -1] if horizontal else out[-1, :]
    assert np.all(first < 128) and np.all(last > 128)


def test_off_centre_marker_lands_where_the_geometry_says() -> None:
    # 400 rows x 1000 columns; a bright 8-column stripe centred at column 600.
    img = np.zeros((400, 1000), np.uint8)
    img[:, 596:604] = 255
    out = resize_and_crop(img)
    # scale 256/400 = 0.64; width int(640) -> crop left round((640-256)/2) = 192;
    # stripe centre (continuous coordinate 600) -> 600 * 0.64 - 192 = 192.0
    profile = out.astype(float).mean(axis=0)
    centroid = float((profile * (np.arange(256) + 0.5)).sum() / profile.sum())
    assert abs(centroid - 192.0) <= 0.5
    assert profile[:150].max() < 10


def test_small_and_square_inputs() -> None:
    up = resize_and_crop(np.full((50, 100), 77, np.uint8))
    assert up.shape == (256, 256) and np.all(np.abs(up.astype(int) - 77) <= 1)
    sq = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    np.testing.assert_array_equal(resize_and_crop(sq), sq)  # no resampling at 256x256


@pytest.mark.parametrize("shape", [(1, 4097), (4097, 1), (3, 4096)])
def test_degenerate_aspect_ratio_refused_before_resizing(shape: tuple[int, int]) -> None:
    # 8 KiB of pixels would be resized to 256 x 1048832 (256 MiB) before the crop; a
    # 1 x 65535 image, 128 KiB in a DICOM file, to 4 GiB. No radiograph is that shape.
    with pytest.raises(ValueError, match=r"aspect ratio exceeds 16:1"):
        resize_and_crop(np.zeros(shape, np.uint8))


def test_wide_but_plausible_images_still_accepted() -> None:
    assert resize_and_crop(np.zeros((100, 1600), np.uint8)).shape == (256, 256)
    assert to_model_input(np.zeros((1600, 100), np.uint8)).shape == (3, 256, 256)


def test_model_input_range_dtype_and_channels() -> None:
    x = to_model_input(np.zeros((512, 400), np.uint8))
    assert x.shape == (3, 256, 256) and x.dtype == np.float32
    assert np.all(x == -1.0)
    x = to_model_input(np.full((300, 300), 255, np.uint8))
    assert np.allclose(x, 1.0)
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    x = to_model_input(ramp)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(x[0, 0, :3], [-1.0, -1.0 + 1 / 127.5, -1.0 + 2 / 127.5], atol=1e-6)
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])


def test_model_batch(nih_gray8: list[npt.NDArray[np.uint8]]) -> None:
    b = to_model_batch(nih_gray8)
    assert b.shape == (2, 3, 256, 256) and b.dtype == np.float32
    assert -1.0 <= b.min() < b.max() <= 1.0
    np.testing.assert_array_equal(b[1], to_model_input(nih_gray8[1]))
    with pytest.raises(ValueError, match="at least one"):
        to_model_batch([])
    with pytest.raises(TypeError, match=r"image 1: .*uint8"):
        to_model_batch([nih_gray8[0], nih_gray8[1].astype(np.uint16)])


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (np.zeros((10, 10), np.uint16), TypeError, "uint8"),
        (np.zeros((10, 10), np.float32), TypeError, "uint8"),
        (np.zeros((10, 10, 3), np.uint8), ValueError, "2-D"),
        (np.zeros((10,), np.uint8), ValueError, "2-D"),
        (np.zeros((0, 10), np.uint8), ValueError, "empty"),
        ([[0, 1], [2, 3]], TypeError, "numpy array"),
    ],
)
def test_model_input_errors(bad: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        to_model_input(bad)  # type: ignore[arg-type]


def test_uint8_image_mapping() -> None:
    x = np.zeros((3, 256, 256), np.float32)
    x[:, 0, 0] = -1.0
    x[:, 0, 1] = 1.0
    x[:, 0, 2] = 5.0  # clipped to 1
    x[:, 0, 3] = -7.0  # clipped to -1
    x[:, 0, 4] = [-1.0, 1.0, 0.0]  # grey = channel mean = 0 -> 127.5 -> 128
    x[:, 0, 5] = 0.5  # 0.75 * 255 = 191.25 -> 191
    g = to_uint8_image(x)
    assert g.shape == (256, 256) and g.dtype == np.uint8
    assert list(g[0, :6]) == [0, 255, 255, 0, 128, 191]
    assert g[100, 100] == 128


def test_uint8_image_errors() -> None:
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        to_uint8_image(np.zeros((256, 256), np.float32))
    with pytest.raises(TypeError, match="floating"):
        to_uint8_image(np.zeros((3, 256, 256), np.uint8))
    bad = np.zeros((3, 8, 8), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_image(bad)
    with pytest.raises(ValueError, match=r"\[batch, 3, H, W\]"):
        to_uint8_images(np.zeros((2, 1, 8, 8), np.float32))
