"""Ingest throughput of the node's storage SCP against DCMTK ``storescp -B``, same run.

Not a test. The node runs as ``python -m node.cli serve`` (a subprocess, with fsync, SQLite
in the temp dir); DCMTK ``storescp -B`` (bit-preserving, no fsync) is the reference. Two
bare pynetdicom SCPs (this file with ``--bare-scp``: a plain pynetdicom AE with the node's
maximum PDU size and chunked receive, its C-STORE handler doing nothing, or only moving the
file into a folder with the node's fsyncs) show the ceiling the DICOM library sets before
the node does any work of its own. The sender for all is DCMTK ``storescu``:
``--associations`` of them at once, each with its share of the instances over one
association (``storescp --fork`` then). ``--receivers`` runs that many node processes on
the one port (``reuse_port``, a shared spool and SQLite file).
Every target gets fresh SOP Instance UIDs (a warm-up set first, then the measured sets), so
the node records new instances, not duplicates.

Measured:

- CXR-size instances (synthetic DX, default 2500 x 2500, 16-bit: ~12.5 MB each): MB/s and
  instances/s;
- small instances (512 x 512, 16-bit: ~0.5 MB): instances/s;
- the node's peak resident memory (``VmHWM`` from ``/proc/<pid>/status``) after a burst of
  ``--burst`` CXR-size instances.

Usage::

    python benchmarks/bench_ingest.py                 # full run (needs ~3 x N x 12.5 MB disk)
    python benchmarks/bench_ingest.py --smoke         # 10 large, 50 small, burst 10
    python benchmarks/bench_ingest.py --associations 4
    python benchmarks/bench_ingest.py --associations 4 --receivers 2   # reuse_port
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


def make_files(out: Path, n: int, rows: int, cols: int, *, seed: int = 0, parts: int = 1) -> int:
    """Write ``n`` DX instances (16-bit, one study, fresh UIDs); return the bytes of one.

    With ``parts`` > 1 they go round-robin into ``out/0`` ... ``out/<parts - 1>``, one
    folder per association of :func:`send`.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    img = ((yy * 7 + xx * 3) % 4096 + rng.integers(0, 64, (rows, cols))).astype(np.uint16)
    pixels = img.tobytes()
    study, series = generate_uid(), generate_uid()
    folders = [out / str(k) for k in range(parts)] if parts > 1 else [out]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    size = 0
    for i in range(n):
        ds = dx_dataset(study, series, i + 1, rows, cols, pixels)
        ds.ViewPosition = "PA"
        path = folders[i % parts] / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        size = path.stat().st_size
    return size


def _storescu(port: int, files: Path) -> subprocess.CompletedProcess[str]:
    names = sorted(str(p) for p in files.iterdir())
    cmd = [dcmtk("storescu"), "-xe", "-aet", CALLING, "-aec", NODE_AET, "127.0.0.1", str(port)]
    return subprocess.run(
        [*cmd, *names],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )


def send(port: int, files: Path) -> float:
    """storescu the files of ``files`` over one association, or, when ``files`` holds
    folders (:func:`make_files` with ``parts``), each folder over its own association, all
    at once; return seconds."""
    folders = sorted(p for p in files.iterdir() if p.is_dir()) or [files]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(folders)) as pool:
        results = list(pool.map(lambda f: _storescu(port, f), folders))
    dt = time.perf_counter() - t0
    for r in results:
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
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        """SIGTERM, then wait (every process)."""
        for proc in (self.proc, *self.others):
            stop(proc)


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
        "CXR_NODE_LOG_LEVEL": os.environ.get("CXR_NODE_LOG_LEVEL", "WARNING"),
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


