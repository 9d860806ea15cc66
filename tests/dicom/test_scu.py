"""Storage SCU (integration.scu) against real peers: DCMTK storescp, Orthanc, pynetdicom."""

from __future__ import annotations

import copy
import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage
from pynetdicom import AE, evt

from integration.conformance import STORAGE_SCU
from integration.errors import (
    AssociationRejectedError,
    ConnectionFailedError,
    DeliveryTimeoutError,
    StoreFailedError,
)
from integration.scu import DicomDestination, echo, send_dataset
from tests.dicom.conftest import StoreSCP
from tests.dicom.orthanc import OrthancServer
from tests.helpers import free_port, node_draft_sr

CALLING = "LLMCXR"
TEXT = "Herz normal groß; 心肺に異常なし"


@pytest.fixture(scope="module")
def sr_file(tmp_path_factory: pytest.TempPathFactory, rg1_header: Dataset) -> Path:
    source = copy.deepcopy(rg1_header)
    source.SpecificCharacterSet = "ISO_IR 192"
    source.PatientName = "Müller^Jürgen"
    sr = node_draft_sr(
        source,
        findings=TEXT,
        impression="No acute disease.",
        version="scu-test",
        series_number=9901,
        instance_number=1,
    )
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def test_destination_validation() -> None:
    assert DicomDestination.parse("PACS@127.0.0.1:104") == DicomDestination(
        "PACS", "127.0.0.1", 104
    )
    assert DicomDestination.parse("PACS@[::1]:11112").host == "::1"
    for bad in ("PACS127.0.0.1:104", "PACS@host", "@host:1"):
        with pytest.raises(ValueError):
            DicomDestination.parse(bad)
    with pytest.raises(ValueError, match="AE title"):
        DicomDestination("A" * 17, "h", 1)
    with pytest.raises(ValueError, match="AE title"):
        DicomDestination("BAD\\AE", "h", 1)
    with pytest.raises(ValueError, match="port"):
        DicomDestination("PACS", "h", 70000)


@pytest.mark.integration
def test_send_to_dcmtk_storescp(dcmtk_storescp: StoreSCP, sr_file: Path) -> None:
    dest = DicomDestination(dcmtk_storescp.aet, "127.0.0.1", dcmtk_storescp.port)
    assert echo(dest, CALLING) is True
    result = send_dataset(sr_file, dest, calling_ae=CALLING)
    assert result.ok and result.status == 0x0000 and not result.warning
    sent = pydicom.dcmread(sr_file)
    assert result.sop_instance_uid == sent.SOPInstanceUID
    stored = list(dcmtk_storescp.out_dir.iterdir())
    assert len(stored) == 1
    received = pydicom.dcmread(stored[0])
    assert received.SOPInstanceUID == sent.SOPInstanceUID
    assert str(received.PatientName) == "Müller^Jürgen"
    # Same object as an in-memory dataset.
    assert send_dataset(sent, dest, calling_ae=CALLING).ok


@pytest.mark.integration
def test_send_to_orthanc(orthanc: OrthancServer, sr_file: Path) -> None:
    dest = DicomDestination(orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    assert echo(dest, CALLING)
    sent = pydicom.dcmread(sr_file)
    result = send_dataset(sr_file, dest, calling_ae=CALLING)
    assert result.ok and result.status == 0
    instance_id = orthanc.find_instance(sent.SOPInstanceUID)
    assert instance_id is not None and instance_id in orthanc.instances()
    tags = orthanc.simplified_tags(instance_id)
    assert tags["SOPInstanceUID"] == sent.SOPInstanceUID
    assert tags["StudyInstanceUID"] == sent.StudyInstanceUID
    assert tags["CompletionFlag"] == "PARTIAL"
    assert tags["VerificationFlag"] == "UNVERIFIED"
    assert tags["PreliminaryFlag"] == "PRELIMINARY"
    assert tags["PatientName"] == "Müller^Jürgen"
    assert tags["SeriesDescription"].startswith("AI DRAFT UNVERIFIED")
    stored = pydicom.dcmread(io.BytesIO(orthanc.file_bytes(instance_id)))
    assert TEXT in [
        str(i.get("TextValue", ""))
        for s in stored.ContentSequence
        for i in s.get("ContentSequence", [])
    ]
    # Re-sending the deterministic UID does not duplicate.
    before = len(orthanc.instances())
    assert send_dataset(sr_file, dest, calling_ae=CALLING).ok
    assert len(orthanc.instances()) == before


@pytest.mark.integration
def test_refused_destination_is_transient(sr_file: Path) -> None:
    dest = DicomDestination("NOBODY", "127.0.0.1", free_port())
    with pytest.raises(ConnectionFailedError) as info:
        send_dataset(sr_file, dest, calling_ae=CALLING)
    assert info.value.transient is True
    assert "NOBODY@127.0.0.1" in str(info.value)
    assert echo(dest, CALLING) is False


# --- pynetdicom peers for the failure modes DCMTK/Orthanc cannot be told to produce ---------


@pytest.fixture
def scp_factory() -> Iterator[Callable[..., DicomDestination]]:
    servers: list[Any] = []

    def start(*, handlers: list[Any] | None = None, **ae_attrs: Any) -> DicomDestination:
        ae = AE(ae_title="TESTSCP")
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        for key, value in ae_attrs.items():
            setattr(ae, key, value)
        port = free_port()
        servers.append(
            ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers or [])
        )
        return DicomDestination("TESTSCP", "127.0.0.1", port)

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.integration
def test_permanent_rejection(scp_factory: Callable[..., DicomDestination], sr_file: Path) -> None:
    dest = scp_factory(require_calling_aet=["SOMEONE"])
    with pytest.raises(AssociationRejectedError) as info:
        send_dataset(sr_file, dest, calling_ae=CALLING)
    err = info.value
    assert (err.result, err.source, err.reason) == (1, 1, 3)  # calling AE not recognised
    assert err.transient is False


