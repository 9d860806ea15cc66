"""Ingest throughput of the node's storage SCP against DCMTK ``storescp -B``, same run.

Not a test. The node runs as ``python -m node.cli serve`` (a subprocess, with fsync, SQLite
in the temp dir); DCMTK ``storescp -B`` (bit-preserving, no fsync) is the reference. The
sender for both is DCMTK ``storescu``, one association per batch, so the sender is the same.

Measured:

- CXR-size instances (synthetic DX, default 2500 x 2500, 16-bit: ~12.5 MB each): MB/s and
  instances/s;
- small instances (512 x 512, 16-bit: ~0.5 MB): instances/s;
- the node's peak resident memory (``VmHWM`` from ``/proc/<pid>/status``) after a burst of
  ``--burst`` CXR-size instances.

Usage::

    python benchmarks/bench_ingest.py                 # full run (needs ~3 x N x 12.5 MB disk)
    python benchmarks/bench_ingest.py --smoke         # 10 large, 50 small, burst 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
# DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1: with it on, every small-instance
# response waits ~40 ms. Both the DCMTK sender and the DCMTK receiver get it.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
NODE_AET = "LLMCXR"
CALLING = "BENCH"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 120.0, source: str | None = None) -> None:
    """Block until something accepts connections on ``port``.

    Parameters
    ----------
    port
        The port on 127.0.0.1.
    timeout
        Seconds before :class:`TimeoutError`.
    source
        The probe's own loopback address (default: the system's choice).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(
                ("127.0.0.1", port), 0.5, source_address=(source, 0) if source else None
            ):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


def dcmtk(name: str) -> str:
    """DCMTK's binary (the venv's pynetdicom apps of the same name are scripts)."""
    for d in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK) and p.read_bytes()[:2] != b"#!":
            return str(p)
    raise SystemExit(f"DCMTK {name} not found (apt-get install dcmtk)")


def dx_dataset(
    study: str, series: str, number: int, rows: int, cols: int, pixels: bytes
) -> Dataset:
    """One synthetic chest DX instance (16-bit, 12 bits stored, MONOCHROME2).

    Parameters
    ----------
    study, series
        Its Study and Series Instance UIDs.
    number
        Instance Number.
    rows, cols
        Its size; ``pixels`` holds ``rows * cols`` 16-bit values.
    pixels
        Pixel Data.

    Returns
    -------
    Dataset
        With file meta (Explicit VR Little Endian), a fresh SOP Instance UID.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.BodyPartExamined, ds.PatientID = "DX", "CHEST", "BENCH"
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels
    return ds


def make_files(out: Path, n: int, rows: int, cols: int, *, seed: int = 0) -> int:
    """Write ``n`` DX instances (16-bit, one study); return the bytes of one file."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    img = ((yy * 7 + xx * 3) % 4096 + rng.integers(0, 64, (rows, cols))).astype(np.uint16)
    pixels = img.tobytes()
    study, series = generate_uid(), generate_uid()
    size = 0
    for i in range(n):
        ds = dx_dataset(study, series, i + 1, rows, cols, pixels)
        ds.ViewPosition = "PA"
        path = out / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        size = path.stat().st_size
    return size


