"""Images in and out of the model's tasks: DICOM or PNG bytes to 8-bit grey, and PNG out."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from node.services.errors import InputTooLarge, InvalidInput

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["MAX_UPLOAD_BYTES", "MIB", "gray8_from_bytes", "gray8_from_file", "png_bytes"]

MIB = 1024 * 1024
#: the largest image :func:`gray8_from_bytes` takes by default (uploads: api_max_upload_mb)
MAX_UPLOAD_BYTES = 64 * MIB
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def gray8_from_bytes(
    data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES
) -> tuple[npt.NDArray[np.uint8], Dataset | None]:
    """A DICOM Part 10 file or a PNG -> 8-bit grey image (and the dataset for DICOM).

    DICOM goes through :func:`integration.pixels.to_gray8` (the MIMIC-like conversion); a
    PNG is read as grey as it is (already 8-bit, like MIMIC-CXR-JPG).

    Raises
    ------
    node.services.errors.InputTooLarge
        When larger than ``max_bytes``.
    node.services.errors.InvalidInput
        When neither DICOM nor PNG, or DICOM without Pixel Data (7FE0,0010).
    integration.errors.PixelDataError
        When the DICOM pixel data cannot be converted.
    """
    if len(data) > max_bytes:
        raise InputTooLarge(f"upload larger than {max_bytes // MIB} MiB")
    if data.startswith(_PNG_MAGIC):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(BytesIO(data)) as im:
                return np.asarray(im.convert("L"), dtype=np.uint8), None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidInput(f"PNG cannot be decoded: {type(exc).__name__}") from None
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from integration.errors import IntegrationError
    from integration.pixels import to_gray8

    try:
        ds = dcmread(BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
        raise InvalidInput(
            f"not a DICOM Part 10 file (PS3.10 preamble + DICM) or PNG: {exc}"
        ) from None
    if "PixelData" not in ds:
        raise InvalidInput("the DICOM object has no Pixel Data (7FE0,0010): not an image")
    try:
        return to_gray8(ds), ds
    except IntegrationError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise InvalidInput(f"Pixel Data (7FE0,0010) cannot be converted: {exc}") from None


def gray8_from_file(path: Path) -> tuple[npt.NDArray[np.uint8], Dataset | None]:
    """Like :func:`gray8_from_bytes` for a file on disk (DICOM or PNG)."""
    return gray8_from_bytes(Path(path).read_bytes())


def png_bytes(image: npt.NDArray[np.uint8]) -> bytes:
    """Encode an 8-bit grey image as PNG."""
    from PIL import Image

    buf = BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()
