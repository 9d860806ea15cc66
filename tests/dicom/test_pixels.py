"""DICOM pixel data -> MIMIC-like 8-bit grey (integration.pixels) on real chest X-rays."""

from __future__ import annotations

import copy
import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from integration.errors import (
    MultiFrameError,
    PixelDataError,
    UnsupportedPhotometricError,
)
from integration.pixels import convert_to_gray8, equalize_histogram, to_gray8
from tests.dicom.conftest import make_grey_dataset, which_or_skip
from tests.helpers import rg1_file

# Measured on RG1_J2KI vs RG1_UNCR (mean |difference| of the final 8-bit output): 1.32
J2KI_MEAN_ABS_TOLERANCE = 3.0


@pytest.fixture(scope="module")
def uncr_gray(rg1_uncr: Dataset) -> np.ndarray:
    return to_gray8(rg1_uncr)


def test_rg1_output_shape_type_and_inversion(rg1_uncr: Dataset, uncr_gray: np.ndarray) -> None:
    conv = convert_to_gray8(rg1_uncr)
    assert conv.pixels.dtype == np.uint8
    assert conv.pixels.shape == (rg1_uncr.Rows, rg1_uncr.Columns)
    assert conv.photometric_interpretation == "MONOCHROME1"
    assert conv.inverted is True
    assert conv.voi_source == "window"  # RG1 carries Window Center/Width
    np.testing.assert_array_equal(conv.pixels, uncr_gray)
    # Equalised: the histogram spans the full 8-bit range.
    assert uncr_gray.min() == 0 and uncr_gray.max() == 255
    # MONOCHROME1 inverted: raw low values (dense: bone, mediastinum) come out bright.
    raw = rg1_uncr.pixel_array
    low, high = raw < np.percentile(raw, 10), raw > np.percentile(raw, 90)
    assert uncr_gray[low].mean() > 200 > 50 > uncr_gray[high].mean()


def test_j2k_lossless_identical(uncr_gray: np.ndarray) -> None:
    j2kr = pydicom.dcmread(rg1_file("RG1_J2KR.dcm"))
    assert j2kr.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    np.testing.assert_array_equal(to_gray8(j2kr), uncr_gray)


def test_j2k_lossy_within_tolerance(uncr_gray: np.ndarray) -> None:
    j2ki = pydicom.dcmread(rg1_file("RG1_J2KI.dcm"))
    assert j2ki.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"
    diff = np.abs(to_gray8(j2ki).astype(np.int16) - uncr_gray.astype(np.int16))
    mean_abs = float(diff.mean())
    assert 0 < mean_abs < J2KI_MEAN_ABS_TOLERANCE, mean_abs
    assert float(np.percentile(diff, 99)) <= 12


def test_rle_variant_identical(rg1_uncr: Dataset, uncr_gray: np.ndarray) -> None:
    rle = copy.deepcopy(rg1_uncr)
    rle.compress(RLELossless)
    assert rle.file_meta.TransferSyntaxUID == RLELossless
    assert rle["PixelData"].is_undefined_length
    np.testing.assert_array_equal(to_gray8(rle), uncr_gray)


def test_rle_with_fewer_columns_than_encoded_is_a_pixel_data_error(rg1_uncr: Dataset) -> None:
    # Columns (0028,0011) below the RLE segments' width (PS3.5 G.3.1): pylibjpeg-rle panics
    # in Rust, and pyo3's PanicException is a BaseException, not an Exception
    rle = copy.deepcopy(rg1_uncr)
    rle.compress(RLELossless)
    rle.Columns = int(rle.Columns) - 841
    with pytest.raises(PixelDataError, match="cannot decode") as info:
        to_gray8(rle)
    assert info.value.attribute == "Pixel Data (7FE0,0010)"