def send(port: int, files: Path) -> float:
    """storescu every file of ``files`` over one association; return seconds."""
    names = sorted(str(p) for p in files.iterdir())
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            dcmtk("storescu"),
            "-xe",
            "-aet",
            CALLING,
            "-aec",
            NODE_AET,
            "127.0.0.1",
            str(port),
            *names,
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return dt


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of ``pid`` in KiB (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then wait (SIGKILL after a minute)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Target:
    """A receiver under test."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        """SIGTERM, then wait."""
        stop(self.proc)


def spawn_node(
    work: Path, port: int, spool: Path, database: Path, settings: dict[str, str]
) -> subprocess.Popen[bytes]:
    """``python -m node.cli serve`` (study completion held off, log ``work/node.log``).

    Parameters
    ----------
    work
        The benchmark's folder (its log goes there).
    port
        DICOM port.
    spool, database
        Its spool folder and SQLite file.
    settings
        Further ``CXR_NODE_*`` variables.

    Returns
    -------
    subprocess.Popen
        The running node; stop it with :func:`stop`.
    """
    env = {
        **os.environ,
        "CXR_NODE_AE_TITLE": NODE_AET,
        "CXR_NODE_HOST": "127.0.0.1",
        "CXR_NODE_PORT": str(port),
        "CXR_NODE_SPOOL_DIR": str(spool),
        "CXR_NODE_DATABASE_URL": f"sqlite:///{database}",
        "CXR_NODE_STUDY_QUIET_SECONDS": "3600",
        "CXR_NODE_STUDY_MAX_WAIT_SECONDS": "7200",
        "CXR_NODE_MIN_FREE_DISK_MB": "0",
        "CXR_NODE_LOG_LEVEL": "WARNING",
        **settings,
    }
    env.pop("CXR_NODE_CONFIG", None)
    with open(work / "node.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def start_node(work: Path) -> Target:
    """``python -m node.cli serve`` on a free port with its own spool and SQLite file."""
    port = free_port()
    proc = spawn_node(
        work,
        port,
        work / "node-spool",
        work / "node.sqlite3",
        {"CXR_NODE_API_PORT": str(free_port())},
    )
    try:
        wait_port(port, timeout=60)
    except TimeoutError:
        proc.kill()
        tail = (work / "node.log").read_text()[-3000:]
        raise SystemExit(f"node did not start:\n{tail}") from None
    return Target("node (fsync)", port, proc)


def spawn_storescp(out: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    """DCMTK ``storescp OPTIONS`` as ``NODE_AET`` on ``port``, writing into ``out`` (made).

    Parameters
    ----------
    out
        The folder it writes the received files into; it must not exist.
    port
        Its port.
    *options
        Its options (e.g. ``-B``, bit-preserving).

    Returns
    -------
    subprocess.Popen
        The running storescp; stop it with :func:`stop`.
    """
    out.mkdir()
    return subprocess.Popen(
        [dcmtk("storescp"), *options, "-aet", NODE_AET, "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )


def start_storescp(work: Path) -> Target:
    """DCMTK ``storescp -B`` (bit-preserving) writing into ``work/storescp``."""
    port = free_port()
    proc = spawn_storescp(work / "storescp", port, "-B", "+xa")
    wait_port(port)
    return Target("storescp -B", port, proc)


def main() -> None:
    """Run the benchmark and print one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50, help="CXR-size instances per run")
    ap.add_argument("--rows", type=int, default=2500)
    ap.add_argument("--cols", type=int, default=2500)
    ap.add_argument("--small-n", type=int, default=300, help="small instances per run")
    ap.add_argument("--burst", type=int, default=200, help="CXR-size burst for peak memory")
    ap.add_argument("--smoke", action="store_true", help="10 large, 50 small, burst 10")
    ap.add_argument("--workdir", type=Path, default=None, help="where files go (default: tmp)")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.small_n, args.burst = 10, 50, 10

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
    try:
        large_size = make_files(work / "large", args.n, args.rows, args.cols)
        make_files(work / "small", args.small_n, 512, 512, seed=1)
        need = large_size * (2 * args.n + args.burst) * 1.1
        if shutil.disk_usage(work).free < need:
            raise SystemExit(f"need ~{need / 1e9:.1f} GB free in {work}")
        results: dict[str, dict[str, float]] = {}
        for starter in (start_storescp, start_node):
            target = starter(work)
            try:
                send(target.port, work / "small")  # warm-up + small-instance rate
                t_small = send(target.port, work / "small")
                t_large = send(target.port, work / "large")
                res = {
                    "large_mb_s": large_size * args.n / t_large / 1e6,
                    "large_inst_s": args.n / t_large,
                    "small_inst_s": args.small_n / t_small,
                }
                if target.name.startswith("node"):
                    burst = work / "burst"
                    make_files(burst, args.burst, args.rows, args.cols, seed=2)
                    before = vm_hwm_kib(target.proc.pid)
                    send(target.port, burst)
                    res["hwm_before_mib"] = before / 1024
                    res["hwm_after_burst_mib"] = vm_hwm_kib(target.proc.pid) / 1024
                results[target.name] = res
            finally:
                target.stop()
                shutil.rmtree(work / "storescp", ignore_errors=True)
                shutil.rmtree(work / "node-spool", ignore_errors=True)

        node, ref = results["node (fsync)"], results["storescp -B"]
        print(
            f"\nIngest benchmark: {args.n} x {large_size / 1e6:.1f} MB DX "
            f"({args.rows}x{args.cols} 16-bit), {args.small_n} x 0.5 MB, one association each, "
            f"sender DCMTK storescu, {os.cpu_count()} CPUs\n"
        )
        print(f"{'metric':<34}{'node (fsync)':>14}{'storescp -B':>14}{'node/ref':>10}")
        for key, label in (
            ("large_mb_s", "CXR-size MB/s"),
            ("large_inst_s", "CXR-size instances/s"),
            ("small_inst_s", "small (0.5 MB) instances/s"),
        ):
            print(f"{label:<34}{node[key]:>14.1f}{ref[key]:>14.1f}{node[key] / ref[key]:>10.2f}")
        print(
            f"{'node peak RSS (VmHWM) MiB':<34}{node['hwm_after_burst_mib']:>14.0f}"
            f"{'':>14}{'':>10}  (before the {args.burst}-instance burst: "
            f"{node['hwm_before_mib']:.0f})"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
