"""Generation speed of every engine, one table, one run: the issue-6 benchmark.

For the full dolly-v2-3b shape (hidden 2560, 32 layers, 32 heads, intermediate 10240, rotary
0.25, untied, LLM-CXR vocabulary 51305) with random weights, on this machine, in this order
(one model in memory at a time, freed between rows):

- llama.cpp F16 and Q8_0 (``--quants``; ``q8_0+f16`` decodes with Q8_0 after an F16
  prefill): GGUF files written from random tensors by
  ``benchmarks/bench_cpu_engine.py``'s ``write_random_gguf`` (about 9 GB of ``--out-dir``
  in turn; each is deleted after its row unless ``--keep``);
- transformers bf16 and fp32 (``--hf-dtypes``): ``benchmarks/bench_llm.py``'s
  ``build_model`` (fp32 needs about 11 GB of RAM; a row is skipped, with the reason in the
  table, when ``MemAvailable`` is short).

Every row is measured the same way through the ``GenerationBackend`` interface (what the
node runs): prefill tokens/s for a ``--prompt-tokens`` (300) CXR->report prompt (text + 256
image ids), decode tokens/s (greedy, ``--decode-tokens``), seconds per report
(``--report-tokens`` 150 new tokens: prefill + decode), decode as a fraction of the memory
bandwidth limit (read bandwidth measured in this run / weight bytes read per token), and
throughput at batch 1 and ``--batch`` (4): generated tokens per wall second. End-to-end
seconds per study add the ONNX VQ-GAN encode of one image (published size, random weights,
``--vqgan tiny`` for smoke runs) to the seconds per report. Ratios are against transformers
bf16 of the same run; the issue's targets are checked at the end.

With a CUDA GPU (and not ``--no-gpu``), a second table (``--gpu-only``: that one alone):
the ``--gpu-rows`` of transformers on the GPU (static KV cache; the backend's own decode loop
with a compiled step, transformers' ``generate`` with a compiled step, or PyTorch eager, see
``models/backends/transformers_backend.py``), llama.cpp rows offloaded when llama-cpp-python
was built with CUDA, the VQ-GAN (ONNX on the CUDA execution provider with
``onnxruntime-gpu``, else on the CPU; and the PyTorch encoder on CUDA), the GPU's read
bandwidth, and tokens/s at batch ``--gpu-batches`` (1, 8, 32). ``benchmarks/gpu_checks.sh``
runs it, after the ``gpu`` tests, on a lent GPU machine.

Not a test. Usage::

    python benchmarks/bench_generation.py --layers 2 --decode-tokens 8 --report-tokens 16 \\
        --quants q8_0 --hf-dtypes bf16 --vqgan tiny --repeats 1        # smoke run
    python benchmarks/bench_generation.py --json-out gen.json         # the full table
    python benchmarks/bench_generation.py --gpu-only --json-out gpu.json   # GPU table only
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import itertools
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.backends.base import GenerationBackend, GenerationRequest  # noqa: E402
from models.layout import IMAGE_TOKEN_OFFSET, VOCAB  # noqa: E402


def _load(name: str) -> ModuleType:
    """A sibling benchmark script as a module (its functions are reused, not copied)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bench_llm = _load("bench_llm")
bench_cpu_engine = _load("bench_cpu_engine")
bench_vqgan = _load("bench_vqgan")


# --- memory hygiene ---------------------------------------------------------------------------