@pytest.mark.integration
def test_transient_rejection(scp_factory: Callable[..., DicomDestination], sr_file: Path) -> None:
    dest = scp_factory(maximum_associations=1)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context("1.2.840.10008.1.1")
    held = holder.associate(dest.host, dest.port, ae_title=dest.ae_title)
    assert held.is_established
    try:
        with pytest.raises(AssociationRejectedError) as info:
            send_dataset(sr_file, dest, calling_ae=CALLING)
        # rejected-transient, service-provider (presentation), local limit exceeded
        assert (info.value.result, info.value.source, info.value.reason) == (2, 3, 2)
        assert info.value.transient is True
    finally:
        held.release()
        holder.shutdown()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("status", "transient"), [(0xA700, True), (0xA900, False), (0xC000, False)]
)
def test_failure_status(
    scp_factory: Callable[..., DicomDestination], sr_file: Path, status: int, transient: bool
) -> None:
    dest = scp_factory(handlers=[(evt.EVT_C_STORE, lambda event: status)])
    with pytest.raises(StoreFailedError) as info:
        send_dataset(sr_file, dest, calling_ae=CALLING)
    assert info.value.dicom_status == status
    assert info.value.transient is transient
    assert f"0x{status:04X}" in str(info.value)


@pytest.mark.integration
def test_warning_status_is_ok(scp_factory: Callable[..., DicomDestination], sr_file: Path) -> None:
    dest = scp_factory(handlers=[(evt.EVT_C_STORE, lambda event: 0xB000)])
    result = send_dataset(sr_file, dest, calling_ae=CALLING)
    assert result.ok and result.warning and result.status == 0xB000


@pytest.mark.integration
def test_dimse_timeout(scp_factory: Callable[..., DicomDestination], sr_file: Path) -> None:
    release = threading.Event()

    def slow(event: evt.Event) -> int:
        release.wait(5)
        return 0x0000

    dest = scp_factory(handlers=[(evt.EVT_C_STORE, slow)])
    try:
        with pytest.raises(DeliveryTimeoutError) as info:
            send_dataset(sr_file, dest, calling_ae=CALLING, dimse_timeout=0.5)
        assert info.value.transient is True
    finally:
        release.set()
        time.sleep(0.1)


@pytest.mark.integration
def test_proposed_contexts_match_conformance(
    scp_factory: Callable[..., DicomDestination], sr_file: Path
) -> None:
    seen: list[tuple[str, tuple[str, ...]]] = []

    def record(event: evt.Event) -> None:
        for cx in event.assoc.requestor.requested_contexts:
            seen.append((str(cx.abstract_syntax), tuple(str(t) for t in cx.transfer_syntax)))

    dest = scp_factory(
        handlers=[(evt.EVT_REQUESTED, record), (evt.EVT_C_STORE, lambda event: 0x0000)]
    )
    assert send_dataset(sr_file, dest, calling_ae=CALLING).ok
    assert [a for a, _ in seen] == list(STORAGE_SCU.sop_classes)
    assert all(ts == STORAGE_SCU.transfer_syntaxes for _, ts in seen)
