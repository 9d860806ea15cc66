"""Patient attributes out of messages: quiet highdicom's name check, redact error texts.

Two sources put patient attribute values into text that ends up in logs, job errors and the
admin API:

- highdicom's person-name check warns with the whole name quoted
  (``The string "DOE JOHN" is unlikely to represent the intended person name ...``) each
  time it copies a single-component Patient Name (0010,0010) into a new object. Such names
  are valid DICOM (PS3.5 6.2.1.2: "DOE JOHN" is one family-name component), so the warning
  says nothing the node could act on: :func:`quiet_person_name_warnings` ignores exactly
  that warning around the code that builds SR and SC objects.
- pydicom's and highdicom's exceptions quote the value they could not convert
  (``Unable to convert '1951-03-14' to 'DA' object``). :func:`redact_patient_values`
  replaces the patient and study attribute values of the data sets involved with
  ``<redacted>`` before such a text is wrapped into one of the node's own errors.

The node's logging (:mod:`node.logging_setup`) withholds the text of library warnings and
library exceptions as a second line of defence; this module keeps the node's own messages
useful without quoting patient data.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

__all__ = [
    "PATIENT_KEYWORDS",
    "PERSON_NAME_WARNING",
    "REDACTED",
    "quiet_person_name_warnings",
    "redact_patient_values",
]

#: The start of highdicom's warning about a single-component person name (a regex, matched
#: at the start of the message as :func:`warnings.filterwarnings` does).
PERSON_NAME_WARNING = r"The string .* is unlikely to represent the intended person name"
REDACTED = "<redacted>"

#: Attributes that identify the patient or the study to a person (PS3.15 E.1-1 lists these
#: among those a de-identification removes); their values never go into a message.
PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAge",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "RequestingPhysician",
    "InstitutionName",
    "StudyDescription",
)
# PN components are separated by "^" and groups by "="; a name's words by spaces
_NAME_PARTS = re.compile(r"[\^=\s]+")
_DICOM_DATE = re.compile(r"\d{8}")
_MIN_PART = 2  # single letters (initials, "M"/"F") would shred every message


@contextmanager
def quiet_person_name_warnings() -> Iterator[None]:
    """Ignore highdicom's single-component person-name warning inside the ``with`` block.

    Only that warning (category ``UserWarning``, text :data:`PERSON_NAME_WARNING`) is
    ignored; every other warning is shown as before. :func:`warnings.catch_warnings` swaps
    the process-wide filter list, so a thread that builds an object at the same moment may
    see the warning: the node's logging withholds the text of library warnings
    (:func:`node.logging_setup.configure_logging`).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING, category=UserWarning)
        yield


def _values(ds: Dataset) -> Iterator[str]:
    """Each value of :data:`PATIENT_KEYWORDS` in ``ds``, its name parts, its ISO date."""
    for keyword in PATIENT_KEYWORDS:
        try:
            value = ds.get(keyword)
        except Exception:  # a value pydicom cannot convert: redact its raw bytes
            raw = ds.get_item(keyword)
            value = raw.value if raw is not None else None
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace").strip("\x00 ")
        if value is None or value == "":
            continue
        items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        for item in items:
            text = str(item).strip()
            yield text
            yield from _NAME_PARTS.split(text)
            if _DICOM_DATE.fullmatch(text):  # DA YYYYMMDD, also as YYYY-MM-DD
                yield f"{text[:4]}-{text[4:6]}-{text[6:]}"


def redact_patient_values(text: str, datasets: Iterable[Dataset]) -> str:
    """Replace the patient and study attribute values of ``datasets`` in ``text``.

    Parameters
    ----------
    text
        A message, e.g. a library exception's text.
    datasets
        The data sets the message may quote (sequence items are not searched).

    Returns
    -------
    str
        ``text`` with every value of :data:`PATIENT_KEYWORDS` (and every part of a person
        name or multi-word value, and a birth date's ``YYYY-MM-DD`` form; two characters
        or longer) replaced by ``<redacted>``, longest first; matching ignores case.
    """
    found: set[str] = set()
    for ds in datasets:
        found.update(_values(ds))
    for value in sorted((v for v in found if len(v) >= _MIN_PART), key=len, reverse=True):
        text = re.sub(re.escape(value), REDACTED, text, flags=re.IGNORECASE)
    return text
