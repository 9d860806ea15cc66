"""VQ-GAN encoding at the published size: the ONNX graph on the host CPU (onnxruntime, what
a study's encoding costs when the tokenizer stays off the GPU) against the PyTorch VQ-GAN on
``--device`` (what :meth:`models.runtime.LLMCXR.from_bundle` uses when the LLM runs on
CUDA), same weights, same inputs, same run (#29 part 4).

Not a test. A randomly initialised VQ-GAN of the published configuration
(:class:`models.vqgan.VQGANConfig` defaults: 1,024 codes, 256 per image) is exported to ONNX
in a temp folder; ``--images`` synthetic chest-like inputs are encoded by both, at batch 1
and at ``--batch``. Printed: milliseconds per image for each, their ratio, and the code
agreement (the fraction of the 256 positions where the two chose the same code; a latent
equidistant from two entries may round either way).

Usage::

    python benchmarks/bench_image_tokenizer.py                  # both on this CPU
    python benchmarks/bench_image_tokenizer.py --device cuda    # PyTorch on the GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.image_tokenizer import OnnxImageTokenizer  # noqa: E402
from models.onnx_export import export_decoder, export_encoder  # noqa: E402
from models.torch_image_tokenizer import TorchImageTokenizer  # noqa: E402
from models.vqgan import VQGANConfig, VQModel  # noqa: E402


def inputs(n: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """``n`` smooth synthetic inputs ``[n, 3, 256, 256]`` in [-1, 1] (a bright field with
    two darker lobes and noise, so that the codes vary)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    out = np.empty((n, 3, 256, 256), np.float32)
    for i in range(n):
        lobes = np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + np.exp(
            -(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)
        )
        img = 0.8 - 0.9 * lobes * rng.uniform(0.6, 1.0) + rng.normal(0, 0.05, (256, 256))
        out[i] = np.clip(img, -1.0, 1.0)[None]
    return out


def per_image_ms(fn: Callable[[], object], images: int, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, per image, in ms (one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / images * 1000.0


def main() -> None:
    """Run and print one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="PyTorch device (cpu, cuda, cuda:N)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = VQModel(VQGANConfig()).eval().requires_grad_(False)
    x = inputs(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        enc = export_encoder(model, Path(tmp) / "encoder.onnx")
        dec = export_decoder(model, Path(tmp) / "decoder.onnx")
        onnx_tok = OnnxImageTokenizer(
            enc,
            dec,
            providers=["CPUExecutionProvider"],
            max_batch=args.batch,
            intra_op_threads=args.threads,
        )
        torch_tok = TorchImageTokenizer(model, device=args.device, max_batch=args.batch)
        agreement = float((onnx_tok.encode(x) == torch_tok.encode(x)).mean())
        cuda = args.device.startswith("cuda")
        rows = []
        for batch in (1, args.batch):
            xb = x[:batch]

            def run_onnx(xb: npt.NDArray[np.float32] = xb) -> None:
                onnx_tok.encode(xb)

            def run_torch(xb: npt.NDArray[np.float32] = xb) -> None:
                torch_tok.encode(xb)
                if cuda:
                    torch.cuda.synchronize()

            ms_onnx = per_image_ms(run_onnx, batch, args.repeats)
            ms_torch = per_image_ms(run_torch, batch, args.repeats)
            rows.append((batch, ms_onnx, ms_torch))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "this CPU"
    print(
        f"\nVQ-GAN encoder, published size (random weights), {args.images} synthetic inputs; "
        f"ONNX on the host CPU vs PyTorch on {args.device} ({name})\n"
    )
    print(f"{'batch':>6}{'ONNX CPU ms/img':>18}{'PyTorch ms/img':>18}{'PyTorch/ONNX':>14}")
    for batch, a, b in rows:
        print(f"{batch:>6}{a:>18.1f}{b:>18.2f}{b / a:>14.3f}")
    print(f"code agreement PyTorch vs ONNX: {agreement * 100:.2f} % of positions")


if __name__ == "__main__":
    main()
