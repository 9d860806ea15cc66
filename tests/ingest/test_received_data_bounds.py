"""Received data: parsing, temporary files and disk (issue #22, items 2, 5 and 10).

Every attack or fault is reproduced on loopback against the real node: ``cxr-node serve`` in a
subprocess (so its memory can be read from ``/proc`` and its ``$TMPDIR`` pointed at an empty
folder), real pynetdicom and DCMTK peers, a real SQLite database and, where the test runs as
root, real tiny tmpfs file systems. ``docs/security.md`` ("Received data: parsing, temporary
files, disk") lists each threat with its bound and the test here that holds it.
"""

from __future__ import annotations

import inspect
import io
import os
import shutil
import struct
import subprocess
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from integration.scp import _partial_received_file
from integration.status import StoreStatus
from node.runtime.dataset_error import DataSetError
from node.runtime.dataset_source import InflateLimits
from node.runtime.header import read_header
from tests.helpers import (
    free_port,
    node_env,
    port_open,
    require_nih_pngs,
    rg1_file,
    spawn_node,
    terminate,
    wait_for,
)
from tests.ingest.conftest import NODE_AET, PACS_AET, dcmtk, nih_png_dataset, start_scp, write

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
_MIB = 1 << 20
BOMB_INFLATED = 1 << 30  # the bomb: 1.0 MB on the wire, 1 GiB inflated


# --- building data sets -------------------------------------------------------------------


def _header_dataset(**extra: object) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Bounds^Test"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def _encode(ds: Dataset) -> bytes:
    """The data set encoded Explicit VR Little Endian (no file meta)."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _part10(ds: Dataset, transfer_syntax: str, body: bytes, path: Path) -> Path:
    """A Part 10 file: preamble, file meta naming ``transfer_syntax``, then ``body`` as is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    path.write_bytes(out.getvalue() + body)
    return path


def _ob_header(tag: tuple[int, int], length: int) -> bytes:
    return struct.pack("<HH2sHL", tag[0], tag[1], b"OB", 0, length)


def deflate_bomb(
    path: Path, inflated: int = BOMB_INFLATED, *, sop_class: str = SecondaryCaptureImageStorage
) -> tuple[Path, Dataset]:
    """A valid-looking Deflated Explicit VR Little Endian data set of SOP Class ``sop_class``
    whose Pixel Data is ``inflated`` bytes of zeros: about 1 MB on the wire for 1 GiB inflated.

    Built from full-flushed deflate segments (each one MiB of zeros, byte-aligned and
    independent of what precedes it), so it takes milliseconds instead of compressing 1 GiB.
    """
    ds = _header_dataset(SOPClassUID=sop_class)
    head = _encode(ds) + _ob_header((0x7FE0, 0x0010), inflated)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    mib_of_zeros = z.compress(bytes(_MIB)) + z.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    end = last.compress(b"") + last.flush()
    assert inflated % _MIB == 0
    body = first + mib_of_zeros * (inflated // _MIB) + end
    if len(body) % 2:
        body += b"\x00"
    return _part10(ds, DeflatedExplicitVRLittleEndian, body, path), ds


# --- the node under test ------------------------------------------------------------------


@dataclass
class Node:
    """``cxr-node serve`` in a subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    spool: Path
    tmpdir: Path
    log: Path

    @property
    def incoming(self) -> Path:
        return self.spool / ".incoming"

    def staged(self) -> list[Path]:
        """Files in the spool's staging folder."""
        return sorted(p for p in self.incoming.iterdir() if p.is_file())

    def spooled(self) -> list[Path]:
        """Instance files in the spool (outside the staging folder)."""
        return sorted(p for p in self.spool.rglob("*.dcm") if self.incoming not in p.parents)

    def vm(self, key: str) -> int:
        """A ``/proc/<pid>/status`` figure in bytes (``VmHWM``, ``VmRSS``)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"{key} not in /proc/{self.proc.pid}/status")

    def reset_peak(self) -> bool:
        """Reset the peak RSS (``VmHWM``) if the kernel lets us (Linux >= 4.0)."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def serve(
    base: Path,
    *,
    min_free_disk_mb: int = 0,
    spool: Path | None = None,
    tmpdir: Path | None = None,
) -> Node:
    """Start ``cxr-node serve`` with ``$TMPDIR`` an empty folder; wait until it listens."""
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tmpdir = tmpdir or base / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    spool = spool or base / "spool"
    env = node_env(
        port,
        base,
        {
            "TMPDIR": str(tmpdir),
            "CXR_NODE_AE_TITLE": NODE_AET,
            "CXR_NODE_HOST": "127.0.0.1",
            "CXR_NODE_SPOOL_DIR": str(spool),
            "CXR_NODE_ALLOWED_AES": PACS_AET,
            "CXR_NODE_MIN_FREE_DISK_MB": str(min_free_disk_mb),
            "CXR_NODE_API_ENABLED": "false",
            "CXR_NODE_DIMSE_TIMEOUT": "10",
            "CXR_NODE_NETWORK_TIMEOUT": "10",
            "CXR_NODE_ACSE_TIMEOUT": "10",
        },
    )
    log = base / "node.log"
    proc = spawn_node(env, log, append=True)
    node = Node(proc, port, spool, tmpdir, log)
    deadline = time.monotonic() + 60
    while not port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"node did not start:\n{node.log_text()[-3000:]}")
        time.sleep(0.05)
    return node


