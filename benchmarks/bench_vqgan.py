"""VQ-GAN encode latency: PyTorch eager fp32 vs PyTorch bf16 vs onnxruntime.

Random weights at the published LLM-CXR size (ch=128, ch_mult 1,1,2,2,4, 2 res
blocks, attention at 16, z 256, 1024x256 codebook) unless ``--config tiny``. Inputs are
the two real NIH CXRs in ``tests/data`` (tiled to the batch; "NIH Clinical Center,
ChestX-ray8 (Wang et al., CVPR 2017)"), else a fixed random image. Prints one table: median
ms per image, ratio against PyTorch eager fp32 measured in the same run (>1 = faster), and
each runtime's code agreement with fp32.

Not a test. Example::

    python benchmarks/bench_vqgan.py --repeats 10 --batch-sizes 1 8
    python benchmarks/bench_vqgan.py --config tiny --repeats 1 --warmup 0   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

from models.image_tokenizer import OnnxImageTokenizer
from models.onnx_export import export_decoder, export_encoder
from models.preprocess import to_model_batch
from models.vqgan import VQGANConfig, VQModel

NIH_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "nih-chestxray14"

CONFIGS = {
    "published": VQGANConfig(),
    "tiny": VQGANConfig(ch=32, z_channels=64, embed_dim=64),
}


@dataclass
class Row:
    runtime: str
    batch: int
    ms_per_image: float
    ms_min_per_image: float
    agreement: float


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _inputs(batch: int, resolution: int) -> npt.NDArray[np.float32]:
    pngs = sorted(NIH_DIR.glob("*.png"))
    if pngs and resolution == 256:
        from PIL import Image

        imgs = [np.asarray(Image.open(p).convert("L"), dtype=np.uint8) for p in pngs]
        base = to_model_batch(imgs)
    else:
        rng = np.random.default_rng(0)
        base = rng.uniform(-1, 1, (2, 3, resolution, resolution)).astype(np.float32)
    reps = -(-batch // len(base))
    return np.ascontiguousarray(np.concatenate([base] * reps)[:batch])


def _time(fn: Callable[[], object], *, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


Runner = Callable[[], npt.NDArray[np.int64]]


def _runners(
    model: VQModel,
    bf16_model: VQModel | None,
    bf16_mode: str,
    tok: OnnxImageTokenizer | None,
    x: npt.NDArray[np.float32],
) -> list[tuple[str, Runner]]:
    """One encode callable per runtime, all on the same input ``x``."""
    xt = torch.from_numpy(x)

    def fp32() -> npt.NDArray[np.int64]:
        with torch.inference_mode():
            return model.encode_to_codes(xt).numpy()

    cells: list[tuple[str, Runner]] = [("pytorch eager fp32", fp32)]
    if bf16_model is not None:
        bm = bf16_model
        xb = xt.to(torch.bfloat16)

        def bf16_cast() -> npt.NDArray[np.int64]:
            # encoder + quant_conv in bf16; nearest-code search in fp32 (a bf16 argmin
            # over 1024 near-equal distances would scramble the codes)
            with torch.inference_mode():
                z = bm.encode_latent(xb).float()
                return model.quantize.indices(z).numpy()

        def bf16_autocast() -> npt.NDArray[np.int64]:
            with torch.inference_mode():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    z = bm.encode_latent(xt)
                return model.quantize.indices(z.float()).numpy()

        fn = bf16_cast if bf16_mode == "cast" else bf16_autocast
        cells.append((f"pytorch bf16 ({bf16_mode})", fn))
    if tok is not None:
        t = tok

        def onnx_run() -> npt.NDArray[np.int64]:
            return t.encode(x)

        cells.append((f"onnxruntime {ort.__version__} fp32", onnx_run))
    return cells


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="published")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median taken)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per cell first")
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    ap.add_argument(
        "--bf16-mode",
        choices=["cast", "autocast"],
        default="cast",
        help="cast: weights and input .to(bfloat16); autocast: torch.autocast(bfloat16); "
        "either way the nearest-code search runs in fp32",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=["bf16", "onnx"])
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cfg = CONFIGS[args.config]
    torch.manual_seed(0)
    model = VQModel(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())

    bf16_model = None
    if "bf16" not in args.skip:
        bf16_model = copy.deepcopy(model).to(torch.bfloat16) if args.bf16_mode == "cast" else model

    tok = None
    tmp = tempfile.TemporaryDirectory()
    if "onnx" not in args.skip:
        enc = export_encoder(model, Path(tmp.name) / "encoder.onnx")
        dec = export_decoder(model, Path(tmp.name) / "decoder.onnx")  # loaded, never timed
        tok = OnnxImageTokenizer(
            enc, dec, max_batch=max(args.batch_sizes), intra_op_threads=threads
        )

    rows: list[Row] = []
    for batch in args.batch_sizes:
        x = _inputs(batch, cfg.resolution)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            ref = model.encode_to_codes(xt).numpy()
        cells = _runners(model, bf16_model, args.bf16_mode, tok, x)
        for name, fn in cells:
            agreement = float((fn() == ref).mean())
            times = _time(fn, warmup=args.warmup, repeats=args.repeats)
            rows.append(
                Row(
                    name,
                    batch,
                    statistics.median(times) / batch * 1e3,
                    min(times) / batch * 1e3,
                    agreement,
                )
            )

    flags = _cpu_flags()
    bf16_hw = sorted(f for f in flags if f in {"avx512_bf16", "amx_bf16", "avx512f", "avx2"})
    print(
        f"VQ-GAN encode, config={args.config} ({n_params / 1e6:.1f} M params, "
        f"{cfg.codes_per_image} codes/image), input {'NIH CXRs' if NIH_DIR.is_dir() else 'random'}"
    )
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"threads={threads}, CPU flags {bf16_hw}, onnxruntime providers "
        f"{tok.providers if tok else '-'}; repeats={args.repeats} warmup={args.warmup}"
    )
    header = (
        f"{'runtime':<28} {'batch':>5} {'ms/image':>10} {'min ms/img':>10} "
        f"{'vs fp32':>8} {'codes=fp32':>10}"
    )
    print(header)
    print("-" * len(header))
    base = {r.batch: r.ms_per_image for r in rows if r.runtime == "pytorch eager fp32"}
    for r in rows:
        ratio = base[r.batch] / r.ms_per_image
        print(
            f"{r.runtime:<28} {r.batch:>5} {r.ms_per_image:>10.1f} {r.ms_min_per_image:>10.1f} "
            f"{ratio:>7.2f}x {r.agreement:>10.2%}"
        )
    print("vs fp32 = eager fp32 ms/image / this ms/image at the same batch (>1 is faster)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
