"""CONFORMANCE.md against what the node's AE really accepts and answers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)
from pynetdicom import AE

from integration.ae import build_storage_ae
from integration.conformance import ROLES, STORAGE_SCP
from integration.scp import handlers
from integration.status import STORE_STATUSES
from tests.helpers import free_port

DOC = Path(__file__).resolve().parents[2] / "CONFORMANCE.md"
UID_CELL = re.compile(r"^\|\s*(?P<name>[^|]+?)\s*\|\s*`(?P<uid>[0-9.]+)`\s*\|$")


def _sections() -> dict[str, str]:
    text = DOC.read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _tables(section: str) -> tuple[list[str], list[str]]:
    """(SOP Class UIDs, transfer syntax UIDs) listed in a role's section."""
    sops: list[str] = []
    tss: list[str] = []
    current: list[str] | None = None
    for line in section.splitlines():
        if line.startswith("| SOP Class |"):
            current = sops
        elif line.startswith("| Transfer Syntax |"):
            current = tss
        elif (m := UID_CELL.match(line.strip())) and current is not None:
            current.append(m["uid"])
        elif not line.startswith("|"):
            current = None if line.strip() else current
    return sops, tss


def _ae() -> AE:
    return build_storage_ae(ae_title="LLMCXR", max_associations=4)


def test_document_lists_exactly_what_the_ae_supports() -> None:
    ae = _ae()
    supported: dict[str, set[str]] = {
        str(cx.abstract_syntax): {str(t) for t in cx.transfer_syntax}
        for cx in ae.supported_contexts
    }
    sections = _sections()
    documented: dict[str, set[str]] = {}
    for role in ("Verification SCP", "Storage SCP"):
        sops, tss = _tables(sections[role])
        assert sops and tss, f"no tables under '## {role}'"
        assert len(sops) == len(set(sops))
        for uid in sops:
            documented[uid] = set(tss)
    assert documented == supported


def test_document_scu_section_matches_conformance_data() -> None:
    sops, tss = _tables(_sections()["Storage SCU"])
    scu = next(r for r in ROLES if r.role == "Storage SCU")
    assert sops == list(scu.sop_classes) and tss == list(scu.transfer_syntaxes)


def test_status_table_matches_status_module() -> None:
    rows = re.findall(r"^\| 0x([0-9A-F]{4}) \| (\w+) \|", DOC.read_text(), flags=re.M)
    assert [(int(c, 16), n) for c, n in rows] == [
        (info.code, s.name) for s, info in STORE_STATUSES.items()
    ]


@pytest.mark.integration
def test_real_association_accepts_compressed_and_rejects_unknown() -> None:
    port = free_port()

    class _NoSink:
        def accept(self, path: Path, meta: object) -> object:  # pragma: no cover
            raise AssertionError("no C-STORE expected")

    server = _ae().start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=handlers(_NoSink()),  # type: ignore[arg-type]
    )
    assert server is not None
    try:
        scu = AE(ae_title="ANY")
        proposed = [
            (ComputedRadiographyImageStorage, JPEG2000Lossless),
            (ComputedRadiographyImageStorage, JPEG2000),
            (DigitalXRayImageStorageForPresentation, JPEGBaseline8Bit),
            (DigitalXRayImageStorageForPresentation, RLELossless),
            ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.4.201"),  # MR, HTJ2K lossless
            ("1.2.840.10008.5.1.4.1.2.1.1", ExplicitVRLittleEndian),  # Q/R Find: not offered
        ]
        for sop, ts in proposed:
            scu.add_requested_context(sop, ts)
        assoc = scu.associate("127.0.0.1", port, ae_title="LLMCXR")
        assert assoc.is_established
        accepted = {
            (str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts
        }
        rejected = {str(c.abstract_syntax) for c in assoc.rejected_contexts}
        assoc.release()
        for sop, ts in proposed[:-1]:
            assert (str(sop), str(ts)) in accepted
            assert str(sop) in STORAGE_SCP.sop_classes
        assert rejected == {"1.2.840.10008.5.1.4.1.2.1.1"}
    finally:
        server.shutdown()
