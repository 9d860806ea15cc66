"""Training throughput of ``cxr-node train`` (tokens/s, model FLOPs utilisation), against a
plain PyTorch training loop on the same model and token count in the same run (#28).

Not a test. A DEMO bundle of the chosen shape (random weights) and a synthetic dataset of
``--images`` block images with short reports are built in a temp folder; ``run_training``
(the node's Trainer path: examples, collator, AdamW, the paper's stage-1 tasks) runs
``--steps`` steps and its metrics CSV gives the tokens/s of each logged step. The reference
is a bare loop (``model(ids, labels=ids)``, ``backward``, ``AdamW.step``) on random ids,
300 tokens a row (an image prompt and a short report); it computes the logits of every
position, where the node's collator skips the prompt's (``logits_to_keep``). Printed: the
node's and the reference's tokens/s, their ratio, model FLOPs/s (6 x parameters x
tokens/s, plus the attention matmuls), and the MFU when the peak is known
(``--peak-tflops``, or an H100/H200 found by name: 989 TFLOP/s dense bf16).

Usage::

    python benchmarks/bench_training.py                       # CPU, hidden 256, 4 layers
    python benchmarks/bench_training.py --dolly --steps 30    # dolly-v2-3b shape (GPU)
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.dataset import ManifestRecord, write_manifest  # noqa: E402
from models.layout import TEXT_VOCAB  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
REPORTS = ("Normal chest.", "Left pleural effusion.", "Right lower lobe pneumonia.")


def dataset(folder: Path, n: int) -> Path:
    """``n`` block images with short reports, as a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = np.kron(rng.integers(0, 256, (16, 16)), np.ones((16, 16))).astype(np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(img, mode="L").save(path)
        records.append(
            ManifestRecord(
                id=f"r{i}",
                image=path,
                split="train",
                view="PA",
                study_order=0,
                findings="Lungs are clear." if i % 2 else None,
                impression=REPORTS[i % len(REPORTS)],
            )
        )
    return write_manifest(folder / "manifest.jsonl", records).path


def node_rate(metrics_csv: Path) -> float:
    """Median tokens/s of the logged steps, the first two (warm-up) left out."""
    with metrics_csv.open(encoding="utf-8") as fh:
        rates = [float(r["tokens_per_s"]) for r in csv.DictReader(fh)]
    rates = rates[2:] if len(rates) > 3 else rates
    return statistics.median(rates)


def plain_rate(model: torch.nn.Module, batch: int, length: int, steps: int, device: str) -> float:
    """Tokens/s of a bare forward + backward + AdamW step on random ids."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    ids = torch.randint(2, TEXT_VOCAB, (batch, length), device=device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = times[2:] if len(times) > 3 else times
    return batch * length / statistics.median(times)


def flops_per_token(n_params: int, layers: int, hidden: int, length: int) -> float:
    """Training FLOPs per token: 6 N for the weights plus 12 L H T for attention."""
    return 6.0 * n_params + 12.0 * layers * hidden * length


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dolly", action="store_true", help="dolly-v2-3b: 2560 x 32 x 32")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    if args.dolly:
        args.hidden, args.layers, args.heads = 2560, 32, 32

    from transformers import GPTNeoXForCausalLM

    from models.demo import create_demo_bundle
    from models.training.recipe import load_config
    from models.training.trainer import run_training

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        bundle = create_demo_bundle(
            tmp / "base", hidden=args.hidden, layers=args.layers, heads=args.heads
        )
        print(f"bundle built in {time.perf_counter() - t0:.1f} s", flush=True)
        manifest = dataset(tmp / "data", args.images)
        cfg = load_config(
            stage=1,
            max_steps=args.steps,
            lr=1e-5,
            warmup_steps=0,
            per_device_batch=args.batch,
            logging_steps=1,
            save_steps=10**6,
            report_to=("csv",),
            gradient_checkpointing=args.dolly,
        )
        result = run_training(
            manifest, bundle.root, tmp / "out", cfg, work=tmp / "work", progress=False
        )
        node = node_rate(result.metrics_csv)
        model: Any = GPTNeoXForCausalLM.from_pretrained(str(bundle.llm_dir))
        model = model.to(device)
        if device == "cuda":
            model = model.to(torch.bfloat16)
        n_params = sum(p.numel() for p in model.parameters())
        length = 300  # an image prompt (~290 tokens) plus a short report
        ref = plain_rate(model, args.batch, length, max(4, args.steps // 2), device)
    fpt = flops_per_token(n_params, args.layers, args.hidden, length)
    print(
        f"shape: hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.1f} M params, "
        f"{device}, batch {args.batch}"
    )
    print("| path | tokens/s | ratio to plain loop | model TFLOP/s |")
    print("|---|---|---|---|")
    for name, rate in (("cxr-node train", node), ("plain PyTorch loop", ref)):
        print(f"| {name} | {rate:,.0f} | {rate / ref:.2f}x | {rate * fpt / 1e12:.3f} |")
    peak = args.peak_tflops
    if peak is None and device == "cuda":
        gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    if peak:
        print(
            f"MFU (peak {peak} TFLOP/s): node {node * fpt / 1e12 / peak:.1%}, "
            f"plain {ref * fpt / 1e12 / peak:.1%}"
        )
    else:
        print("MFU: no peak known for this device (give --peak-tflops)")


if __name__ == "__main__":
    main()
