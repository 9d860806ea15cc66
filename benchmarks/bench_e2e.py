"""End-to-end latency of one study: 'study complete' -> 'SR written' -> 'SR stored'.

What the node does for a study, measured stage by stage, on this machine: the real RG1 chest
CR (pydicom-data; from the second run on, shifted sideways so that every study has new image
codes) is put through the node's ingest (spool + SQLite), its study is completed
(job queued: the clock starts), a worker claims the job and runs the pipeline (load +
select, convert, VQ-GAN encode, prefill, decode, SR build + durable write, delivery queued),
and, with a destination, the SR is sent with the node's C-STORE SCU (``integration.scu``)
and the clock stops when the destination has stored it (DCMTK ``storescp`` started by this
script: the file appears; or any ``AET@host:port`` such as Orthanc: the C-STORE response).
The delivery component's polling delay is not included (the SR is sent as soon as written).

Bundles: ``--demo`` (the tiny demo bundle, built in a temp dir; the default) or ``--full``:
the published VQ-GAN size and the dolly-v2-3b shape (hidden 2560, 32 layers, 32 heads,
intermediate 10240) with random weights, built once under ``--full-dir`` (about 11 GB of
disk and RAM at 32 layers; ``--llm-layers 2`` for a smoke run), or ``--bundle DIR``.
Model loading and warm-up are reported separately, not in the per-study latency.

Not a test. Usage::

    python benchmarks/bench_e2e.py --demo --runs 3 --max-new-tokens 32 --dest storescp
    python benchmarks/bench_e2e.py --full --backend transformers --dtype bfloat16 \\
        --max-new-tokens 150 --dest storescp --runs 3 --json-out e2e.json
    python benchmarks/bench_e2e.py --full --backend llamacpp --quant q8_0 ...  (after
        ``cxr-node models convert <full-dir> --engine llamacpp --quant q8_0``)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = ("load_s", "convert_s", "encode_s", "prefill_s", "decode_s", "sr_s", "enqueue_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_full_bundle(out: Path, *, layers: int) -> Path:
    """Full-size random bundle: dolly-v2-3b-shaped LLM + published-size VQ-GAN (ONNX)."""
    import yaml

    from models.bundle import (
        DECODER_FILE,
        ENCODER_FILE,
        BundleError,
        ModelBundle,
        write_manifest,
    )
    from models.demo import create_demo_bundle
    from models.onnx_export import export_decoder, export_encoder
    from models.vqgan import VQGANConfig, VQModel

    version = f"random-dolly3b-l{layers}"
    if (out / "manifest.json").is_file():
        try:
            if ModelBundle.open(out).model_version == version:
                return out
        except BundleError:
            pass  # a partial build: start again
    import torch

    t0 = time.perf_counter()
    create_demo_bundle(out, hidden=2560, layers=layers, heads=32, overwrite=True)
    vq_cfg = VQGANConfig()  # the published LLM-CXR VQ-GAN size
    torch.manual_seed(1)
    vq = VQModel(vq_cfg).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.uniform_(-1.0, 1.0)
    export_encoder(vq, out / ENCODER_FILE)
    export_decoder(vq, out / DECODER_FILE)
    (out / "vqgan" / "config.yaml").write_text(
        yaml.safe_dump(vq_cfg.to_yaml_dict(), sort_keys=False), encoding="utf-8"
    )
    old = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    write_manifest(
        out,
        model_name=old["model_name"],
        model_version=version,
        demo=True,
        llm={**old["llm"], "intermediate_size": 10240},
        vqgan={"config": vq_cfg.to_dict()},
        generation=old.get("generation"),
        source={"kind": "random", "shape": "dolly-v2-3b", "layers": layers},
        created_by="benchmarks/bench_e2e.py",
    )
    print(f"built full-size random bundle at {out} in {time.perf_counter() - t0:.0f} s")
    return out


class StoreSCP:
    """DCMTK storescp on a free loopback port (files land in ``out``)."""

    def __init__(self, out: Path) -> None:
        binary = "/usr/bin/storescp"
        if not Path(binary).exists():
            raise SystemExit("DCMTK storescp not found at /usr/bin/storescp")
        self.port = _free_port()
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "-aet", "BENCHSCP", "-od", str(out), "-uf", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("storescp did not start")

    def wait_file(self, sop_uid: str, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.out.glob("*"):
                if sop_uid in p.name and p.stat().st_size > 0:
                    return time.perf_counter()
            time.sleep(0.002)
        raise SystemExit(f"SR {sop_uid} did not arrive at storescp")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--demo", action="store_true", help="tiny demo bundle (default)")
    which.add_argument("--full", action="store_true", help="full-size random-weight bundle")
    which.add_argument("--bundle", type=Path, help="an existing bundle directory")
    ap.add_argument("--full-dir", type=Path, default=Path("/tmp/llmcxr-full-random"))
    ap.add_argument("--llm-layers", type=int, default=32, help="LLM layers of --full (32)")
    ap.add_argument("--backend", choices=("transformers", "llamacpp"), default="transformers")
    ap.add_argument("--dtype", default="auto", help="transformers dtype (auto/float32/bfloat16)")
    ap.add_argument("--quant", default=None, help="llama.cpp quantisation (f16, q8_0, ...)")
    ap.add_argument(
        "--prefill-quant", default=None, help="llama.cpp: the converted file that prefills"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new-tokens", type=int, default=150)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--dest", default=None, help="'storescp' (started here) or AET@host:port (e.g. Orthanc)"
    )
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from integration.scp import ReceivedMeta
    from integration.scu import DicomDestination, send_dataset
    from node.db import jobs as jobs_db
    from node.db import study_completion as completion_db
    from node.db.engine import make_engine, make_session_factory
    from node.db.migrate import upgrade
    from node.db.models import utcnow
    from node.runtime.ingest import IngestSink
    from node.runtime.modelhost import ModelHost
    from node.runtime.pipeline import run_batch
    from node.runtime.stages import PipelineDeps
    from node.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    scp: StoreSCP | None = None
    try:
        if args.full:
            bundle = build_full_bundle(args.full_dir, layers=args.llm_layers)
        elif args.bundle is not None:
            bundle = args.bundle
        else:
            from models.demo import create_demo_bundle

            bundle = work / "demo"
            create_demo_bundle(bundle)
        dest: DicomDestination | None = None
        if args.dest == "storescp":
            scp = StoreSCP(work / "received")
            dest = DicomDestination(ae_title="BENCHSCP", host="127.0.0.1", port=scp.port)
        elif args.dest:
            dest = DicomDestination.parse(args.dest)

        settings = load_settings(
            None,
            database_url=f"sqlite:///{work / 'node.sqlite3'}",
            spool_dir=work / "spool",
            model_dir=bundle,
            backend=args.backend,
            backend_dtype=args.dtype,
            backend_quant=args.quant,
            backend_prefill_quant=args.prefill_quant,
            backend_threads=args.threads,
            backend_device=args.device,
            generation_max_new_tokens=args.max_new_tokens,
            min_free_disk_mb=0,
            lease_seconds=3600.0,
        )
        settings.prepare_runtime()
        engine = make_engine(settings.database_url)
        upgrade(engine)
        sf = make_session_factory(engine)
        sink = IngestSink(settings=settings, session_factory=sf)
        host = ModelHost(settings)
        t0 = time.perf_counter()
        host.start()
        if not host.wait_ready(None):
            raise SystemExit(f"model not loaded: {host.error}")
        load_s = time.perf_counter() - t0
        info = host.info()
        rg1 = pydicom.dcmread(str(get_testdata_file("RG1_UNCR.dcm")))
        deps = PipelineDeps.from_settings(settings, sf)
        rows: list[dict[str, float]] = []
        reused_before = float(host.runtime.backend.health().get("prompt_tokens_reused", 0))
        steps_before = float(host.runtime.backend.health().get("decode_steps", 0))
        for run in range(args.runs):
            ds = copy.deepcopy(rg1)
            if run:  # a different image for every study: new image codes, as in a hospital
                # (an identical prompt would come whole from the llama.cpp prefix cache)
                ds.PixelData = np.roll(rg1.pixel_array, 17 * run, axis=1).tobytes()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            src = work / f"in-{run}.dcm"
            ds.save_as(src, enforce_file_format=True)
            meta = ReceivedMeta(
                "PACS",
                "127.0.0.1",
                104,
                str(ds.file_meta.TransferSyntaxUID),
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                settings.ae_title,
            )
            assert sink.accept(src, meta).status == 0
            with sf() as s:
                completion_db.complete_quiet_studies(
                    s,
                    quiet_seconds=0.001,
                    max_wait_seconds=600,
                    rule=settings.chest_rule,
                    now=utcnow(),
                )
            t_queued = time.perf_counter()  # study complete: the job is queued
            with sf() as s:
                job = jobs_db.claim_next_job(s, owner="bench/w0", lease_seconds=3600)
            assert job is not None
            [outcome] = run_batch(deps, [job.id], host, owner="bench/w0")
            t_written = time.perf_counter()
            if outcome.status != "done":
                raise SystemExit(f"job failed: {outcome.error}")
            row = {k: float(outcome.timings.get(k, 0.0)) for k in STAGES}
            # prompt ids of this study that came from the llama.cpp prefix cache (the template)
            reused_total = float(host.runtime.backend.health().get("prompt_tokens_reused", 0))
            row["prompt_ids_reused"] = reused_total - reused_before
            reused_before = reused_total
            row["tokens"] = float(outcome.timings.get("tokens", 0.0))
            # llama.cpp: decode steps of this study
            steps_total = float(host.runtime.backend.health().get("decode_steps", 0))
            row["decode_steps"] = steps_total - steps_before
            steps_before = steps_total
            row["to_sr_written_s"] = t_written - t_queued
            if dest is not None and outcome.sr_path is not None:
                t_send = time.perf_counter()
                send_dataset(outcome.sr_path, dest, calling_ae=settings.ae_title)
                t_stored = (
                    scp.wait_file(str(outcome.sr_uid)) if scp is not None else time.perf_counter()
                )
                row["send_s"] = t_stored - t_send
                row["to_sr_stored_s"] = t_stored - t_queued
            rows.append(row)
            print(f"run {run + 1}/{args.runs}: " + " ".join(f"{k}={v:.3f}" for k, v in row.items()))

        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        label = "full-size random" if args.full else ("bundle" if args.bundle else "demo")
        print()
        print(
            f"bundle: {label} {info['model_name']} {info['model_version']} | backend "
            f"{info['backend']} dtype={info['dtype']} quant={info['quant']} prefill="
            f"{info['prefill_quant']} device="
            f"{info['device']} | max_new_tokens {args.max_new_tokens} | load+warmup "
            f"{load_s:.1f} s | {args.runs} runs, median"
        )
        print(f"{'stage':<28}{'seconds':>10}")
        names = {
            "load_s": "load + select (headers)",
            "convert_s": "convert (pixels -> input)",
            "encode_s": "VQ-GAN encode",
            "prefill_s": "LLM prefill",
            "decode_s": "LLM decode",
            "sr_s": "SR build + durable write",
            "enqueue_s": "delivery queued",
            "send_s": "send (C-STORE, stored)",
            "to_sr_written_s": "TOTAL complete -> SR written",
            "to_sr_stored_s": "TOTAL complete -> SR stored",
        }
        for key, name in names.items():
            if key in med:
                print(f"{name:<28}{med[key]:>10.3f}")
        print(f"{'generated tokens':<28}{med['tokens']:>10.0f}")
        if med["decode_steps"]:
            print(f"{'decode steps':<28}{med['decode_steps']:>10.0f}")
        if args.json_out:
            args.json_out.write_text(
                json.dumps(
                    {"info": info, "load_s": load_s, "runs": rows, "median": med},
                    indent=2,
                    default=str,
                ),
                encoding="utf-8",
            )
        engine.dispose()
    finally:
        if scp is not None:
            scp.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