def stop(node: Node) -> None:
    terminate(node.proc, timeout=20)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = serve(tmp_path_factory.mktemp("received"))
    yield n
    stop(n)
    assert not list(n.tmpdir.iterdir()), "the node wrote under $TMPDIR"
    assert "Traceback" not in n.log_text()


def _scu(transfer_syntax: str = ExplicitVRLittleEndian, sop_class: str = "") -> AE:
    ae = AE(ae_title=PACS_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(sop_class or SecondaryCaptureImageStorage, transfer_syntax)
    return ae


def send_file(node: Node, path: Path, transfer_syntax: str) -> Dataset:
    """C-STORE a Part 10 file's data set bytes exactly as they are; return the response."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        sop_class = split_dataset(path)[0].MediaStorageSOPClassUID
        ae = _scu(transfer_syntax, sop_class)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert rsp is not None and "Status" in rsp, "no C-STORE response (association aborted?)"
    return rsp


def assert_nothing_left(node: Node) -> None:
    """No staged file in the spool and nothing under ``$TMPDIR`` (waits up to 10 s)."""
    wait_for(lambda: not node.staged(), timeout=10)
    assert not list(node.tmpdir.iterdir()), "the node wrote under $TMPDIR"


# --- item 2: deflate bomb -----------------------------------------------------------------


def test_deflate_bomb_refused_with_bounded_memory(node: Node, tmp_path: Path) -> None:
    """1.06 MB on the wire, 1 GiB inflated (before: 0x0000 after 6.3 s, peak RSS +2.0 GiB)."""
    bomb, ds = deflate_bomb(tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 1.2 * _MIB
    before = node.vm("VmHWM")
    node.reset_peak()
    t0 = time.monotonic()
    rsp = send_file(node, bomb, DeflatedExplicitVRLittleEndian)
    elapsed = time.monotonic() - t0
    grown = node.vm("VmHWM") - min(before, node.vm("VmRSS"))
    assert int(rsp.Status) == StoreStatus.CANNOT_UNDERSTAND
    assert "inflate" in str(rsp.ErrorComment)
    assert grown < 200 * _MIB, f"peak RSS grew by {grown / _MIB:.0f} MiB"
    assert elapsed < 30, f"answered after {elapsed:.1f} s"
    assert not [p for p in node.spooled() if p.name.startswith(ds.SOPInstanceUID + ".")]
    assert_nothing_left(node)


@pytest.mark.parametrize(
    "sop_class", [ComprehensiveSRStorage, EncapsulatedPDFStorage], ids=["sr", "pdf"]
)
def test_deflate_bomb_of_a_report_class_refused_with_bounded_memory(
    node: Node, tmp_path: Path, sop_class: str
) -> None:
    """An SR or Encapsulated PDF may be a radiologist's final report, which the node reads
    before ingest (``node.runtime.finals.ReportSink``): the same bomb in those SOP Classes
    is refused within the same bounds (before: pydicom inflated it whole, 0xC210 after
    the node's peak RSS grew by 2 GiB)."""
    bomb, ds = deflate_bomb(tmp_path / "bomb.dcm", sop_class=sop_class)
    before = node.vm("VmHWM")
    node.reset_peak()
    rsp = send_file(node, bomb, DeflatedExplicitVRLittleEndian)
    grown = node.vm("VmHWM") - min(before, node.vm("VmRSS"))
    assert int(rsp.Status) == StoreStatus.CANNOT_UNDERSTAND
    assert "inflate" in str(rsp.ErrorComment)
    assert grown < 200 * _MIB, f"peak RSS grew by {grown / _MIB:.0f} MiB"
    assert not [p for p in node.spooled() if p.name.startswith(ds.SOPInstanceUID + ".")]
    assert_nothing_left(node)


def test_a_large_encapsulated_pdf_costs_bounded_memory(node: Node, tmp_path: Path) -> None:
    """A PACS forwards a study's scanned documents too: a 120 MB Encapsulated PDF from a
    sender that is not a report source is stored with the memory any instance costs
    (``CONFORMANCE.md``, "Memory per association"; before: read whole, +240 MiB)."""
    size = 120_000_000
    ds = _header_dataset(SOPClassUID=EncapsulatedPDFStorage, Modality="DOC")
    document = b"%PDF-1.4\n" + bytes(size - 9)
    body = _encode(ds) + _ob_header((0x0042, 0x0011), size) + document
    path = _part10(ds, ExplicitVRLittleEndian, body, tmp_path / "big-pdf.dcm")
    del body, document
    before = node.vm("VmHWM")
    node.reset_peak()
    rsp = send_file(node, path, ExplicitVRLittleEndian)
    grown = node.vm("VmHWM") - min(before, node.vm("VmRSS"))
    assert int(rsp.Status) == 0x0000
    assert grown < 64 * _MIB, f"peak RSS grew by {grown / _MIB:.0f} MiB"
    assert [p for p in node.spooled() if p.name.startswith(ds.SOPInstanceUID + ".")]
    assert_nothing_left(node)


@pytest.mark.parametrize("source", ["nih-png", "RG1_UNCR.dcm"])
def test_legitimate_deflated_cxr_stored(node: Node, tmp_path: Path, source: str) -> None:
    """Real chest radiographs deflate 1.1x (RG1_UNCR, 15-bit CR) to 2.9x: well inside."""
    if source == "nih-png":
        ds = nih_png_dataset(require_nih_pngs()[0])
    else:
        ds = pydicom.dcmread(rg1_file(source))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = write(ds, tmp_path / "cxr-deflated.dcm")
    rsp = send_file(node, path, DeflatedExplicitVRLittleEndian)
    assert int(rsp.Status) == 0
    stored = [p for p in node.spooled() if p.name.startswith(ds.SOPInstanceUID + ".")]
    assert len(stored) == 1
    assert stored[0].read_bytes()[-1000:] == path.read_bytes()[-1000:]  # stored as received
    assert pydicom.dcmread(stored[0]).PixelData == ds.PixelData
    assert_nothing_left(node)


def _inflated_peak(path: Path, limits: InflateLimits) -> tuple[int, float]:
    """(peak Python memory, seconds) of :func:`read_header` on ``path``."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        read_header(path, inflate=limits)
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, elapsed


def test_bomb_walked_without_holding_it(tmp_path: Path) -> None:
    """Even allowed to inflate the whole 1 GiB, the reader holds a few MiB (before: 2 GiB)."""
    bomb, _ = deflate_bomb(tmp_path / "bomb.dcm")
    peak, elapsed = _inflated_peak(bomb, InflateLimits(max_ratio=1100, max_bytes=2 << 30))
    assert peak < 16 * _MIB, f"peak {peak / _MIB:.0f} MiB"
    assert elapsed < 60


def test_undefined_length_sequence_not_held(tmp_path: Path) -> None:
    """An undefined-length sequence whose item holds 256 MiB: walked, not parsed into memory
    (pydicom's read_sequence would hold all of it)."""
    ds = _header_dataset()
    big = 256 * _MIB
    head = (
        _encode(ds)
        + struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)  # Content Sequence
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + _ob_header((0x0042, 0x0011), big)  # Encapsulated Document
    )
    tail = struct.pack("<HHLHHL", 0xFFFE, 0xE00D, 0, 0xFFFE, 0xE0DD, 0)
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = c.compress(head)
    zeros = bytes(_MIB)
    for _ in range(big // _MIB):
        body += c.compress(zeros)
    body += c.compress(tail) + c.flush()
    path = _part10(ds, DeflatedExplicitVRLittleEndian, body, tmp_path / "sq.dcm")
    peak, _ = _inflated_peak(path, InflateLimits(max_ratio=1100, max_bytes=1 << 30))
    assert peak < 16 * _MIB, f"peak {peak / _MIB:.0f} MiB"
    assert read_header(path, inflate=InflateLimits(1100, 1 << 30)).sop_instance_uid


@pytest.mark.parametrize(
    ("inflated", "why"),
    [
        (bytes(64 * _MIB), "out of tag order"),  # zeros: (0000,0000) again and again
        (
            b"".join(
                struct.pack("<HH2sHL", 0x0071, 0x1000 + i, b"SQ", 0, 0xFFFFFFFF)
                + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
                for i in range(40)
            ),
            "nested deeper",
        ),
        (struct.pack("<HHL", 0xFFFE, 0xE000, 0) * 1_100_000, "item tag"),
    ],
    ids=["zeros", "deep-nesting", "stray-items"],
)
def test_malformed_inflated_structure_refused_fast(tmp_path: Path, inflated: bytes, why: str):
    ds = _header_dataset()
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = c.compress(_encode(ds) + inflated) + c.flush()
    path = _part10(ds, DeflatedExplicitVRLittleEndian, body, tmp_path / "bad.dcm")
    t0 = time.perf_counter()
    with pytest.raises(DataSetError) as info:
        read_header(path, inflate=InflateLimits(max_ratio=1100, max_bytes=1 << 30))
    assert info.value.status == StoreStatus.CANNOT_UNDERSTAND
    assert why in info.value.message
    assert time.perf_counter() - t0 < 10


def test_file_meta_elements_in_the_data_set_refused(tmp_path: Path) -> None:
    """A data set that starts with group 0002 elements would be read as part of the file
    meta, e.g. a (0002,0010) telling the reader a deflated data set is not deflated."""
    ds = _header_dataset()
    forged = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", 18) + b"1.2.840.10008.1.2\x00"
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = forged + c.compress(_encode(ds)) + c.flush()
    path = _part10(ds, DeflatedExplicitVRLittleEndian, body, tmp_path / "forged.dcm")
    with pytest.raises(DataSetError, match="group length"):
        read_header(path)


def test_too_many_headers_refused(tmp_path: Path) -> None:
    """1.1 million empty items in one sequence (8.8 MB): refused at the 1,000,000th header."""
    ds = _header_dataset()
    items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) * 1_100_000
    sq = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + items
    path = _part10(ds, ExplicitVRLittleEndian, _encode(ds) + sq, tmp_path / "items.dcm")
    with pytest.raises(DataSetError, match="more than 1000000 elements"):
        read_header(path)


def test_inflate_ceiling_and_real_deflated_files(tmp_path: Path) -> None:
    """pydicom's real deflated file (with a gzip-style trailer after the stream) reads; a
    legitimate radiograph past ``deflate_max_inflated_mb`` is refused with the limit named."""
    assert read_header(rg1_file("image_dfl.dcm")).sop_instance_uid
    ds = pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = write(ds, tmp_path / "rg1-deflated.dcm")
    native = read_header(rg1_file("RG1_UNCR.dcm"))
    assert read_header(path) == replace(native, transfer_syntax=DeflatedExplicitVRLittleEndian)
    with pytest.raises(DataSetError, match="inflates beyond 4 MiB"):
        read_header(path, inflate=InflateLimits(max_ratio=100, max_bytes=4 * _MIB))


# --- item 5: temporary files, aborts, kills -----------------------------------------------


def _big_file(tmp_path: Path, mib: int) -> tuple[Path, Dataset]:
    """An instance whose Pixel Data is ``mib`` MiB of zeros, written a MiB at a time."""
    ds = _header_dataset()
    path = _part10(
        ds,
        ExplicitVRLittleEndian,
        _encode(ds) + _ob_header((0x7FE0, 0x0010), mib * _MIB),
        tmp_path / "big.dcm",
    )
    with open(path, "ab") as fh:
        for _ in range(mib):
            fh.write(bytes(_MIB))
    return path, ds


def _send_part(node: Node, path: Path, fraction: float) -> AE:
    """Associate, send the C-STORE-RQ command and ``fraction`` of the data set's P-DATA
    PDUs through pynetdicom's own encoder, and leave the association open (established)."""
    ae = _scu()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    meta, offset = split_dataset(path)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    req.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    req.Priority = 2
    req._dataset_path = (path, offset)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    cx = assoc.accepted_contexts[0]
    pdus = list(msg.encode_msg(cx.context_id, 16384))
    for pdata in pdus[: max(2, int(len(pdus) * fraction))]:
        assoc.dul.send_pdu(pdata)
    return assoc


def _wait_staged(node: Node) -> Path:
    """The partial data set pynetdicom is writing, once it has some bytes."""
    found: list[Path] = []

    def partial() -> bool:
        found[:] = [p for p in node.staged() if p.stat().st_size > 0]
        return bool(found)

    wait_for(partial, timeout=20, interval=0.005)
    return found[0]


def test_aborted_transfer_leaves_no_file(node: Node, tmp_path: Path) -> None:
    """A real pynetdicom SCU sends half a data set, then A-ABORT (before: file left in $TMPDIR)."""
    path, ds = _big_file(tmp_path, 8)
    assoc = _send_part(node, path, 0.5)
    partial = _wait_staged(node)
    assert partial.parent == node.incoming  # received into the spool, not $TMPDIR
    assoc.abort()
    assert_nothing_left(node)
    assert not [p for p in node.spooled() if p.name.startswith(ds.SOPInstanceUID + ".")]


def test_partial_file_hook_matches_pynetdicom(tmp_path: Path) -> None:
    """``integration.scp`` finds the file of an unfinished C-STORE through pynetdicom's private
    ``dimse.message._data_set_file``: this fails if a pynetdicom upgrade moves it."""
    decode = inspect.getsource(DIMSEMessage.decode_msg)
    assert "NamedTemporaryFile" in decode and "self._data_set_file" in decode
    assert "self.message" in inspect.getsource(DIMSEServiceProvider.__init__)
    msg = DIMSEMessage()
    assert msg._data_set_file is None
    assert _partial_received_file(SimpleNamespace(dimse=SimpleNamespace(message=msg))) is None
    with open(tmp_path / "partial.dcm", "wb") as handle:
        msg._data_set_file = handle  # type: ignore[assignment]
        found = _partial_received_file(SimpleNamespace(dimse=SimpleNamespace(message=msg)))
        assert found == (handle, tmp_path / "partial.dcm")


def test_sigkilled_sender_leaves_no_file(node: Node, tmp_path: Path) -> None:
    """DCMTK storescu SIGKILLed mid-transfer: the connection just drops."""
    path, _ = _big_file(tmp_path, 128)
    sender = subprocess.Popen(
        [
            dcmtk("storescu"),
            "-aet",
            PACS_AET,
            "-aec",
            NODE_AET,
            "--max-send-pdu",
            "4096",
            "127.0.0.1",
            str(node.port),
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_staged(node)
        assert sender.poll() is None, "storescu finished before it could be killed"
        sender.kill()
    finally:
        if sender.poll() is None:
            sender.kill()
        sender.wait(timeout=10)
    assert_nothing_left(node)


def test_sigkilled_node_leaves_nothing_after_restart(tmp_path: Path) -> None:
    """The node itself SIGKILLed mid-transfer: its partial file is removed at the next start."""
    path, _ = _big_file(tmp_path, 8)
    first = serve(tmp_path / "n")
    try:
        assoc = _send_part(first, path, 0.5)
        _wait_staged(first)
        first.proc.kill()
        first.proc.wait(timeout=10)
        assoc.abort()
        assert first.staged(), "nothing staged to clean up"
    finally:
        stop(first)
    second = serve(tmp_path / "n")
    try:
        assert second.staged() == []
        assert not list(second.tmpdir.iterdir())
    finally:
        stop(second)


# --- item 10: corrupt Specific Character Set ----------------------------------------------


def _with_charset(element: bytes, path: Path) -> Path:
    ds = _header_dataset()
    del ds.SpecificCharacterSet
    return _part10(ds, ExplicitVRLittleEndian, element + _encode(ds), path)


def _cs(vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0008, 0x0005, vr, len(value)) + value


@pytest.mark.parametrize(
    ("element", "status"),
    [
        (_cs(b"US", b"\x01\x02\x03"), StoreStatus.CANNOT_UNDERSTAND),  # before: 0xC2FF
        (_cs(b"CS", b"\xff\xfe"), StoreStatus.CANNOT_UNDERSTAND),
        (_cs(b"CS", b"ISO 2022 IR 6\\\x1b$B"), StoreStatus.CANNOT_UNDERSTAND),
        (_cs(b"CS", b"ISO_IR 999 "), StoreStatus.SUCCESS),  # unknown term: default repertoire
        (_cs(b"CS", b"ISO_IR 192"), StoreStatus.SUCCESS),
    ],
    ids=["wrong-vr", "not-cs-bytes", "escape", "unknown-term", "utf8"],
)
def test_corrupt_specific_character_set(
    node: Node, tmp_path: Path, element: bytes, status: int
) -> None:
    path = _with_charset(element, tmp_path / "cs.dcm")
    rsp = send_file(node, path, ExplicitVRLittleEndian)
    assert int(rsp.Status) == status
    if status:
        assert "Specific Character Set" in str(rsp.ErrorComment)
    assert "Traceback" not in node.log_text()
    assert_nothing_left(node)


# --- item 5: full disks -------------------------------------------------------------------


@contextmanager
def tmpfs(target: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``target`` for the test, or skip (needs root)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(
            "mounting a tmpfs needs root; test_free_space_floor_refuses_transiently "
            "covers 0xA700 with the floor set above the free space"
        )
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(target)],
        capture_output=True,
        timeout=30,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, timeout=30)


def _instance(tmp_path: Path, mib: int, name: str) -> Path:
    ds = _header_dataset()
    body = _encode(ds) + _ob_header((0x7FE0, 0x0010), mib * _MIB) + os.urandom(mib * _MIB)
    return _part10(ds, ExplicitVRLittleEndian, body, tmp_path / name)


def test_full_disks_answer_a700_not_abort(tmp_path: Path) -> None:
    """``$TMPDIR`` a real 1 MiB tmpfs, full; the spool, and with it the staging folder
    pynetdicom receives into, a real 24 MiB tmpfs with min_free_disk_mb 6. 2 MiB instances
    are stored (before: received into the full $TMPDIR, ENOSPC, A-ABORT) until the floor,
    then answered 0xA700 on the same association, never A-ABORT."""
    files = [_instance(tmp_path, 2, f"i{i}.dcm") for i in range(12)]
    statuses: list[int] = []
    comments: list[str] = []
    with tmpfs(tmp_path / "spool", "24m") as spool, tmpfs(tmp_path / "tmp", "1m") as tmpdir:
        (tmpdir / "full").write_bytes(bytes(shutil.disk_usage(tmpdir).free))
        assert shutil.disk_usage(tmpdir).free == 0
        (tmpdir / "full").unlink()  # an empty folder on a disk too small for one instance
        node = serve(tmp_path / "n", min_free_disk_mb=6, spool=spool, tmpdir=tmpdir)
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            assoc = _scu().associate("127.0.0.1", node.port, ae_title=NODE_AET)
            assert assoc.is_established
            for path in files:
                rsp = assoc.send_c_store(path)
                assert rsp is not None and "Status" in rsp, "association aborted"
                statuses.append(int(rsp.Status))
                comments.append(str(rsp.get("ErrorComment", "")))
            assert assoc.is_established
            assoc.release()
            assert_nothing_left(node)
            assert len(node.spooled()) == statuses.count(0)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
            stop(node)
    first_refusal = statuses.index(StoreStatus.OUT_OF_RESOURCES_DISK)
    assert first_refusal >= 3, statuses
    assert statuses[first_refusal:] == [StoreStatus.OUT_OF_RESOURCES_DISK] * (12 - first_refusal)
    assert "spool disk" in comments[first_refusal]


def test_full_database_filesystem_answers_a700(tmp_path: Path) -> None:
    """The SQLite database's folder on a real 8 MiB tmpfs filled below min_free_disk_mb (4):
    0xA700 naming the database disk although the spool has room; the retry after space is
    freed is stored (before: only the spool's file system was checked)."""
    with tmpfs(tmp_path / "db", "8m") as dbdir:
        scp = start_scp(tmp_path, f"sqlite:///{dbdir / 'node.sqlite3'}", min_free_disk_mb=4)
        try:
            filler = dbdir / "filler"
            filler.write_bytes(bytes(max(0, shutil.disk_usage(dbdir).free - 2 * _MIB)))
            ds = _header_dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ae = _scu()
            assoc = ae.associate("127.0.0.1", scp.port, ae_title=NODE_AET)
            assert assoc.is_established
            try:
                rsp = assoc.send_c_store(ds)
                assert int(rsp.Status) == StoreStatus.OUT_OF_RESOURCES_DISK
                assert str(rsp.ErrorComment).startswith("database disk")
                assert scp.rows() == [] and scp.spool_files() == []
                filler.unlink()
                assert int(assoc.send_c_store(ds).Status) == 0
            finally:
                assoc.release()
            assert len(scp.rows()) == 1
        finally:
            scp.stop()
