"""Text values of an image header, as the report outputs read them (DICOM PS3.5 6.2).

Shared by :mod:`integration.hl7_oru`, :mod:`integration.hl7_values`,
:mod:`integration.fhir_coding`, :mod:`integration.fhir_report` and
:mod:`integration.report_pdf`: a missing or empty attribute reads as ``""`` (never
``"None"``), and the date/time attributes are returned only in the forms PS3.5 defines.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

__all__ = ["header_text", "study_time_digits", "utc_offset"]


def header_text(ds: Dataset, keyword: str) -> str:
    """The value of ``keyword`` in ``ds`` as stripped text.

    Parameters
    ----------
    ds
        A dataset (an image header or a sequence item).
    keyword
        A DICOM keyword (PS3.6), e.g. ``"PatientID"``.

    Returns
    -------
    str
        ``str(value).strip()``, or ``""`` when the attribute is absent or has no value. A
        value read as several values (a backslash in it is the value delimiter, PS3.5 6.2,
        e.g. a Study Description ``THORAX PA\\LAT``) is its values joined by that
        backslash, as the header holds it, not a Python list's text.
    """
    value = ds.get(keyword)
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value).strip()
    return "" if value is None else str(value).strip()


def study_time_digits(ds: Dataset) -> str:
    """The digits of Study Time (0008,0030) before its fraction, or ``""`` when absent.

    For the TM form ``HHMMSS.FFFFFF`` of PS3.5 6.2 (and the ACR-NEMA form ``HH:MM:SS``,
    which gives the same digits); callers check the length (2, 4 or 6).
    """
    return re.sub(r"\D", "", header_text(ds, "StudyTime").split(".")[0])


def utc_offset(ds: Dataset) -> str:
    """Timezone Offset From UTC (0008,0201) if it is ``+HHMM``/``-HHMM``, else ``""``.

    The form ``&ZZXX`` of PS3.3 C.12.1.1.8, hours 00 to 14 and minutes 00 to 59 (the
    offsets in use run from -1200 to +1400); any other value (``+2400``, ``+0060``) reads as
    absent: no time zone can be made of it.
    """
    offset = header_text(ds, "TimezoneOffsetFromUTC")
    return offset if re.fullmatch(r"[+-](0\d|1[0-4])[0-5]\d", offset) else ""
