"""Deterministic DICOM UIDs and series numbers for the node's outputs.

A UID under the ``2.25`` root is the decimal form of a 128-bit UUID (PS3.5 B.2, ISO/IEC
9834-8). Here the UUID is a name-based (version 5, SHA-1) UUID of the given parts.

A draft object's SOP Instance UID is a function of what it says and what it was made from
(study, model name and version, the input instances, the draft text): the same inputs and
text give the same UID, so a re-send stays idempotent; a changed draft (a late instance, a
new model version, other text) gets a new UID and supersedes the earlier one through the
Predecessor Documents Sequence (PS3.3 C.17.2; IHE SINR: every content change is a new SOP
Instance), because a PACS keeps the first copy of a UID it already holds (Orthanc's default
``OverwriteInstances=false``). A UID that was withdrawn is never issued again: the same
draft made again after its withdrawal is a new issue (``reissue``) with new UIDs, because a
PACS keeps hiding an instance an IOCM rejection note rejected. Series are one per study,
model version and kind of object.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence

from pydicom.uid import UID

__all__ = [
    "DRAFT_KINDS",
    "deterministic_uid",
    "device_uid",
    "draft_instance_uid",
    "draft_series_number",
    "draft_series_uid",
    "sr_instance_uid",
    "sr_series_uid",
]

DRAFT_KINDS: dict[str, int] = {"sr": 1, "sr-basic": 2, "pdf": 3, "kos": 9}
"""The kinds of draft object, with the last digit of their series numbers."""

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


def _kind(kind: str) -> str:
    if kind not in DRAFT_KINDS:
        raise ValueError(f"unknown draft object kind {kind!r}, expected one of {list(DRAFT_KINDS)}")
    return kind


def draft_instance_uid(
    kind: str,
    study_uid: str,
    model_name: str,
    model_version: str,
    *,
    inputs: Sequence[str],
    text: str,
    reissue: int = 0,
) -> str:
    """SOP Instance UID of a draft object from what it says and what it was made from.

    Parameters
    ----------
    kind
        ``"sr"`` (Comprehensive SR), ``"sr-basic"`` (Basic Text SR), ``"pdf"`` (Encapsulated
        PDF) or ``"kos"`` (rejection note): one UID per kind for the same draft.
    study_uid, model_name, model_version
        The study and the model that drafted it.
    inputs
        SOP Instance UIDs of the instances the draft was made from (order does not matter).
    text
        The draft's text (findings and impression as sent).
    reissue
        0 for a draft's first issue; ``n`` when issues ``0 .. n-1`` of the same draft were
        withdrawn (IHE IOCM rejection, HL7 OBX-11 ``W``, FHIR ``entered-in-error``). The
        first issue's UID is the one this function has always given.

    Raises
    ------
    ValueError
        If ``kind`` is unknown or ``reissue`` is negative.
    """
    if reissue < 0:
        raise ValueError(f"reissue must be >= 0, got {reissue}")
    sources = ",".join(sorted({str(u) for u in inputs})) or "-"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    issue = (f"reissue-{reissue}",) if reissue else ()
    return deterministic_uid(
        f"{_kind(kind)}-instance", study_uid, model_name, model_version, sources, digest, *issue
    )


def draft_series_uid(kind: str, study_uid: str, model_name: str, model_version: str) -> str:
    """Series Instance UID of one kind of draft object for a study and a model version.

    Every revision of the draft by the same model version lands in the same series.
    """
    return deterministic_uid(f"{_kind(kind)}-series", study_uid, model_name, model_version)


def draft_series_number(kind: str, model_name: str, model_version: str) -> int:
    """Series Number (0020,0011) of a kind of draft object: one per model and version.

    In 7001..7999: the model name and version pick the tens (7000 + 10 * (0..99)), the
    kind the last digit (:data:`DRAFT_KINDS`), so a viewer lists the SR, the PDF and a
    rejection note of one model version side by side, apart from another version's.
    """
    digest = hashlib.sha256(f"{model_name}\x1f{model_version}".encode()).digest()
    return 7000 + 10 * (int.from_bytes(digest[:4], "big") % 100) + DRAFT_KINDS[_kind(kind)]


def sr_instance_uid(
    study_uid: str,
    model_name: str,
    model_version: str,
    *,
    inputs: Sequence[str],
    findings: str | None,
    impression: str,
) -> str:
    """SOP Instance UID of the draft Comprehensive SR (:func:`draft_instance_uid`) for its
    findings and impression text as sent (surrounding white space ignored)."""
    text = f"{(findings or '').strip()}\x1f{impression.strip()}"
    return draft_instance_uid("sr", study_uid, model_name, model_version, inputs=inputs, text=text)


def sr_series_uid(study_uid: str, model_name: str, model_version: str) -> str:
    """Series Instance UID of the draft SR series for one study and one model version."""
    return deterministic_uid("sr-series", study_uid, model_name, model_version)


def device_uid(model_name: str, model_version: str) -> str:
    """Device Observer UID (TID 1004) of the algorithm; changes with the model version."""
    return deterministic_uid("device", model_name, model_version)
