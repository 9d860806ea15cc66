"""What each DICOM role of the node accepts or proposes, as data (PS3.2 conformance).

:mod:`integration.ae` builds the Application Entity from these tables, ``CONFORMANCE.md``
lists them (``python -m integration.conformance`` prints its tables), and a test checks the
document against what the AE really negotiates.

Roles:

- Verification SCP (PS3.4 Annex A): the Verification SOP Class with the uncompressed transfer
  syntaxes.
- Storage SCP (PS3.4 Annex B): every storage SOP Class pynetdicom knows, each with *every*
  transfer syntax (a PACS forwards JPEG, JPEG-LS, JPEG 2000, RLE, HTJ2K, ... as stored; the
  node keeps the bytes it received and decodes later).
- Storage SCU (PS3.4 Annex B): what the node proposes when it sends its results back: the
  draft report as Comprehensive, Enhanced or Basic Text SR (PS3.3 A.35.3 / A.35.2 / A.35.1)
  and as Encapsulated PDF (A.45.1), the IHE IOCM rejection note that withdraws them (Key
  Object Selection, A.35.4) and an optional synthetic rendering as Secondary Capture
  (A.8.1), in the two uncompressed little-endian transfer syntaxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES

__all__ = [
    "ROLES",
    "STORAGE_SCP",
    "STORAGE_SCU",
    "VERIFICATION_SCP",
    "RoleConformance",
    "markdown",
    "uid_name",
]


VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"  # PS3.4 A.4


def uid_name(uid: str) -> str:
    """Return the PS3.6 name of a UID, or ``"(unnamed)"`` when pydicom does not know it."""
    name = UID(uid).name
    return "(unnamed)" if name == uid else name


@dataclass(frozen=True, slots=True)
class RoleConformance:
    """The SOP Classes and transfer syntaxes of one role of the node.

    Parameters
    ----------
    role
        ``"Verification SCP"``, ``"Storage SCP"`` or ``"Storage SCU"``.
    sop_classes
        SOP Class UIDs, in table order.
    transfer_syntaxes
        Transfer syntax UIDs; every SOP Class of the role goes with every one of them.
    """

    role: str
    sop_classes: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.role:
            raise ValueError("RoleConformance.role must name the DICOM role")
        for uid in (*self.sop_classes, *self.transfer_syntaxes):
            if not UID(uid).is_valid:
                raise ValueError(f"{self.role}: {uid!r} is not a valid UID (PS3.5 9.1)")
        if len(set(self.sop_classes)) != len(self.sop_classes):
            raise ValueError(f"{self.role}: a SOP Class UID is listed twice")
        if not self.sop_classes or not self.transfer_syntaxes:
            raise ValueError(f"{self.role}: needs at least one SOP Class and transfer syntax")

    @property
    def is_scp(self) -> bool:
        """Whether the node plays the SCP (acceptor) side in this role."""
        return self.role.endswith("SCP")


def _unique(uids: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(u) for u in uids))


VERIFICATION_SCP = RoleConformance(
    role="Verification SCP",
    sop_classes=(VERIFICATION_SOP_CLASS,),
    transfer_syntaxes=_unique(DEFAULT_TRANSFER_SYNTAXES),
)

STORAGE_SCP = RoleConformance(
    role="Storage SCP",
    sop_classes=_unique([str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]),
    transfer_syntaxes=_unique(ALL_TRANSFER_SYNTAXES),
)

STORAGE_SCU = RoleConformance(
    role="Storage SCU",
    sop_classes=(
        str(ComprehensiveSRStorage),
        str(EnhancedSRStorage),
        str(BasicTextSRStorage),
        str(EncapsulatedPDFStorage),
        str(KeyObjectSelectionDocumentStorage),
        str(SecondaryCaptureImageStorage),
    ),
    transfer_syntaxes=(str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)),
)

ROLES: tuple[RoleConformance, ...] = (VERIFICATION_SCP, STORAGE_SCP, STORAGE_SCU)


def _sop_table(role: RoleConformance) -> list[str]:
    lines = ["| SOP Class | UID |", "|---|---|"]
    lines += [f"| {uid_name(uid)} | `{uid}` |" for uid in role.sop_classes]
    return lines


def _ts_table(role: RoleConformance) -> list[str]:
    lines = ["| Transfer Syntax | UID |", "|---|---|"]
    lines += [f"| {uid_name(uid)} | `{uid}` |" for uid in role.transfer_syntaxes]
    return lines


def markdown(role: RoleConformance) -> str:
    """The two Markdown tables (SOP Classes, transfer syntaxes) of one role.

    Parameters
    ----------
    role
        One of :data:`ROLES`.

    Returns
    -------
    str
        The tables as they appear under the role's heading in ``CONFORMANCE.md``.
    """
    return "\n".join(
        [
            f"SOP Classes ({len(role.sop_classes)}):",
            "",
            *_sop_table(role),
            "",
            f"Transfer syntaxes ({len(role.transfer_syntaxes)}), for every SOP Class above:",
            "",
            *_ts_table(role),
        ]
    )


def main() -> None:
    """Print every role's tables (to paste into ``CONFORMANCE.md``)."""
    for role in ROLES:
        print(f"## {role.role}\n\n{markdown(role)}\n")


if __name__ == "__main__":
    main()
