"""Deterministic DICOM UIDs for the node's outputs.

A UID under the ``2.25`` root is the decimal form of a 128-bit UUID (PS3.5 B.2, ISO/IEC
9834-8). Here the UUID is a name-based (version 5, SHA-1) UUID of the given parts, so the same
study + model name + model version always yields the same SR SOP Instance UID: a re-run or a
re-send replaces the earlier draft instead of duplicating it.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID

__all__ = [
    "deterministic_uid",
    "device_uid",
    "sr_instance_uid",
    "sr_series_uid",
]

# Fixed namespace for this project's name-based UUIDs (itself a uuid5 of a URL-like name).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:llm-cxr-node:dicom-uid")
_SEPARATOR = "\x1f"  # ASCII unit separator: ("ab", "c") and ("a", "bc") must differ


def deterministic_uid(*parts: str) -> str:
    """Return a valid DICOM UID derived only from ``parts``.

    Parameters
    ----------
    *parts
        One or more non-empty strings (e.g. Study Instance UID, model name, model version).

    Returns
    -------
    str
        ``"2.25." + str(int(uuid5(namespace, parts)))``: at most 44 characters, digits and
        dots only, no leading zeros (PS3.5 9.1, B.2).

    Raises
    ------
    ValueError
        If no part is given or a part is not a non-empty string.
    """
    if not parts:
        raise ValueError("deterministic_uid needs at least one part")
    for part in parts:
        if not isinstance(part, str) or not part:
            raise ValueError(f"deterministic_uid parts must be non-empty strings, got {part!r}")
    value = uuid.uuid5(_NAMESPACE, _SEPARATOR.join(parts)).int
    uid = f"2.25.{value}"
    if not UID(uid).is_valid:  # pragma: no cover - guaranteed by construction
        raise ValueError(f"generated UID {uid} is not valid")
    return uid


def sr_instance_uid(study_uid: str, model_name: str, model_version: str) -> str:
    """SOP Instance UID of the draft SR for one study and one model version."""
    return deterministic_uid("sr-instance", study_uid, model_name, model_version)


def sr_series_uid(study_uid: str, model_name: str, model_version: str) -> str:
    """Series Instance UID of the draft SR series for one study and one model version."""
    return deterministic_uid("sr-series", study_uid, model_name, model_version)


def device_uid(model_name: str, model_version: str) -> str:
    """Device Observer UID (TID 1004) of the algorithm; changes with the model version."""
    return deterministic_uid("device", model_name, model_version)