def mem_available() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (a large number where unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def release_memory() -> None:
    """Collect garbage, return freed heap to the OS, empty the CUDA cache."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_param_bytes(layers: int, dtype: str) -> int:
    """Weight bytes of the transformers model (without building it)."""
    h, f, v = 2560, 10240, VOCAB
    per_layer = 3 * h * h + 3 * h + h * h + h + h * f + f + f * h + h + 4 * h
    params = 2 * v * h + layers * per_layer + 2 * h
    return params * (4 if dtype == "fp32" else 2)


# --- measurements -----------------------------------------------------------------------------


def gpu_read_bandwidth(gib: float = 2.0, repeats: int = 10) -> float:
    """Best of ``repeats`` sums over a ``gib`` GiB fp32 CUDA tensor: bytes read per second."""
    n = int(gib * (1 << 30) // 4)
    x = torch.ones(n, dtype=torch.float32, device="cuda")
    x.sum()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del x
    torch.cuda.empty_cache()
    return n * 4 / best


def vqgan_encode_s(config: str, out_dir: Path, providers: Sequence[str], threads: int) -> float:
    """Median seconds to encode one image (batch 1) with the exported ONNX VQ-GAN encoder."""
    import onnxruntime as ort

    from models.onnx_export import export_encoder
    from models.vqgan import VQModel

    path = out_dir / f"vqgan-{config}-encoder.onnx"
    if not path.is_file():
        torch.manual_seed(0)
        model = VQModel(bench_vqgan.CONFIGS[config]).eval()
        export_encoder(model, path)
        del model
        release_memory()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    x = bench_vqgan._inputs(1, 256)
    name = sess.get_inputs()[0].name
    times = bench_vqgan._time(lambda: sess.run(None, {name: x}), warmup=2, repeats=5)
    return float(np.median(times))


_STUDIES = itertools.count(1)


def shifted_study(ids: list[int], shift: int) -> list[int]:
    """``ids`` with every image id moved by ``shift`` codes: another study, same template."""
    return [
        IMAGE_TOKEN_OFFSET + (t - IMAGE_TOKEN_OFFSET + shift) % 1024
        if IMAGE_TOKEN_OFFSET <= t < VOCAB
        else t
        for t in ids
    ]


def _requests(ids: list[int], n: int, new: int) -> list[GenerationRequest]:
    """``n`` prompts for ``n`` new studies: the same template, different image ids in every
    prompt of every call (as in the node, where only the template can come from a cache)."""
    return [
        GenerationRequest(prompt_ids=shifted_study(ids, 131 * next(_STUDIES)), max_new_tokens=new)
        for _ in range(n)
    ]


def _reused(backend: GenerationBackend) -> int:
    return int(backend.health().get("prompt_tokens_reused", 0))


def _run(backend: GenerationBackend, reqs: list[GenerationRequest]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = backend.generate(reqs)
    wall = time.perf_counter() - t0
    errors = [r.error for r in out if r.error]
    if errors:
        raise RuntimeError(errors[0])
    return out, wall


def measure(
    backend: GenerationBackend,
    ids: list[int],
    *,
    decode_tokens: int,
    report_tokens: int,
    batches: Sequence[int],
    repeats: int,
) -> dict[str, Any]:
    """Time one loaded backend: prefill, decode, one report, and throughput per batch size.

    Decode tokens/s is ``(new - 1) / decode_s`` (the first new token comes from prefill).
    When random weights stop a report early (``### End`` or EOS), its seconds are scaled to
    ``report_tokens`` at the measured decode rate and the row says so.
    """
    # page weights in, allocate caches; a static cache (GPU) is warmed at the prompt's size,
    # so that the compiled decode graph is the one the measurements use
    static = getattr(backend, "cache", None) == "static"
    _run(backend, _requests(ids if static else ids[:32], 1, 4))
    clear = getattr(backend, "clear_cache", None)
    prefill, decode = 0.0, 0.0
    for _ in range(repeats):
        if clear is not None:
            clear()  # prefill tok/s: the whole prompt computed
        res = _run(backend, _requests(ids, 1, decode_tokens))[0][0]
        prefill = max(prefill, len(ids) / res.prefill_s)
        if res.new_tokens > 1:
            decode = max(decode, (res.new_tokens - 1) / res.decode_s)
    # one report as the node makes it: a new study after another (a cached template is used)
    before = _reused(backend)
    rep = _run(backend, _requests(ids, 1, report_tokens))[0][0]
    reused = _reused(backend) - before
    early = rep.new_tokens < report_tokens
    dec_s = rep.decode_s
    if early and rep.new_tokens > 1:
        dec_s = rep.decode_s * (report_tokens - 1) / (rep.new_tokens - 1)
    row: dict[str, Any] = {
        "prompt_tokens": len(ids),
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "report_tokens": rep.new_tokens,
        "s_per_report": rep.prefill_s + dec_s,
        "report_extrapolated": early,
        "report_prompt_tokens_reused": reused,
        "throughput": {},
    }
    for b in batches:
        if b == 1:
            row["throughput"]["1"] = {
                "tok_s": report_tokens / row["s_per_report"],
                "decode_tok_s": decode,
                "s_per_report": row["s_per_report"],
            }
            continue
        _run(backend, _requests(ids, b, 4))  # this batch shape once (CUDA graphs, caches)
        out, wall = _run(backend, _requests(ids, b, report_tokens))
        new = sum(r.new_tokens for r in out)
        row["throughput"][str(b)] = {
            "tok_s": new / wall,
            "decode_tok_s": (new - b) / max(out[0].decode_s, 1e-9),
            "s_per_report": wall / b,
        }
    return row


# --- rows -------------------------------------------------------------------------------------


def engine_row(
    quant: str,
    ids: list[int],
    args: argparse.Namespace,
    *,
    vocab: Any,
    out_dir: Path,
    threads: int,
    device: str,
    batches: Sequence[int],
) -> dict[str, Any]:
    """One llama.cpp row: write the random GGUF (or re-use it), load, measure, free.

    ``quant`` ``"q8_0+f16"`` decodes with the Q8_0 file and prefills with the F16 one
    (the backend's ``prefill_quant``); both files are written, listed in a manifest as a
    bundle lists them, and loaded together.
    """
    from models.backends.llamacpp import LlamaCppBackend

    shape = bench_cpu_engine.dolly_shape(args.layers)
    decode_q, _, prefill_q = quant.partition("+")
    files = {q: out_dir / f"dolly-{args.layers}l-{q}.gguf" for q in (decode_q, prefill_q) if q}
    bf16 = hf_param_bytes(args.layers, "bf16")
    need = sum(
        int(bf16 * (0.55 if q == "q8_0" else 1.05)) for q, p in files.items() if not p.is_file()
    )
    if need and shutil.disk_usage(out_dir).free < need:
        return {"skipped": f"{need / 1e9:.1f} GB of disk needed in {out_dir}"}
    write_s, per_token = 0.0, 0
    for q, p in files.items():
        secs, nbytes = bench_cpu_engine.write_random_gguf(p, shape, q, vocab, threads=threads)
        write_s += secs
        per_token = per_token or nbytes  # the decode file's: what each new token reads
    model: Path = files[decode_q]
    if prefill_q:
        model = out_dir / f"bundle-{decode_q}+{prefill_q}"
        model.mkdir(exist_ok=True)
        engines = {q: {"path": str(p.resolve())} for q, p in files.items()}
        (model / "manifest.json").write_text(json.dumps({"engines": {"llamacpp": engines}}))
    n_ctx = len(ids) + max(args.report_tokens, args.decode_tokens) + 16
    backend = LlamaCppBackend(
        model,
        quant=decode_q if prefill_q else None,
        prefill_quant=prefill_q or None,
        threads=threads,
        n_ctx=n_ctx,
        max_batch=max(batches),
        device=device,
    )
    try:
        t0 = time.perf_counter()
        backend.load()
        load_s = time.perf_counter() - t0
        row = measure(
            backend,
            ids,
            decode_tokens=args.decode_tokens,
            report_tokens=args.report_tokens,
            batches=batches,
            repeats=args.repeats,
        )
    finally:
        backend.close()
        del backend
        if not args.keep:
            for p in files.values():
                p.unlink(missing_ok=True)
        release_memory()
    row.update(load_s=load_s, write_s=write_s, weight_bytes_per_token=per_token, threads=threads)
    return row


def hf_row(
    dtype: str,
    ids: list[int],
    args: argparse.Namespace,
    *,
    tok: Any,
    device: str,
    batches: Sequence[int],
    compile: bool = True,
    decode_loop: str = "auto",
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """One transformers row (model built in ``dtype`` on ``device``), then freed.

    On CUDA the KV cache is static, ``compile`` compiles the decode step (CUDA graphs),
    ``compile_mode`` is ``torch.compile``'s mode (default: the backend's,
    ``reduce-overhead``) and ``decode_loop`` picks the backend's own loop (``graph``) or
    transformers' ``generate``.
    """
    from models.backends.transformers_backend import TransformersBackend

    need = hf_param_bytes(args.layers, dtype)
    if device == "cpu" and mem_available() < need * 1.15 + (1 << 30):
        return {
            "skipped": f"needs ~{need * 1.15 / 1e9:.1f} GB RAM, "
            f"{mem_available() / 1e9:.1f} GB available"
        }
    t0 = time.perf_counter()
    model = bench_llm.build_model(args.layers, bench_llm.DTYPES[dtype], device=device)
    build_s = time.perf_counter() - t0
    per_token = bench_llm.weight_bytes_per_token(model)
    opts: dict[str, Any] = {}
    if device.startswith("cuda"):
        opts = {"cache": "static", "compile": compile, "decode_loop": decode_loop}
        if compile_mode is not None:
            opts["compile_mode"] = compile_mode
    backend = TransformersBackend.from_model(
        model, tok, device=device, max_batch=max(batches), **opts
    )
    del model
    try:
        row = measure(
            backend,
            ids,
            decode_tokens=args.decode_tokens,
            report_tokens=args.report_tokens,
            batches=batches,
            repeats=args.repeats,
        )
        row["cache"], row["compile"] = backend.cache, backend.compile
        row["decode_loop"] = backend.decode_loop
    finally:
        del backend
        release_memory()
    row.update(build_s=build_s, weight_bytes_per_token=per_token, threads=torch.get_num_threads())
    return row


# --- the table --------------------------------------------------------------------------------


def finish_rows(
    rows: list[dict[str, Any]],
    bw: float,
    encode_s: float,
    batch: int,
    reference: str = "transformers bf16",
) -> None:
    """Add limit, fraction, end-to-end seconds and the ratios against the ``reference`` row
    (``*_x_ref`` keys)."""
    done = [r for r in rows if "skipped" not in r]
    for r in done:
        bench_llm.bandwidth_limit(r, bw)
        r["encode_s"] = encode_s
        r["e2e_s_per_study"] = encode_s + r["s_per_report"]
    ref = next((r for r in done if r["engine"] == reference), None)
    if ref is None:
        return
    bkey = str(batch)
    for r in done:
        r["reference"] = reference
        r["decode_x_ref"] = r["decode_tok_s"] / ref["decode_tok_s"]
        r["e2e_x_ref"] = ref["e2e_s_per_study"] / r["e2e_s_per_study"]
        if bkey in r["throughput"] and bkey in ref["throughput"]:
            ours, theirs = r["throughput"][bkey]["tok_s"], ref["throughput"][bkey]["tok_s"]
            r[f"b{batch}_x_ref"] = ours / theirs


def print_table(title: str, rows: list[dict[str, Any]], batches: Sequence[int]) -> None:
    """One fixed-width table (``-`` where a value does not apply)."""

    def f(v: Any, spec: str, width: int) -> str:
        return f"{v:>{width}{spec}}" if isinstance(v, int | float) else f"{'-':>{width}}"

    print(title)
    cols = (
        f"{'engine':<27}{'GB/tok':>7}{'prefill t/s':>12}{'decode t/s':>11}{'limit t/s':>10}"
        f"{'frac':>6}{'s/report':>9}{'s/study':>8}"
        + "".join(f"{f'b{b} t/s':>9}" for b in batches)
        + f"{'dec x ref':>11}{'e2e x ref':>11}"
    )
    print(cols)
    print("-" * len(cols))
    for r in rows:
        if "skipped" in r:
            print(f"{r['engine']:<27}skipped: {r['skipped']}")
            continue
        tp = r["throughput"]
        star = "*" if r.get("report_extrapolated") else " "
        print(
            f"{r['engine']:<27}{r['weight_bytes_per_token'] / 1e9:>7.2f}"
            f"{f(r['prefill_tok_s'], '.1f', 12)}{f(r['decode_tok_s'], '.2f', 11)}"
            f"{f(r['bandwidth_limit_tok_s'], '.2f', 10)}{f(r['fraction_of_limit'], '.2f', 6)}"
            f"{f(r['s_per_report'], '.1f', 8)}{star}{f(r['e2e_s_per_study'], '.1f', 8)}"
            + "".join(f(tp.get(str(b), {}).get("tok_s"), ".1f", 9) for b in batches)
            + f"{f(r.get('decode_x_ref'), '.2f', 11)}{f(r.get('e2e_x_ref'), '.2f', 11)}"
        )
    if any(r.get("report_extrapolated") for r in rows):
        print("* the report stopped early (random weights): seconds scaled at the decode rate")
    for r in rows:
        if r.get("report_prompt_tokens_reused"):
            print(
                f"{r['engine']}: s/report is a new study after another; "
                f"{r['report_prompt_tokens_reused']} of its {r['prompt_tokens']} prompt ids "
                "(the template) came from the prefix cache; prefill t/s computes all of them"
            )


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's CPU targets, evaluated on this run's rows."""
    out: list[dict[str, Any]] = []
    by = {r["engine"]: r for r in rows if "skipped" not in r}
    for name, r in by.items():
        if not name.startswith("llama.cpp"):
            continue
        out.append(
            {
                "target": f"{name} decode >= 0.75 of its bandwidth limit",
                "value": r["fraction_of_limit"],
                "met": r["fraction_of_limit"] >= 0.75,
            }
        )
        if r.get("reference") == "transformers bf16":
            out.append(
                {
                    "target": f"{name} decode >= 3x transformers bf16",
                    "value": r["decode_x_ref"],
                    "met": r["decode_x_ref"] >= 3.0,
                }
            )
    for name, r in by.items():  # Q8_0 decoding, prefilled by itself or by another file
        if name.split("+")[0] == "llama.cpp q8_0" and r.get("reference") == "transformers bf16":
            out.append(
                {
                    "target": f"end-to-end s/study {name.removeprefix('llama.cpp ')} >= 3x "
                    "lower than transformers bf16",
                    "value": r["e2e_x_ref"],
                    "met": r["e2e_x_ref"] >= 3.0,
                }
            )
    return out


def _run_rows(
    specs: list[tuple[str, Callable[[], dict[str, Any]]]],
    rows: list[dict[str, Any]] | None = None,
    after_row: Callable[[], None] | None = None,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """Run each row in turn into ``rows``; a failing row is kept as skipped, with the reason,
    and ``after_row`` runs after every row (the partial JSON survives a killed run). Rows
    not started by ``deadline`` (``time.perf_counter()``) are skipped."""
    rows = [] if rows is None else rows
    for name, fn in specs:
        print(f"... {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if deadline is not None and t0 > deadline:
            rows.append({"engine": name, "skipped": "--deadline-s passed before this row"})
            continue
        try:
            row = fn()
        except Exception as exc:  # any failure (compile, CUDA, OOM): keep the other rows
            traceback.print_exc()
            row = {"skipped": f"{type(exc).__name__}: {str(exc)[:300]}"}
        row["row_wall_s"] = time.perf_counter() - t0
        rows.append({"engine": name, **row})
        if after_row is not None:
            after_row()
    return rows


GPU_MODES: dict[str, tuple[bool, str, str | None]] = {
    "": (True, "graph", None),  # what the node runs: own loop, compiled step, CUDA graphs
    "generate": (True, "generate", None),  # transformers' generate, compiled step, CUDA graphs
    "eager": (False, "generate", None),  # transformers' generate, no compile: PyTorch eager
    # the own loop with inductor's autotuned kernels (Triton GEMV/GEMM templates, fused
    # epilogues), still CUDA graphs; compiling takes minutes per batch size
    "autotune": (True, "graph", "max-autotune"),
}


def gpu_row_specs(text: str) -> list[tuple[str, str, bool, str, str | None]]:
    """``--gpu-rows`` (``bf16,bf16:generate,bf16:eager,fp32:eager``) as (row name, dtype,
    compile, decode loop, compile mode or ``None`` for the backend's default)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item or item == "none":
            continue
        dtype, _, mode = item.partition(":")
        if dtype not in bench_llm.DTYPES or mode not in GPU_MODES:
            raise ValueError(
                f"--gpu-rows: {item!r} is not DTYPE[:generate|:eager|:autotune] with DTYPE "
                "bf16 or fp32"
            )
        name = f"transformers {dtype}" + (f" {mode}" if mode else "")
        out.append((name, dtype, *GPU_MODES[mode]))
    return out


def check_gpu_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's GPU target, bf16 decode at batch 1 >= 0.50 of the bandwidth limit, for
    the node's own loop in its default compile mode and with ``max-autotune``."""
    out = []
    for r in rows:
        if r["engine"] in ("transformers bf16", "transformers bf16 autotune") and (
            "skipped" not in r
        ):
            frac = r["fraction_of_limit"]
            target = f"GPU {r['engine'].removeprefix('transformers ')} decode >= 0.50 of its limit"
            out.append({"target": target, "value": frac, "met": frac >= 0.5})
    return out


def torch_encode_s(config: str, dtype: torch.dtype, device: str = "cuda") -> float:
    """Median seconds to encode one image to codes with the PyTorch VQ-GAN on ``device`` (on
    CUDA, the ONNX CUDA provider's stand-in where ``onnxruntime-gpu`` is not installed)."""
    from models.vqgan import VQModel

    torch.manual_seed(0)
    model = VQModel(bench_vqgan.CONFIGS[config]).eval().to(device, dtype)
    x = torch.from_numpy(bench_vqgan._inputs(1, 256)).to(device, dtype)

    def run() -> object:
        with torch.inference_mode():
            codes = model.encode_to_codes(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return codes

    return float(np.median(bench_vqgan._time(run, warmup=3, repeats=10)))


def main(argv: list[str] | None = None) -> None:
    """Run every row, print the table(s) and the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="transformer layers (32 = dolly-v2-3b)")
    ap.add_argument(
        "--quants",
        default="f16,q8_0",
        help="llama.cpp rows: f32,f16,bf16,q8_0,q4_k_m, or DECODE+PREFILL (q8_0+f16: decode "
        "with the q8_0 file, prefill with the f16 one)",
    )
    ap.add_argument("--hf-dtypes", default="bf16,fp32", help="transformers rows, or 'none'")
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--decode-tokens", type=int, default=32, help="new tokens for decode tok/s")
    ap.add_argument("--report-tokens", type=int, default=150, help="new tokens of one report")
    ap.add_argument("--batch", type=int, default=4, help="CPU batch for throughput (and 1)")
    ap.add_argument("--gpu-batches", default="1,8,32", help="GPU throughput batch sizes")
    ap.add_argument("--repeats", type=int, default=2, help="prefill/decode runs (best kept)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--vqgan", choices=sorted(bench_vqgan.CONFIGS), default="published")
    ap.add_argument("--out-dir", type=Path, default=None, help="GGUF/ONNX files (default: tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files in --out-dir")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0)
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU table")
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU table")
    ap.add_argument(
        "--gpu-rows",
        default="bf16,bf16:generate,bf16:eager,fp32:eager",
        help="GPU transformers rows: DTYPE (own loop, compiled step), DTYPE:generate "
        "(transformers generate, compiled step), DTYPE:eager (generate, no compile: the "
        "reference of the ratios when bf16) or DTYPE:autotune (own loop, compiled with "
        "mode max-autotune)",
    )
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument(
        "--deadline-s", type=float, default=0, help="start no row after this many seconds"
    )
    args = ap.parse_args(argv)
    if min(args.decode_tokens, args.report_tokens) < 2 or args.repeats < 1 or args.batch < 1:
        ap.error("--decode-tokens and --report-tokens must be >= 2, --repeats and --batch >= 1")
    try:
        gpu_row_specs(args.gpu_rows)
    except ValueError as exc:
        ap.error(str(exc))
    threads = int(args.threads or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from models.gguf_convert import build_gguf_vocab
    from models.text import LLMCXRTokenizer

    own_dir = args.out_dir is None
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-generation-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = bench_cpu_engine.tokenizer_dir(out_dir / "tokenizer")
    tok = LLMCXRTokenizer.from_dir(tok_dir)
    ids = bench_cpu_engine.prompt_ids(tok, args.prompt_tokens)
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    dtypes = [d.strip() for d in args.hf_dtypes.split(",") if d.strip() and d.strip() != "none"]

    result: dict[str, Any] = {
        "machine": {
            "cpu": bench_vqgan._cpu_name(),
            "logical_cpus": os.cpu_count(),
            "threads": threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    try:
        import llama_cpp

        result["machine"]["llama_cpp_python"] = llama_cpp.__version__
        gpu_llama = bool(llama_cpp.llama_supports_gpu_offload())
    except ImportError:
        quants, gpu_llama = [], False
        print("llama-cpp-python is not installed: no llama.cpp rows", file=sys.stderr)
    # the GGUF vocabulary needs the gguf package, which only the llama.cpp rows need
    vocab = build_gguf_vocab(tok_dir / "tokenizer.json") if quants else None

    started = time.perf_counter()
    deadline = started + args.deadline_s if args.deadline_s else None

    def save() -> None:
        if args.json_out:
            text = json.dumps(result, indent=2, default=float)
            args.json_out.write_text(text + "\n", encoding="utf-8")

    if not args.gpu_only:
        cpu_table(args, ids, tok, vocab, out_dir, threads, quants, dtypes, result, save, deadline)
    if torch.cuda.is_available() and not args.no_gpu:  # pragma: no cover - needs a GPU
        # the own decode loop's debug line (steps, decode seconds, seconds the host waited)
        loop_log = logging.getLogger("models.backends.transformers_backend")
        loop_log.setLevel(logging.DEBUG)
        loop_log.addHandler(logging.StreamHandler(sys.stderr))
        gpu_table(
            args, ids, tok, vocab, out_dir, threads, quants, gpu_llama, result, save, deadline
        )
    elif args.gpu_only:
        print("--gpu-only, but torch sees no CUDA GPU: nothing measured", file=sys.stderr)

    if own_dir and not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - started
    save()
    print(json.dumps(result, indent=2, default=float))


def engine_specs(
    quants: list[str],
    ids: list[int],
    args: argparse.Namespace,
    vocab: Any,
    out_dir: Path,
    threads: int,
    device: str,
    batches: Sequence[int],
) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """One llama.cpp row per quantisation, on ``device``."""
    return [
        (
            f"llama.cpp {q}",
            partial(
                engine_row,
                q,
                ids,
                args,
                vocab=vocab,
                out_dir=out_dir,
                threads=threads,
                device=device,
                batches=batches,
            ),
        )
        for q in quants
    ]


def cpu_table(
    args: argparse.Namespace,
    ids: list[int],
    tok: Any,
    vocab: Any,
    out_dir: Path,
    threads: int,
    quants: list[str],
    dtypes: list[str],
    result: dict[str, Any],
    save: Callable[[], None],
    deadline: float | None,
) -> None:
    """The CPU rows: llama.cpp per quantisation, then transformers per dtype."""
    cpu_batches = sorted({1, args.batch})
    # probes before and after the rows; the limit uses the best (a shared host's bandwidth
    # drifts over minutes: the spread is printed and kept)
    probes = bench_llm.read_bandwidth_samples(args.bandwidth_gib)
    encode_s = vqgan_encode_s(args.vqgan, out_dir, ["CPUExecutionProvider"], threads)
    specs = engine_specs(quants, ids, args, vocab, out_dir, threads, "cpu", cpu_batches)
    for d in dtypes:  # bf16 before fp32: the largest model last, alone in memory
        specs.append(
            (
                f"transformers {d}",
                partial(hf_row, d, ids, args, tok=tok, device="cpu", batches=cpu_batches),
            )
        )
    cpu: dict[str, Any] = {"vqgan": args.vqgan, "encode_s": encode_s, "rows": []}
    result["cpu"] = cpu
    rows = _run_rows(specs, cpu["rows"], save, deadline)
    probes += bench_llm.read_bandwidth_samples(args.bandwidth_gib)
    bw = max(probes)
    finish_rows(rows, bw, encode_s, args.batch)
    cpu["read_bandwidth_bytes_s"] = bw
    cpu["read_bandwidth_samples_bytes_s"] = probes
    cpu["targets"] = check_targets(rows)
    save()
    print(
        f"\nmachine: {result['machine']['cpu']}, {os.cpu_count()} logical CPUs, threads {threads}, "
        f"RAM {result['machine']['mem_total_bytes'] / 2**30:.0f} GiB; torch {torch.__version__}"
        f"; llama-cpp-python {result['machine'].get('llama_cpp_python', '-')}"
    )
    print(
        f"model: dolly-v2-3b shape, {args.layers} layers, vocab {VOCAB}, random weights; prompt "
        f"{len(ids)} tokens, report {args.report_tokens} new tokens; read bandwidth "
        f"{bw / 1e9:.1f} GB/s (same run, best of {len(probes)} probes; median "
        f"{statistics.median(probes) / 1e9:.1f}, min {min(probes) / 1e9:.1f}); VQ-GAN encode "
        f"({args.vqgan}, ONNX CPU) "
        f"{encode_s * 1e3:.0f} ms/image"
    )
    print_table("CPU (ratios against transformers bf16)", rows, cpu_batches)
    for t in cpu["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['value']:.2f}")


def gpu_table(  # pragma: no cover - needs a GPU
    args: argparse.Namespace,
    ids: list[int],
    tok: Any,
    vocab: Any,
    out_dir: Path,
    threads: int,
    quants: list[str],
    gpu_llama: bool,
    result: dict[str, Any],
    save: Callable[[], None],
    deadline: float | None,
) -> None:
    """The GPU rows (``--gpu-rows``; llama.cpp offloaded where it was built with CUDA), then
    the VQ-GAN encode on the GPU machine; ratios against the bf16 eager row when present."""
    from models.image_tokenizer import default_providers

    gpu_batches = sorted({int(b) for b in args.gpu_batches.split(",") if b.strip()})
    gbw = gpu_read_bandwidth()
    gpu: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "read_bandwidth_bytes_s": gbw,
        "rows": [],
    }
    result["gpu"] = gpu
    save()
    gspecs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        (
            name,
            partial(
                hf_row,
                d,
                ids,
                args,
                tok=tok,
                device="cuda",
                batches=gpu_batches,
                compile=c,
                decode_loop=loop,
                compile_mode=mode,
            ),
        )
        for name, d, c, loop, mode in gpu_row_specs(args.gpu_rows)
    ]
    if gpu_llama:
        gspecs += engine_specs(quants, ids, args, vocab, out_dir, threads, "cuda", gpu_batches)
    grows = _run_rows(gspecs, gpu["rows"], save, deadline)
    # the VQ-GAN after the LLM rows: those are what a short GPU lease is for
    prov = [p for p in default_providers() if p == "CUDAExecutionProvider"]
    gpu["vqgan_providers"] = prov or ["CPUExecutionProvider"]
    g_encode = vqgan_encode_s(args.vqgan, out_dir, gpu["vqgan_providers"], threads)
    gpu["encode_s"] = g_encode
    with contextlib.suppress(Exception):
        gpu["torch_cuda_fp32_encode_s"] = torch_encode_s(args.vqgan, torch.float32)
    release_memory()
    names = {r["engine"] for r in grows if "skipped" not in r}
    ref = "transformers bf16 eager" if "transformers bf16 eager" in names else "transformers bf16"
    finish_rows(grows, gbw, g_encode, gpu_batches[-1], reference=ref)
    gpu["targets"] = check_gpu_targets(grows)
    save()
    torch_enc = gpu.get("torch_cuda_fp32_encode_s")
    print(
        f"\nGPU: {gpu['device']}, read bandwidth {gbw / 1e9:.0f} GB/s; VQ-GAN encode "
        f"({args.vqgan}) ONNX on {gpu['vqgan_providers'][0]} {g_encode * 1e3:.1f} ms/image"
        + (f", PyTorch fp32 on CUDA {torch_enc * 1e3:.1f} ms/image" if torch_enc else "")
    )
    print_table(f"GPU (ratios against {ref})", grows, gpu_batches)
    for t in gpu["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['value']:.2f}")


if __name__ == "__main__":
    main()