def wait_listeners(port: int, count: int, timeout: float = 60.0) -> None:
    """Block until ``count`` sockets listen on ``port`` (``/proc/net/tcp``: with
    ``SO_REUSEPORT`` each receiver process has its own; connecting cannot tell them apart)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        listening = sum(
            1
            for line in lines
            if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"  # LISTEN
        )
        if listening >= count:
            return
        time.sleep(0.1)
    raise TimeoutError(f"fewer than {count} sockets listen on port {port}")


def start_node(work: Path, receivers: int = 1) -> Target:
    """``python -m node.cli serve`` on a free port with its own spool and SQLite file; with
    several ``receivers``, that many processes on the port (``reuse_port``, one spool,
    ``spool_shared``), the API in the first only."""
    port = free_port()
    shared = (
        {"CXR_NODE_REUSE_PORT": "true", "CXR_NODE_SPOOL_SHARED": "true"} if receivers > 1 else {}
    )
    procs = []
    for k in range(receivers):
        api = {"CXR_NODE_API_PORT": str(free_port())} if k == 0 else {"CXR_NODE_API_ENABLED": "0"}
        procs.append(
            spawn_node(work, port, work / "node-spool", work / "node.sqlite3", {**shared, **api})
        )
        try:
            wait_listeners(port, k + 1)
        except TimeoutError:
            for proc in procs:
                proc.kill()
            tail = (work / "node.log").read_text()[-3000:]
            raise SystemExit(f"node did not start:\n{tail}") from None
    name = "node (fsync)" if receivers == 1 else f"node (fsync) x{receivers}"
    return Target(name, port, procs[0], procs[1:])


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


def start_storescp(work: Path, associations: int = 1) -> Target:
    """DCMTK ``storescp -B`` (bit-preserving) writing into ``work/storescp``; with several
    associations at once, ``--fork`` (one process per association)."""
    port = free_port()
    fork = ["--fork"] if associations > 1 else []
    proc = spawn_storescp(work / "storescp", port, *fork, "-B", "+xa")
    wait_port(port)
    return Target("storescp -B", port, proc)


def bare_scp(port: int, mode: str, out: Path) -> None:
    """Run a bare pynetdicom storage SCP until killed (``--bare-scp``).

    Parameters
    ----------
    port
        Its port on 127.0.0.1.
    mode
        ``none``: the handler answers success at once; ``fsync``: it first moves the received
        file into ``out`` and makes it durable as the node's spool does (fsync of the file,
        of the folder).
    out
        The folder for ``fsync``.
    """
    import uuid

    from pynetdicom import AE, _config, evt

    from integration.transport_limits import DEFAULT_MAX_PDU_SIZE
    from node.runtime.spool import fsync_dir

    _config.STORE_RECV_CHUNKED_DATASET = True  # as the node (integration.ae)
    out.mkdir(parents=True, exist_ok=True)

    def handle(event: object) -> int:
        if mode == "fsync":  # the spool's durability: the file, then its folder
            dst = out / f"{uuid.uuid4().hex}.dcm"
            os.replace(event.dataset_path, dst)  # type: ignore[attr-defined]
            with open(dst, "rb") as fh:
                os.fsync(fh.fileno())
            fsync_dir(out)
        return 0

    ae = AE(ae_title=NODE_AET)
    ae.maximum_pdu_size = DEFAULT_MAX_PDU_SIZE
    ae.add_supported_context(DigitalXRayImageStorageForPresentation, [ExplicitVRLittleEndian])
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, handle)])


def start_bare(work: Path, mode: str) -> Target:
    """:func:`bare_scp` in a subprocess."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--bare-scp", str(port), mode, str(work / f"bare-{mode}")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wait_port(port)
    label = "pynetdicom, no-op handler" if mode == "none" else "pynetdicom + fsync"
    return Target(label, port, proc)


def _measure(target: Target, work: Path, args: argparse.Namespace, large_size: int) -> dict:
    """Warm up, then time the small and the CXR-size sets (and the node's memory burst)."""
    send(target.port, work / "warm")
    t_small = send(target.port, work / "small")
    t_large = send(target.port, work / "large")
    res = {
        "large_mb_s": large_size * args.n / t_large / 1e6,
        "large_inst_s": args.n / t_large,
        "small_inst_s": args.small_n / t_small,
    }
    if target.name.startswith("node"):
        before = vm_hwm_kib(target.proc.pid)
        send(target.port, work / "burst")
        res["hwm_before_mib"] = before / 1024
        res["hwm_after_burst_mib"] = vm_hwm_kib(target.proc.pid) / 1024
    return res