@pytest.mark.parametrize(
    ("rows", "columns"), [(1955, 1000), (1000, 1841), (1841, 1955)], ids=["cols", "rows", "swap"]
)
def test_jpeg_ls_rows_columns_contradicting_the_frame_header_refused(
    rg1_uncr: Dataset, rows: int, columns: int
) -> None:
    # RG1 is 1955 x 1841. pyjpegls returned the codestream's samples in whatever shape the
    # header asked for (a scrambled or cropped chest); DCMTK refuses such a file.
    jls = copy.deepcopy(rg1_uncr)
    jls.compress(JPEGLSLossless)
    jls.Rows, jls.Columns = rows, columns
    with pytest.raises(PixelDataError, match=r"JPEG frame header is 1955 x 1841") as info:
        to_gray8(jls)
    assert info.value.attribute == "Pixel Data (7FE0,0010)"


def test_jpeg_ls_variant_identical(rg1_uncr: Dataset, uncr_gray: np.ndarray) -> None:
    jls = copy.deepcopy(rg1_uncr)
    jls.compress(JPEGLSLossless)
    np.testing.assert_array_equal(to_gray8(jls), uncr_gray)


def test_jpeg_lossless_variant_identical(tmp_path: Path, uncr_gray: np.ndarray) -> None:
    gdcmconv = which_or_skip("gdcmconv")
    out = tmp_path / "rg1_jpegll.dcm"
    subprocess.run([gdcmconv, "--jpeg", str(rg1_file()), str(out)], check=True, timeout=120)
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID in (JPEGLosslessSV1, "1.2.840.10008.1.2.4.57")
    try:
        result = to_gray8(ds)
    except PixelDataError as exc:
        pytest.skip(f"no JPEG lossless decoder (python-gdcm): {exc}")
    np.testing.assert_array_equal(result, uncr_gray)


def _jpeg_dataset(pixels: np.ndarray, *, quality: int = 95) -> tuple[Dataset, bytes]:
    """Encode with Pillow (JPEG baseline) and encapsulate (PS3.5 A.4)."""
    buffer = io.BytesIO()
    mode = "L" if pixels.ndim == 2 else "RGB"
    Image.fromarray(pixels, mode=mode).save(buffer, format="JPEG", quality=quality)
    if pixels.ndim == 2:
        ds = make_grey_dataset(pixels)
    else:
        ds = make_grey_dataset(pixels[..., 0])
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds, buffer.getvalue()


def test_jpeg_baseline_variant(nih_gray: np.ndarray) -> None:
    ds, jpeg = _jpeg_dataset(nih_gray)
    reference = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.uint8)
    expected = to_gray8(make_grey_dataset(reference))
    got = to_gray8(ds)
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    # Decoders (GDCM vs Pillow/libjpeg-turbo IDCT) may differ by a grey level here and there.
    assert float(diff.mean()) < 1.0


def test_colour_secondary_capture_to_grey(nih_gray: np.ndarray) -> None:
    rgb = np.repeat(nih_gray[..., None], 3, axis=-1)
    ds, _ = _jpeg_dataset(rgb)
    conv = convert_to_gray8(ds)
    assert conv.voi_source == "full_range"
    assert conv.pixels.shape == nih_gray.shape
    expected = to_gray8(make_grey_dataset(nih_gray), percentiles=(0.0, 100.0))
    assert float(np.abs(conv.pixels.astype(np.int16) - expected).mean()) < 3.0


def test_palette_color_to_grey(nih_gray: np.ndarray) -> None:
    ds = make_grey_dataset(nih_gray, photometric="PALETTE COLOR")
    ramp = (np.arange(256, dtype=np.uint16) * 257).tolist()  # 16-bit grey palette
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(ramp, "<u2").tobytes())
    conv = convert_to_gray8(ds, equalize=False)
    assert conv.voi_source == "full_range"
    assert int(np.abs(conv.pixels.astype(np.int16) - nih_gray).max()) <= 1


