"""Fixtures for the DICOM boundary tests: real CXRs, DCMTK storescp, Orthanc."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.dicom.orthanc import OrthancServer
from tests.helpers import (
    free_port,
    port_open,
    require_binary,
    require_nih_pngs,
    rg1_file,
    terminate,
    wait_for,
)

#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1)
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


@functools.cache
def _find_dcmtk(name: str) -> str | None:
    candidates = [str(Path(d) / name) for d in os.environ.get("PATH", "").split(os.pathsep)]
    candidates.append(f"/usr/bin/{name}")
    for path in candidates:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        with open(path, "rb") as fh:
            if fh.read(2) == b"#!":  # a script (pynetdicom's apps), not DCMTK's binary
                continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return path
    return None


def dcmtk_binary(name: str) -> str:
    """Path of the DCMTK tool ``name``; skip if absent.

    The venv's ``bin/`` also holds pynetdicom's ``storescp``/``storescu`` apps, which shadow
    DCMTK's on PATH, so each candidate is asked for its version.
    """
    path = _find_dcmtk(name)
    if path is not None:
        return path
    pytest.skip(f"DCMTK {name} is not installed (scripts/setup.sh --peers installs it)")


@pytest.fixture(scope="session")
def rg1_uncr() -> Dataset:
    """RG1_UNCR: real PA chest CR, MONOCHROME1, 15-bit, uncompressed."""
    return pydicom.dcmread(rg1_file("RG1_UNCR.dcm"))


@pytest.fixture(scope="session")
def rg1_header() -> Dataset:
    """RG1_UNCR header only (no pixel data)."""
    return pydicom.dcmread(rg1_file("RG1_UNCR.dcm"), stop_before_pixels=True)


def make_grey_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **attrs: object,
) -> Dataset:
    """An in-memory single-frame grey SC/DX-like dataset with native pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.fixture(scope="session")
def nih_gray() -> np.ndarray:
    """A real frontal CXR from NIH ChestX-ray14 as a uint8 array."""
    png = require_nih_pngs()[0]
    return np.asarray(Image.open(png).convert("L"), dtype=np.uint8)


@dataclass
class StoreSCP:
    """A running DCMTK storescp."""

    aet: str
    port: int
    out_dir: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture
def dcmtk_storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """DCMTK ``storescp`` on a free port writing to a temp dir."""
    binary = dcmtk_binary("storescp")
    out_dir = tmp_path / "storescp"
    out_dir.mkdir()
    port = free_port()
    log = (tmp_path / "storescp.log").open("wb")
    proc = subprocess.Popen(
        [binary, "-aet", "DCMTKSCP", "-od", str(out_dir), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, timeout=20)
        if proc.poll() is not None:
            pytest.fail(f"storescp exited: {(tmp_path / 'storescp.log').read_text()}")
        yield StoreSCP(aet="DCMTKSCP", port=port, out_dir=out_dir, proc=proc)
    finally:
        terminate(proc, timeout=10)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc with the DICOMweb plugin (module scope: started once per module)."""
    with OrthancServer(tmp_path_factory.mktemp("orthanc"), modalities={}) as server:
        yield server


def which_or_skip(name: str) -> str:
    """Path of a non-DCMTK tool (dciodvfy, gdcmconv) or skip."""
    return require_binary(name)