def _fresh_sets(work: Path, args: argparse.Namespace) -> int:
    """(Re)write the warm-up, small, CXR-size and burst sets with fresh UIDs; return the
    size of one CXR-size file."""
    for name in ("warm", "small", "large", "burst"):
        shutil.rmtree(work / name, ignore_errors=True)
    k = args.associations
    make_files(work / "warm", 10 * k, 512, 512, seed=3, parts=k)
    make_files(work / "small", args.small_n, 512, 512, seed=1, parts=k)
    size = make_files(work / "large", args.n, args.rows, args.cols, parts=k)
    return size


def main() -> None:
    """Run the benchmark and print one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50, help="CXR-size instances per run")
    ap.add_argument("--rows", type=int, default=2500)
    ap.add_argument("--cols", type=int, default=2500)
    ap.add_argument("--small-n", type=int, default=300, help="small instances per run")
    ap.add_argument("--burst", type=int, default=200, help="CXR-size burst for peak memory")
    ap.add_argument("--associations", type=int, default=1, help="senders at once")
    ap.add_argument("--receivers", type=int, default=1, help="node processes on the port")
    ap.add_argument("--smoke", action="store_true", help="10 large, 50 small, burst 10")
    ap.add_argument("--workdir", type=Path, default=None, help="where files go (default: tmp)")
    ap.add_argument("--bare-scp", nargs=3, metavar=("PORT", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_scp:
        bare_scp(int(args.bare_scp[0]), args.bare_scp[1], Path(args.bare_scp[2]))
        return
    if args.smoke:
        args.n, args.small_n, args.burst = 10, 50, 10

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
    try:
        large_size = _fresh_sets(work, args)
        need = large_size * (3 * args.n + args.burst) * 1.1
        if shutil.disk_usage(work).free < need:
            raise SystemExit(f"need ~{need / 1e9:.1f} GB free in {work}")
        results: dict[str, dict[str, float]] = {}
        starters = (
            lambda: start_storescp(work, args.associations),
            lambda: start_bare(work, "none"),
            lambda: start_bare(work, "fsync"),
            lambda: start_node(work, args.receivers),
        )
        for starter in starters:
            target = starter()
            try:
                if target.name.startswith("node"):
                    make_files(work / "burst", args.burst, args.rows, args.cols, seed=2)
                results[target.name] = _measure(target, work, args, large_size)
            finally:
                target.stop()
                for name in ("storescp", "node-spool", "bare-none", "bare-fsync"):
                    shutil.rmtree(work / name, ignore_errors=True)
            _fresh_sets(work, args)
        _report(results, args, large_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report(results: dict[str, dict[str, float]], args: argparse.Namespace, size: int) -> None:
    ref = results["storescp -B"]
    names = list(results)
    print(
        f"\nIngest benchmark: {args.n} x {size / 1e6:.1f} MB DX "
        f"({args.rows}x{args.cols} 16-bit), {args.small_n} x 0.5 MB, "
        f"{args.associations} association(s) at once, sender DCMTK storescu, "
        f"{args.receivers} node receiver process(es), "
        f"{os.cpu_count()} CPUs; each cell: value (ratio to storescp -B)\n"
    )
    print(f"{'metric':<30}" + "".join(f"{n:>28}" for n in names))
    for key, label in (
        ("large_mb_s", "CXR-size MB/s"),
        ("large_inst_s", "CXR-size instances/s"),
        ("small_inst_s", "small (0.5 MB) instances/s"),
    ):
        cells = "".join(
            f"{results[n][key]:>20.1f} ({results[n][key] / ref[key]:.2f}x)" for n in names
        )
        print(f"{label:<30}{cells}")
    node = results[names[-1]]
    print(
        f"node peak RSS (VmHWM): {node['hwm_after_burst_mib']:.0f} MiB after the "
        f"{args.burst}-instance burst (before: {node['hwm_before_mib']:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