def test_monochrome2_not_inverted(nih_gray: np.ndarray) -> None:
    conv = convert_to_gray8(make_grey_dataset(nih_gray))
    assert conv.inverted is False
    assert conv.voi_source == "percentile"
    out = conv.pixels.ravel().astype(np.int16)
    order = np.argsort(nih_gray.ravel(), kind="stable")
    # Bright stays bright: output is a non-decreasing function of the input.
    assert np.all(np.diff(out[order]) >= 0)
    bright, dark = nih_gray > np.percentile(nih_gray, 90), nih_gray < np.percentile(nih_gray, 10)
    assert conv.pixels[bright].mean() > 200 and conv.pixels[dark].mean() < 50


def test_monochrome1_inverted(nih_gray: np.ndarray) -> None:
    mono2 = to_gray8(make_grey_dataset(nih_gray))
    mono1 = to_gray8(make_grey_dataset(nih_gray, photometric="MONOCHROME1"))
    out = mono1.ravel().astype(np.int16)
    order = np.argsort(nih_gray.ravel(), kind="stable")
    assert np.all(np.diff(out[order]) <= 0)  # non-increasing: inverted
    corr = np.corrcoef(mono1.ravel().astype(float), mono2.ravel().astype(float))[0, 1]
    assert corr < -0.98
    bright = nih_gray > np.percentile(nih_gray, 90)
    assert mono1[bright].mean() < 50


def test_missing_voi_uses_percentile_window(rg1_uncr: Dataset) -> None:
    ds = copy.deepcopy(rg1_uncr)
    del ds.WindowCenter
    del ds.WindowWidth
    conv = convert_to_gray8(ds, equalize=False)
    assert conv.voi_source == "percentile"
    raw = ds.pixel_array.astype(np.float64)
    lo, hi = np.percentile(raw, [0.5, 99.5])
    assert conv.window == pytest.approx((lo, hi))
    # MONOCHROME1: the darkest 0.5 % of raw values become white (255) and vice versa.
    frac_white = float((conv.pixels == 255).mean())
    frac_black = float((conv.pixels == 0).mean())
    assert 0.003 < frac_white < 0.01 and 0.003 < frac_black < 0.01
    # Differs from the windowed conversion (window = full 0..30000 range).
    assert not np.array_equal(conv.pixels, to_gray8(rg1_uncr, equalize=False))


def test_window_linear_matches_ps33_formula() -> None:
    ramp = np.arange(0, 4096, dtype=np.uint16).reshape(64, 64)
    ds = make_grey_dataset(ramp, bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    conv = convert_to_gray8(ds, equalize=False)
    assert conv.voi_source == "window"
    flat = conv.pixels.ravel()
    c, w = 2048, 1024
    assert flat[: int(c - 0.5 - (w - 1) / 2)].max() == 0
    assert flat[int(c - 0.5 + (w - 1) / 2) + 1 :].min() == 255
    assert abs(int(flat[c]) - 128) <= 1
    assert np.all(np.diff(flat.astype(np.int16)) >= 0)


def test_rescale_and_multiple_windows_first_used() -> None:
    ramp = np.arange(0, 4096, dtype=np.uint16).reshape(64, 64)
    ds = make_grey_dataset(
        ramp,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=[3096, 100],
        WindowWidth=[2048, 10],
    )
    conv = convert_to_gray8(ds, equalize=False)
    # modality value = 2 x - 1000; window 3096 +/- 1024 (first pair) -> raw 1536..2560
    assert conv.window == pytest.approx((3096 - 0.5 - 2047 / 2, 3096 - 0.5 + 2047 / 2))
    flat = conv.pixels.ravel()
    assert flat[1500] == 0 and flat[2600] == 255 and 100 < flat[2048] < 156


def test_voi_lut_sequence_applied() -> None:
    ramp = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    lut = np.clip(np.arange(256) * 2, 0, 255).astype(np.uint8)  # saturates above 127
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    ds = make_grey_dataset(ramp, VOILUTSequence=[item])
    conv = convert_to_gray8(ds, equalize=False)
    assert conv.voi_source == "voi_lut"
    flat = conv.pixels.ravel()
    assert flat[127] == 254 and flat[200] == 255 and flat[10] == 20


def test_equalize_histogram_flat_and_monotonic() -> None:
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(100, 10, size=(200, 200)), 0, 255).astype(np.uint8)
    eq = equalize_histogram(img)
    assert eq.min() == 0 and eq.max() == 255
    order = np.argsort(img.ravel(), kind="stable")
    assert np.all(np.diff(eq.ravel()[order].astype(np.int16)) >= 0)
    # Roughly uniform: each quarter of the range holds ~25 % of the pixels.
    quarters = np.histogram(eq, bins=4, range=(0, 256))[0] / eq.size
    assert np.all(np.abs(quarters - 0.25) < 0.06)
    const = np.full((4, 4), 7, np.uint8)
    np.testing.assert_array_equal(equalize_histogram(const), const)


