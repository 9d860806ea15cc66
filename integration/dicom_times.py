"""Times of a received report in UTC: DICOM DT (PS3.5 6.2) and HL7 v2 DTM values.

A DICOM DT without offset is read in the object's Timezone Offset From UTC (0008,0201,
PS3.3 C.12.1.1.8) when present, else as UTC; an HL7 TS/DTM (v2.5.1 section 2.A.22, the same
``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`` syntax) without offset as UTC. A time that
cannot be read gives ``None``, not an error.
"""

from __future__ import annotations

import datetime as dt
import re

from pydicom.dataset import Dataset
from pydicom.valuerep import DT

from integration.header_values import header_text, utc_offset

__all__ = ["dicom_datetime", "dicom_signed_at"]

_DATETIME = re.compile(r"\d{4}(\d{2}){0,5}(\.\d{1,6})?([+-]\d{4})?")  # DT, HL7 DTM


def dicom_signed_at(ds: Dataset) -> dt.datetime | None:
    """Latest Verification DateTime of the Verifying Observer Sequence, else Content Date/Time.

    Parameters
    ----------
    ds
        An SR or Encapsulated PDF instance: Verifying Observer Sequence (0040,A073) with
        Verification DateTime (0040,A030) (PS3.3 C.17.2), Content Date (0008,0023) and
        Content Time (0008,0033).

    Returns
    -------
    datetime.datetime or None
        Aware UTC; ``None`` when no such time can be read.
    """
    text = utc_offset(ds)  # Timezone Offset From UTC: "+HHMM", "-HHMM" or ""
    offset = dt.datetime.strptime(text, "%z").tzinfo if text else None
    observers = ds.get("VerifyingObserverSequence") or []
    times = [dicom_datetime(header_text(o, "VerificationDateTime"), offset) for o in observers]
    if any(times):
        return max(t for t in times if t is not None)
    date, time = header_text(ds, "ContentDate"), header_text(ds, "ContentTime")
    return dicom_datetime(date + (time or ""), offset) if date else None


def dicom_datetime(value: str, offset: dt.tzinfo | None) -> dt.datetime | None:
    """A DICOM DT (DA + TM) value in UTC; without its own offset, at ``offset`` (or UTC).

    Also reads HL7 DTM, which has the same syntax. ``None`` for a value that is not a DT,
    and for one that falls outside the years 1 to 9999 once in UTC (``99991231235959-0500``,
    a "no date" value some systems send, is 10000-01-01 in UTC).
    """
    if not _DATETIME.fullmatch(value):  # pydicom would read "2024-05-07" as 2024-01-01
        return None
    try:
        parsed: dt.datetime = DT(value)
        when = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=offset or dt.UTC)
        return when.astimezone(dt.UTC)
    except (ValueError, TypeError, OverflowError):  # Overflow: in UTC before 1 or after 9999
        return None
