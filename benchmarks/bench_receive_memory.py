"""Peak memory of the node's storage SCP receiving large instances, against DCMTK ``storescp``.

Not a test. For each count of concurrent associations (default 1, 4 and 16), one fresh
``python -m node.cli serve`` (a subprocess: SQLite and spool in the temp dir, fsync on)
receives that many ~150 MB DX instances at once, each over its own association, and the table
shows its peak resident set (``VmHWM`` from ``/proc/<pid>/status``) above its idle size. Two
kinds of sender, in turn:

- DCMTK ``storescu`` (one process per instance), which fragments P-DATA to at most the
  receiver's Maximum Length (PS3.8 D.1);
- pynetdicom (one thread and association per instance, streaming from the file), which
  fragments to exactly the Maximum Length the node advertises (``max_pdu_size``, 1 MiB):
  before the node advertised one, pynetdicom sent each instance as a single PDU and the node
  held about four copies of it.

The reference is DCMTK ``storescp --fork +B`` (bit-preserving: it streams each data set to
its file) receiving the same instances from the same DCMTK senders; its figure is the peak of
the summed ``VmRSS`` of the parent and its children, sampled every 20 ms (the children are
short-lived), above the idle parent.

Usage::

    python benchmarks/bench_receive_memory.py               # 1, 4, 16 x 150 MB (~2.4 GB disk)
    python benchmarks/bench_receive_memory.py --smoke       # 1, 2 x 40 MB
    python benchmarks/bench_receive_memory.py --counts 1 8 --mb 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the DCMTK, node and data helpers of the ingest benchmark (reused, not copied)
from bench_ingest import (
    CALLING,
    DCMTK_ENV,
    NODE_AET,
    dcmtk,
    dx_dataset,
    free_port,
    spawn_node,
    spawn_storescp,
    stop,
    wait_port,
)


def make_files(out: Path, n: int, megabytes: int) -> list[Path]:
    """``n`` distinct DX instances (16-bit, one study) of about ``megabytes`` MB each."""
    out.mkdir(parents=True, exist_ok=True)
    side = int((megabytes * 1_000_000 / 2) ** 0.5)
    pixels = (np.arange(side * side, dtype=np.uint32) % 4096).astype(np.uint16).tobytes()
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = dx_dataset(study, series, i + 1, side, side, pixels)
        path = out / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def status_kib(pid: int, key: str) -> int:
    """``key`` (``VmHWM``, ``VmRSS``) of ``pid`` in KiB, or 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def start_node(work: Path, connections: int) -> tuple[subprocess.Popen[bytes], int]:
    """A fresh ``cxr-node serve`` with its own spool and SQLite file, enough slots."""
    port = free_port()
    shutil.rmtree(work / "node", ignore_errors=True)
    (work / "node").mkdir()
    proc = spawn_node(
        work,
        port,
        work / "node" / "spool",
        work / "node" / "node.sqlite3",
        {
            "CXR_NODE_MAX_ASSOCIATIONS": str(connections + 2),
            "CXR_NODE_MAX_ASSOCIATIONS_PER_ADDRESS": str(connections + 2),
            "CXR_NODE_API_ENABLED": "false",
        },
    )
    wait_port(port, 60.0, source="127.0.0.9")
    time.sleep(1.0)  # settle after start-up
    return proc, port


def send_dcmtk(port: int, files: list[Path]) -> None:
    """One DCMTK ``storescu`` per file, all at once."""
    storescu = [dcmtk("storescu"), "-xe", "-aet", CALLING, "-aec", NODE_AET, "127.0.0.1", str(port)]
    procs = [
        subprocess.Popen(
            [*storescu, str(f)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=DCMTK_ENV,
        )
        for f in files
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-2000:]}")


def send_pynetdicom(port: int, files: list[Path]) -> None:
    """One pynetdicom association per file, from threads, streaming each file."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    errors: list[str] = []

    def one(path: Path) -> None:
        ae = AE(ae_title=CALLING)
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
        if not assoc.is_established:
            errors.append("association not established")
            return
        try:
            status = assoc.send_c_store(path)
            if status is None or int(status.Status) != 0:
                errors.append(f"C-STORE status {status}")
        finally:
            assoc.release()

    threads = [threading.Thread(target=one, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))


def node_peak(work: Path, files: list[Path], send: Callable[[int, list[Path]], None]) -> float:
    """MiB the node's peak RSS rose above its idle RSS while receiving ``files`` at once."""
    proc, port = start_node(work, len(files))
    try:
        idle = status_kib(proc.pid, "VmRSS")
        send(port, files)
        return (status_kib(proc.pid, "VmHWM") - idle) / 1024
    finally:
        stop(proc)


def storescp_peak(work: Path, files: list[Path]) -> float:
    """MiB the summed RSS of ``storescp --fork +B`` and its children rose above idle."""
    port = free_port()
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    proc = spawn_storescp(out, port, "--fork", "+B")
    try:
        wait_port(port, 60.0, source="127.0.0.9")
        time.sleep(0.5)
        idle = status_kib(proc.pid, "VmRSS")
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                pids = [proc.pid, *_children(proc.pid)]
                peak = max(peak, sum(status_kib(p, "VmRSS") for p in pids))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        send_dcmtk(port, files)
        done.set()
        sampler.join()
        return (peak - idle) / 1024
    finally:
        stop(proc)
        shutil.rmtree(out, ignore_errors=True)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def main() -> None:
    """Run the benchmark and print one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--mb", type=int, default=150, help="size of each instance in MB")
    ap.add_argument("--smoke", action="store_true", help="counts 1 2, 40 MB")
    ap.add_argument("--workdir", type=Path, default=None, help="where files go (default: tmp)")
    args = ap.parse_args()
    if args.smoke:
        args.counts, args.mb = [1, 2], 40

    work = Path(tempfile.mkdtemp(prefix="bench-recv-mem-", dir=args.workdir))
    try:
        need = args.mb * 1e6 * max(args.counts) * 3.2
        if shutil.disk_usage(work).free < need:
            raise SystemExit(f"need ~{need / 1e9:.1f} GB free in {work}")
        files = make_files(work / "src", max(args.counts), args.mb)
        size = files[0].stat().st_size
        rows = []
        for n in args.counts:
            batch = files[:n]
            dcmtk_node = node_peak(work, batch, send_dcmtk)
            pyn_node = node_peak(work, batch, send_pynetdicom)
            ref = storescp_peak(work, batch)
            rows.append((n, dcmtk_node, pyn_node, ref))
        print(
            f"\nReceive memory: {size / 1e6:.0f} MB DX instances, one association each, all at "
            f"once; peak RSS above idle, MiB; {os.cpu_count()} CPUs\n"
        )
        print(
            f"{'concurrent':>10}{'node (DCMTK senders)':>23}{'node (pynetdicom)':>20}"
            f"{'storescp --fork +B':>21}{'node/storescp':>15}"
        )
        for n, a, b, ref in rows:
            ratio = f"{max(a, b) / ref:.1f}" if ref > 0 else "-"
            print(f"{n:>10}{a:>23.0f}{b:>20.0f}{ref:>21.0f}{ratio:>15}")
        print(
            "\nnode/storescp compares the node's worse sender with storescp's DCMTK senders; "
            "storescp is sampled every 20 ms, so its peak may be under-read."
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