# --- bad pixel data -------------------------------------------------------------------------


def test_missing_pixel_data(rg1_header: Dataset) -> None:
    with pytest.raises(PixelDataError, match=r"Pixel Data \(7FE0,0010\)") as info:
        to_gray8(rg1_header)
    assert info.value.attribute == "Pixel Data (7FE0,0010)"
    assert info.value.dicom_status == 0xC000 and info.value.http_status == 422


def test_truncated_pixel_data(nih_gray: np.ndarray) -> None:
    ds = make_grey_dataset(nih_gray)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(PixelDataError, match="Pixel Data"):
        to_gray8(ds)


def _modality_lut_item(entries: int, data: list[int] | None) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [entries, 0, 16]
    item.ModalityLUTType = "US"
    if data is not None:
        item.LUTData = data
        item["LUTData"].VR = "US"
    return item


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(_modality_lut_item(4096, None), id="no LUT Data"),
        pytest.param(_modality_lut_item(4096, list(range(16))), id="LUT Data shorter"),
    ],
)
def test_broken_modality_lut_sequence_names_it(nih_gray: np.ndarray, item: Dataset) -> None:
    # PS3.3 C.11.1: LUT Data (0028,3006) is Type 1 and holds LUT Descriptor[0] entries
    ds = make_grey_dataset(nih_gray, ModalityLUTSequence=[item])
    with pytest.raises(PixelDataError, match="cannot apply") as info:
        to_gray8(ds)
    assert info.value.attribute == "Modality LUT Sequence (0028,3000)"


def test_undecodable_jpeg2000(rg1_file_j2k: Dataset) -> None:
    ds = rg1_file_j2k
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    with pytest.raises(PixelDataError, match="cannot decode"):
        to_gray8(ds)


@pytest.fixture
def rg1_file_j2k() -> Dataset:
    return pydicom.dcmread(rg1_file("RG1_J2KR.dcm"))


def test_unsupported_photometric(nih_gray: np.ndarray) -> None:
    ds = make_grey_dataset(nih_gray, photometric="HSV")
    with pytest.raises(UnsupportedPhotometricError, match=r"Photometric Interpretation"):
        to_gray8(ds)


def test_multiframe_refused_unless_frame_given(nih_gray: np.ndarray) -> None:
    frames = np.stack([nih_gray, 255 - nih_gray])
    ds = make_grey_dataset(nih_gray)
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    with pytest.raises(MultiFrameError, match=r"Number of Frames"):
        to_gray8(ds)
    np.testing.assert_array_equal(to_gray8(ds, frame=0), to_gray8(make_grey_dataset(nih_gray)))
    with pytest.raises(MultiFrameError):
        to_gray8(ds, frame=2)


def test_constant_image_refused() -> None:
    ds = make_grey_dataset(np.full((32, 32), 17, np.uint8))
    with pytest.raises(PixelDataError, match="constant"):
        to_gray8(ds)
