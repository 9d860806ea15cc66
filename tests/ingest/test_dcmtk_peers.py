"""DCMTK echoscu/storescu send real chest X-rays to the node's SCP; each instance lands in the
spool byte-identical (data set, for the transfer syntax sent) and in SQL."""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

import pydicom
import pytest

from tests.helpers import free_port, port_open, require_nih_pngs, rg1_file, wait_for
from tests.ingest.conftest import (
    NODE_AET,
    PACS_AET,
    RunningSCP,
    dataset_bytes,
    dcmtk,
    nih_png_dataset,
    sha256,
    write,
)

pytestmark = pytest.mark.integration


def _storescu(node: RunningSCP, path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return _storescu_to(node.port, path, *flags)


def _storescu_to(port: int, path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            dcmtk("storescu"),
            *flags,
            "-aet",
            PACS_AET,
            "-aec",
            NODE_AET,
            "127.0.0.1",
            str(port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def sent_by_dcmtk(path: Path, flags: list[str], tmp_path: Path) -> bytes:
    """The data set bytes storescu really puts on the wire, captured by DCMTK ``storescp -B``.

    storescu re-encodes what it sends (it drops Data Set Trailing Padding and may write
    sequences with undefined length), so the reference is DCMTK's own bit-preserving
    receiver fed by the same storescu command.
    """
    out_dir = tmp_path / f"storescp-{path.stem}"
    out_dir.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-B", "+xa", "-aet", NODE_AET, "-od", str(out_dir), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port), timeout=20)
        out = _storescu_to(port, path, *flags)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    (received,) = list(out_dir.iterdir())
    return dataset_bytes(received)


def test_echoscu(scp: RunningSCP) -> None:
    out = subprocess.run(
        [dcmtk("echoscu"), "-aet", PACS_AET, "-aec", NODE_AET, "127.0.0.1", str(scp.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        ("RG1_UNCR.dcm", ["-xe"]),  # Explicit VR Little Endian
        ("RG1_J2KR.dcm", ["-xv"]),  # JPEG 2000 lossless only
        ("RG1_J2KI.dcm", ["-xw"]),  # JPEG 2000 (lossy) only
    ],
)
def test_storescu_rg1_byte_identical(
    scp: RunningSCP, name: str, flags: list[str], tmp_path: Path
) -> None:
    src = rg1_file(name)
    sent = pydicom.dcmread(src, stop_before_pixels=True)
    out = _storescu(scp, src, *flags)
    assert out.returncode == 0, out.stdout + out.stderr
    row = scp.row(sent.SOPInstanceUID)
    assert row is not None
    assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
    assert row.study_id is not None and row.modality == "CR"
    assert row.body_part_examined == "CHEST"
    spooled = scp.spool.root / row.spool_path
    assert dataset_bytes(spooled) == sent_by_dcmtk(src, flags, tmp_path)
    # and the pixel data is exactly the source file's (no transcoding on the way)
    assert pydicom.dcmread(spooled).PixelData == pydicom.dcmread(src).PixelData
    assert row.sha256 == sha256(spooled) and row.size_bytes == spooled.stat().st_size
    meta = pydicom.dcmread(spooled, stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID


def test_storescu_nih_pngs_as_secondary_capture(scp: RunningSCP, tmp_path: Path) -> None:
    pngs = require_nih_pngs()
    files = [
        write(nih_png_dataset(p, instance_number=i + 1), tmp_path / f"nih{i}.dcm")
        for i, p in enumerate(pngs)
    ]
    for f in files:
        out = _storescu(scp, f, "-xe")
        assert out.returncode == 0, out.stdout + out.stderr
    for f in files:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(scp.spooled(uid)) == sent_by_dcmtk(f, ["-xe"], tmp_path)
        assert pydicom.dcmread(scp.spooled(uid)).PixelData == pydicom.dcmread(f).PixelData
    assert len(scp.rows()) == len(files)


def test_storescu_deflated_transfer_syntax(sqlite_scp: RunningSCP, tmp_path: Path) -> None:
    """Deflated Explicit VR Little Endian (storescu -xd compresses on the fly) is kept as sent."""
    src = write(nih_png_dataset(require_nih_pngs()[0]), tmp_path / "nih.dcm")
    out = _storescu(sqlite_scp, src, "-xd")
    assert out.returncode == 0, out.stdout + out.stderr
    uid = pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID
    row = sqlite_scp.row(uid)
    assert row is not None and row.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"
    spooled = sqlite_scp.spooled(uid)
    ours, reference = dataset_bytes(spooled), sent_by_dcmtk(src, ["-xd"], tmp_path)
    # DCMTK pads an odd-length deflate stream with one zero byte on the wire (even PDV
    # length), which the node keeps and storescp -B drops: otherwise identical.
    assert ours in (reference, reference + b"\x00")
    assert zlib.decompress(ours, -zlib.MAX_WBITS) == zlib.decompress(reference, -zlib.MAX_WBITS)
    assert pydicom.dcmread(spooled).PixelData == pydicom.dcmread(src).PixelData
