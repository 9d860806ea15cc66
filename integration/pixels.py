"""DICOM pixel data -> 8-bit grey image, the way MIMIC-CXR-JPG was made.

LLM-CXR was trained on MIMIC-CXR-JPG, whose JPEGs were made from the DICOM images by
windowing the raw values to 8 bit, inverting MONOCHROME1 and histogram-equalising. A DICOM
node must do the same conversion or its inputs are out of distribution. The pipeline
(:func:`convert_to_gray8`) is:

1. **Decode** Pixel Data (7FE0,0010) of one frame (PS3.3 C.7.6.3 Image Pixel module; PS3.5
   Annex A transfer syntaxes): native, RLE Lossless, JPEG baseline/extended (Pillow or GDCM),
   JPEG lossless process 14 (GDCM: ``python-gdcm``), JPEG 2000 (pylibjpeg-openjpeg),
   JPEG-LS (pyjpegls if installed). Colour images (RGB, YBR_*) are converted to RGB by
   the decoder and then to grey with the ITU-R BT.601 luma weights; PALETTE COLOR is expanded
   through its palette first (C.7.6.3.1.5). Rows and Columns must agree with the frame
   header of JPEG and JPEG-LS data (PS3.5 8.2). Multi-frame images raise
   :class:`~integration.errors.MultiFrameError` unless a frame index is given.
2. **Modality LUT** (PS3.3 C.11.1): Rescale Slope/Intercept (0028,1053/1052) or the Modality
   LUT Sequence (0028,3000), via :func:`pydicom.pixels.apply_modality_lut`.
3. **VOI LUT** (PS3.3 C.11.2), choosing the first of several:
   a. VOI LUT Sequence (0028,3010), first item, via :func:`pydicom.pixels.processing.apply_voi`,
      normalised by the LUT's output range;
   b. else Window Center/Width (0028,1050/1051), first pair, with VOI LUT Function
      (0028,1056) LINEAR (default), LINEAR_EXACT or SIGMOID as defined in C.11.2.1.2
      (written out here because the standard's formulas map straight to [0, 1]);
   c. else a robust percentile window (default 0.5 %..99.5 % of the modality values).
   For DX images "for presentation" (PS3.3 C.8.11.3, C.8.11.7) the VOI attributes are
   mandatory and used as sent; DX "for processing" images usually carry none and take (c).
4. **Photometric Interpretation** (0028,0004): MONOCHROME1 (minimum value = white) is
   inverted so that the output is always MONOCHROME2 (bright = dense).
5. **8 bit**: round(x * 255).
6. **Histogram equalisation** (global, 256 bins, the classic cumulative-histogram mapping),
   in numpy.

The output is a ``uint8`` array of shape ``(Rows, Columns)``. Every failure raises a
:class:`~integration.errors.PixelDataError` (or subclass) naming the DICOM attribute at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_voi
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import (
    UID,
    ImplicitVRLittleEndian,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from integration.errors import MultiFrameError, PixelDataError, UnsupportedPhotometricError

__all__ = [
    "Gray8Conversion",
    "VoiSource",
    "convert_to_gray8",
    "equalize_histogram",
    "to_gray8",
]

VoiSource = Literal["voi_lut", "window", "percentile", "full_range"]

PIXEL_DATA = "Pixel Data (7FE0,0010)"
PHOTOMETRIC = "Photometric Interpretation (0028,0004)"
TRANSFER_SYNTAX = "Transfer Syntax UID (0002,0010)"
NUMBER_OF_FRAMES = "Number of Frames (0028,0008)"
WINDOW = "Window Center/Width (0028,1050/1051)"
VOI_LUT_FUNCTION = "VOI LUT Function (0028,1056)"
VOI_LUT_SEQUENCE = "VOI LUT Sequence (0028,3010)"
MODALITY_LUT_SEQUENCE = "Modality LUT Sequence (0028,3000)"
RESCALE = "Rescale Slope/Intercept (0028,1053/1052)"

_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420", "PALETTE COLOR"}
)
_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)
# Transfer syntaxes whose frames start with a JPEG (ISO 10918-1) or JPEG-LS (ISO 14495-1)
# frame header
_JPEG_FAMILY = frozenset([*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes])


@dataclass(frozen=True, slots=True)
class Gray8Conversion:
    """Result of :func:`convert_to_gray8`: the image and how it was made.

    Attributes
    ----------
    pixels
        ``uint8`` array ``(Rows, Columns)``, MONOCHROME2 sense (bright = dense).
    photometric_interpretation
        Photometric Interpretation of the source (0028,0004).
    voi_source
        ``"voi_lut"`` (VOI LUT Sequence), ``"window"`` (Window Center/Width),
        ``"percentile"`` (no VOI attributes: robust window) or ``"full_range"`` (colour input
        already in presentation values).
    window
        ``(lower, upper)`` modality values mapped to 0 and 255 for ``"window"`` and
        ``"percentile"``; ``None`` otherwise.
    inverted
        Whether MONOCHROME1 inversion was applied.
    equalized
        Whether histogram equalisation was applied.
    frame
        Frame index that was converted (0 for single-frame images).
    """

    pixels: npt.NDArray[np.uint8]
    photometric_interpretation: str
    voi_source: VoiSource
    window: tuple[float, float] | None
    inverted: bool
    equalized: bool
    frame: int


def to_gray8(
    ds: Dataset,
    *,
    frame: int | None = None,
    equalize: bool = True,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> npt.NDArray[np.uint8]:
    """Convert a single-frame grey (or colour) DICOM image to a MIMIC-like 8-bit grey image.

    See the module docstring for the pipeline (PS3.3 C.7.6.3, C.11.1, C.11.2, C.8.11).

    Parameters
    ----------
    ds
        The image's dataset, with Pixel Data (and its file meta for compressed data).
    frame
        Frame index for multi-frame images; ``None`` (default) refuses multi-frame images.
    equalize
        Apply histogram equalisation (default ``True``, as MIMIC-CXR-JPG).
    percentiles
        Lower and upper percentile of the robust window used when no VOI is present.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(Rows, Columns)``.

    Raises
    ------
    integration.errors.PixelDataError
        Missing, truncated, undecodable or constant pixel data; unsupported photometric
        interpretation (:class:`~integration.errors.UnsupportedPhotometricError`); a
        multi-frame image without ``frame`` (:class:`~integration.errors.MultiFrameError`).
    """
    return convert_to_gray8(ds, frame=frame, equalize=equalize, percentiles=percentiles).pixels


def convert_to_gray8(
    ds: Dataset,
    *,
    frame: int | None = None,
    equalize: bool = True,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> Gray8Conversion:
    """Like :func:`to_gray8` but also report how the image was windowed.

    Parameters
    ----------
    ds, frame, equalize, percentiles
        See :func:`to_gray8`.

    Returns
    -------
    Gray8Conversion
        The image and the conversion details (VOI source, window, inversion).
    """
    lo_pct, hi_pct = percentiles
    if not 0.0 <= lo_pct < hi_pct <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    photometric = _photometric(ds)
    index = _frame_index(ds, frame)
    decoded, decoded_photometric = _decode(ds, index)

    window: tuple[float, float] | None
    if photometric in _MONOCHROME:
        if decoded.ndim != 2:
            raise PixelDataError(
                f"expected one sample per pixel for {photometric}, decoded shape {decoded.shape}",
                attribute="Samples per Pixel (0028,0002)",
            )
        values = _apply_modality_lut(decoded, ds)
        unit, voi_source, window = _apply_voi(values, ds, percentiles)
        inverted = photometric == "MONOCHROME1"
        if inverted:
            unit = 1.0 - unit
    else:
        unit = _colour_to_unit(decoded, ds, photometric, decoded_photometric)
        voi_source, window, inverted = "full_range", None, False

    gray = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    if equalize:
        gray = equalize_histogram(gray)
    return Gray8Conversion(
        pixels=np.ascontiguousarray(gray),
        photometric_interpretation=photometric,
        voi_source=voi_source,
        window=window,
        inverted=inverted,
        equalized=equalize,
        frame=index,
    )


def equalize_histogram(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Global histogram equalisation of an 8-bit image (cumulative-histogram mapping).

    ``lut[v] = round((cdf[v] - cdf_min) / (N - cdf_min) * 255)`` with ``cdf_min`` the
    cumulative count of the darkest occupied bin; a constant image is returned unchanged.

    Parameters
    ----------
    image
        ``uint8`` array of any shape.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of the same shape; a monotonic non-decreasing function of the input.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"equalize_histogram needs uint8 input, got {image.dtype}")
    hist = np.bincount(image.ravel(), minlength=256)
    cdf = np.cumsum(hist)
    total = int(cdf[-1])
    cdf_min = int(cdf[np.flatnonzero(hist)[0]]) if total else 0
    if total == cdf_min:
        return image.copy()
    lut = np.rint((cdf - cdf_min) / (total - cdf_min) * 255.0)
    lut = np.clip(lut, 0, 255).astype(np.uint8)
    return lut[image]


# --- steps ----------------------------------------------------------------------------------


def _photometric(ds: Dataset) -> str:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise PixelDataError(
                "float pixel data is not a projection radiograph", attribute=PIXEL_DATA
            )
        raise PixelDataError("missing (no image in this instance)", attribute=PIXEL_DATA)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not photometric:
        raise PixelDataError("missing", attribute=PHOTOMETRIC)
    if photometric not in _MONOCHROME and photometric not in _COLOUR:
        raise UnsupportedPhotometricError(
            f"{photometric!r} is not supported (MONOCHROME1, MONOCHROME2, RGB, YBR_*, "
            "PALETTE COLOR are)",
            attribute=PHOTOMETRIC,
        )
    return photometric


def _frame_index(ds: Dataset, frame: int | None) -> int:
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise PixelDataError(f"not an integer: {exc}", attribute=NUMBER_OF_FRAMES) from exc
    if frame is None:
        if n_frames > 1:
            raise MultiFrameError(
                f"{n_frames} frames; a chest radiograph has one (pass frame= to pick one)",
                attribute=NUMBER_OF_FRAMES,
            )
        return 0
    if not 0 <= frame < n_frames:
        raise MultiFrameError(
            f"frame {frame} out of range (image has {n_frames})", attribute=NUMBER_OF_FRAMES
        )
    return frame


def _decode(ds: Dataset, index: int) -> tuple[npt.NDArray[np.generic], str]:
    meta = getattr(ds, "file_meta", None)
    tsyntax = UID(meta.get("TransferSyntaxUID", "")) if meta is not None else UID("")
    if not tsyntax:
        # A dataset built in memory without file meta: native data, assume implicit LE.
        if getattr(ds["PixelData"], "is_undefined_length", False):
            raise PixelDataError("encapsulated but no Transfer Syntax UID", attribute=PIXEL_DATA)
        tsyntax = ImplicitVRLittleEndian
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise PixelDataError(
            f"no pixel data decoder for {tsyntax} ({tsyntax.name})", attribute=TRANSFER_SYNTAX
        ) from exc
    if not decoder.is_available:
        raise PixelDataError(
            f"no decoder plugin installed for {tsyntax.name} ({tsyntax}); install "
            f"pylibjpeg-openjpeg / pylibjpeg-rle / python-gdcm",
            attribute=TRANSFER_SYNTAX,
        )
    expected = (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0))
    if 0 in expected:
        raise PixelDataError(f"Rows/Columns missing or zero: {expected}", attribute=PIXEL_DATA)
    if tsyntax in _JPEG_FAMILY:
        _check_jpeg_frame_size(ds, index, expected)
    try:
        arr, info = decoder.as_array(ds, index=index, as_rgb=True)  # type: ignore[arg-type]
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    # Decoders raise ValueError, RuntimeError, KeyError, ...; the Rust ones (pylibjpeg-rle)
    # panic on data that disagrees with Rows/Columns, and pyo3's PanicException derives from
    # BaseException: uncaught, it would end the worker thread.
    except BaseException as exc:
        raise PixelDataError(
            f"cannot decode ({tsyntax.name}): {type(exc).__name__}: {exc}", attribute=PIXEL_DATA
        ) from exc
    if arr.shape[:2] != expected:
        raise PixelDataError(
            f"decoded shape {arr.shape} does not match Rows x Columns {expected}",
            attribute=PIXEL_DATA,
        )
    decoded_photometric = str(
        info.get("photometric_interpretation", ds.PhotometricInterpretation)
    ).upper()
    return arr, decoded_photometric


def _check_jpeg_frame_size(ds: Dataset, index: int, expected: tuple[int, int]) -> None:
    """Refuse Rows/Columns that contradict the frame's JPEG or JPEG-LS frame header.

    PS3.5 8.2: the Image Pixel module's attributes shall be consistent with the compressed
    data. Some decoders (pyjpegls) return the codestream's samples whatever Rows and Columns
    say, which then fill a wrong-shaped array: a scrambled image, where DCMTK refuses the
    file ("Image data mismatch between DICOM header and JPEG-LS bitstream"). A frame that
    cannot be found or has no readable header is left to the decoder.
    """
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
        frame = get_frame(ds.PixelData, index, number_of_frames=n_frames)
    except Exception:
        return
    # the frame header's parameters as pydicom's own decoders read them (_get_frame_info);
    # {} when there is no readable header, and a height of 0 is defined later (DNL)
    header = _get_jpg_parameters(frame)
    size = (header.get("height", 0), header.get("width", 0))
    if size[0] and size != expected:
        raise PixelDataError(
            f"Rows x Columns {expected} but the JPEG frame header is {size[0]} x {size[1]}",
            attribute=PIXEL_DATA,
        )


def _apply_modality_lut(decoded: npt.NDArray[np.generic], ds: Dataset) -> npt.NDArray[np.float64]:
    """Stored values -> modality values (PS3.3 C.11.1), naming the attribute at fault."""
    try:
        return np.asarray(apply_modality_lut(decoded, ds), dtype=np.float64)
    except Exception as exc:  # pydicom raises KeyError, IndexError, ValueError, ...
        attribute = MODALITY_LUT_SEQUENCE if "ModalityLUTSequence" in ds else RESCALE
        raise PixelDataError(
            f"cannot apply: {type(exc).__name__}: {exc}", attribute=attribute
        ) from exc


def _apply_voi(
    values: npt.NDArray[np.float64], ds: Dataset, percentiles: tuple[float, float]
) -> tuple[npt.NDArray[np.float64], VoiSource, tuple[float, float] | None]:
    """Map modality values to [0, 1] (PS3.3 C.11.2)."""
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq:
        item = voi_seq[0]
        try:
            # LUT input values are integers (C.11.2.1.1); pydicom warns on float input
            indices = np.rint(values).astype(np.int64)
            out = np.asarray(apply_voi(indices, ds, index=0), dtype=np.float64)
            lut = np.asarray(item.LUTData, dtype=np.float64).ravel()
        except Exception as exc:
            raise PixelDataError(f"cannot apply: {exc}", attribute=VOI_LUT_SEQUENCE) from exc
        lut_lo, lut_hi = float(lut.min()), float(lut.max())
        if lut_hi <= lut_lo:
            raise PixelDataError("LUT Data is constant", attribute=VOI_LUT_SEQUENCE)
        return (out - lut_lo) / (lut_hi - lut_lo), "voi_lut", None

    centre, width = _first_window(ds)
    if centre is not None and width is not None:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        unit, bounds = _window(values, centre, width, function)
        return unit, "window", bounds

    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise PixelDataError(
            f"constant pixel values ({lo:g}): no image content", attribute=PIXEL_DATA
        )
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0), "percentile", (lo, hi)


def _first_window(ds: Dataset) -> tuple[float | None, float | None]:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None, None

    def first(value: object) -> float | None:
        if isinstance(value, MultiValue | list | tuple):
            value = value[0] if len(value) else None
        if value is None or value == "":
            return None
        return float(value)  # type: ignore[arg-type]

    try:
        centre, width = first(ds.WindowCenter), first(ds.WindowWidth)
    except (TypeError, ValueError) as exc:
        raise PixelDataError(f"not numeric: {exc}", attribute=WINDOW) from exc
    if centre is None or width is None:
        return None, None
    return centre, width


def _window(
    x: npt.NDArray[np.float64], c: float, w: float, function: str
) -> tuple[npt.NDArray[np.float64], tuple[float, float]]:
    """Window to [0, 1] per PS3.3 C.11.2.1.2 (ymin = 0, ymax = 1)."""
    if function == "LINEAR":
        if w < 1:
            raise PixelDataError(f"Window Width {w:g} < 1 for LINEAR", attribute=WINDOW)
        lower, upper = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        if w == 1:
            return (x > lower).astype(np.float64), (lower, upper)
        y = (x - (c - 0.5)) / (w - 1) + 0.5
        y = np.where(x <= lower, 0.0, np.where(x > upper, 1.0, y))
        return np.clip(y, 0.0, 1.0), (lower, upper)
    if w <= 0:
        raise PixelDataError(f"Window Width {w:g} <= 0 for {function}", attribute=WINDOW)
    if function == "LINEAR_EXACT":
        lower, upper = c - w / 2, c + w / 2
        y = np.where(x <= lower, 0.0, np.where(x > upper, 1.0, (x - c) / w + 0.5))
        return np.clip(y, 0.0, 1.0), (lower, upper)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w)), (c - w / 2, c + w / 2)
    raise PixelDataError(f"unknown function {function!r}", attribute=VOI_LUT_FUNCTION)


def _colour_to_unit(
    arr: npt.NDArray[np.generic], ds: Dataset, photometric: str, decoded_photometric: str
) -> npt.NDArray[np.float64]:
    """Colour (RGB / YBR / palette) presentation values -> grey in [0, 1] (BT.601 luma)."""
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:
            raise PixelDataError(
                f"cannot apply the palette: {exc}",
                attribute="Red/Green/Blue Palette Color Lookup Table Data (0028,1201-1203)",
            ) from exc
        max_value = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0
    else:
        if decoded_photometric != "RGB" or arr.ndim != 3 or arr.shape[-1] != 3:
            raise UnsupportedPhotometricError(
                f"{photometric!r} decoded as {decoded_photometric!r} with shape {arr.shape}; "
                "expected 3 RGB samples per pixel",
                attribute=PHOTOMETRIC,
            )
        rgb = arr
        bits = int(ds.get("BitsStored") or 8)
        max_value = float(2**bits - 1)
    grey = np.asarray(rgb, dtype=np.float64) @ _BT601
    return np.clip(grey / max_value, 0.0, 1.0)
