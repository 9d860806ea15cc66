"""CPU engine (llama.cpp) against transformers at the dolly-v2-3b shape, one table.

Writes GGUF files for the full dolly-v2-3b shape (hidden 2560, 32 layers, 32 heads,
intermediate 10240, 2048 positions, rotary 0.25, untied, vocabulary 51305) directly from
random tensors generated chunk by chunk in the target encoding (F16 values, or Q8_0 blocks
of random int8 and fp16 scales): no fp32 torch model is built. Then, for each quantisation,
with :class:`models.backends.llamacpp.LlamaCppBackend`:

- prefill tokens/s for a ``--prompt-tokens`` (300) prompt (text + 256 image ids);
- decode tokens/s at batch 1 and the aggregate at ``--batch`` (4) parallel sequences;
- seconds per report (``--report-tokens`` 150 new tokens) at batch 1 and per report at batch 4;
- decode as a fraction of the memory-bandwidth limit: read bandwidth (measured in this run,
  best of large tensor sums) / weight bytes read per token (every tensor but the embedding
  table, of which one row is read).

The transformers fp32/bf16 rows come from ``benchmarks/bench_llm.py``'s ``run_one`` (same
prompt construction) in the same run, unless ``--hf-dtypes none``.

Usage::

    python benchmarks/bench_cpu_engine.py --layers 2 --decode-tokens 8 --report-tokens 16
    python benchmarks/bench_cpu_engine.py            # the full shape (about 9 GB of /tmp)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.gguf_convert import (  # noqa: E402
    GGUFVocab,
    NeoXShape,
    TensorPlan,
    add_neox_metadata,
    build_gguf_vocab,
    choose_qtype,
    llama_quantize,
    write_gguf,
)
from models.layout import VOCAB  # noqa: E402

CHUNK_ROWS = 2048


def dolly_shape(layers: int) -> NeoXShape:
    """dolly-v2-3b's shape with LLM-CXR's vocabulary (``layers`` may be reduced).

    It is ``bench_llm.dolly_config`` (the transformers rows' model) read as the converter
    reads a ``config.json``, so that the engine and transformers rows measure one shape.
    """
    return NeoXShape.from_config(bench_llm_module().dolly_config(layers).to_dict())


def bench_llm_module() -> Any:
    """``benchmarks/bench_llm.py`` as a module (the transformers rows, bandwidth)."""
    spec = importlib.util.spec_from_file_location("bench_llm", REPO / "benchmarks" / "bench_llm.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tokenizer_dir(tmp: Path) -> Path:
    """The LLM-CXR ``tokenizer.json`` (the packaged GPT-NeoX-20B with the specials)."""
    from models.text import build_llmcxr_tokenizer, save_tokenizer_dir

    save_tokenizer_dir(build_llmcxr_tokenizer(), tmp)
    return tmp


def random_plans(shape: NeoXShape, quant: str, seed: int = 0) -> list[TensorPlan]:
    """Tensor plans whose producers make random data in the final encoding, chunk by chunk."""
    import gguf

    h, f, v = shape.hidden, shape.intermediate, shape.vocab
    mats: list[tuple[str, tuple[int, int]]] = [("token_embd.weight", (v, h))]
    vecs: list[tuple[str, int, float]] = []
    for i in range(shape.layers):
        b = f"blk.{i}"
        vecs += [(f"{b}.attn_norm.weight", h, 1.0), (f"{b}.attn_norm.bias", h, 0.0)]
        mats += [(f"{b}.attn_qkv.weight", (3 * h, h))]
        vecs += [(f"{b}.attn_qkv.bias", 3 * h, 0.0)]
        mats += [(f"{b}.attn_output.weight", (h, h))]
        vecs += [(f"{b}.attn_output.bias", h, 0.0)]
        vecs += [(f"{b}.ffn_norm.weight", h, 1.0), (f"{b}.ffn_norm.bias", h, 0.0)]
        mats += [(f"{b}.ffn_up.weight", (f, h))]
        vecs += [(f"{b}.ffn_up.bias", f, 0.0)]
        mats += [(f"{b}.ffn_down.weight", (h, f))]
        vecs += [(f"{b}.ffn_down.bias", h, 0.0)]
    vecs += [("output_norm.weight", h, 1.0), ("output_norm.bias", h, 0.0)]
    mats += [("output.weight", (v, h))]
    rng = np.random.default_rng(seed)
    t = gguf.GGMLQuantizationType

    def matrix(rows: int, cols: int, qtype: Any) -> np.ndarray:
        if qtype == t.Q8_0:
            out = np.empty((rows, cols // 32 * 34), dtype=np.uint8)
            for lo in range(0, rows, CHUNK_ROWS):
                n = min(CHUNK_ROWS, rows - lo)
                blocks = n * cols // 32
                d = np.full((blocks, 1), 0.02 / 64, dtype=np.float16).view(np.uint8)
                q = rng.integers(-127, 128, size=(blocks, 32), dtype=np.int8).view(np.uint8)
                out[lo : lo + n] = np.concatenate([d, q], axis=1).reshape(n, -1)
            return out
        if qtype == t.BF16:  # the upper 16 bits of each float32 (truncated: random data)
            out = np.empty((rows, cols), dtype=np.uint16)
            for lo in range(0, rows, CHUNK_ROWS):
                n = min(CHUNK_ROWS, rows - lo)
                x = rng.standard_normal((n, cols), dtype=np.float32) * 0.02
                out[lo : lo + n] = (x.view(np.uint32) >> 16).astype(np.uint16)
            return out
        dtype = np.float16 if qtype == t.F16 else np.float32
        out = np.empty((rows, cols), dtype=dtype)
        for lo in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - lo)
            out[lo : lo + n] = rng.standard_normal((n, cols), dtype=np.float32) * 0.02
        return out

    def vector(n: int, val: float) -> np.ndarray:
        return np.full(n, val, dtype=np.float32)

    plans = [TensorPlan(name, (n,), t.F32, partial(vector, n, val)) for name, n, val in vecs]
    for name, (rows, cols) in mats:
        qtype = choose_qtype((rows, cols), quant)
        plans.append(TensorPlan(name, (rows, cols), qtype, partial(matrix, rows, cols, qtype)))
    return plans


def write_random_gguf(
    path: Path, shape: NeoXShape, quant: str, vocab: GGUFVocab, *, threads: int
) -> tuple[float, int]:
    """Write (or re-use) a random GGUF; returns (seconds, weight bytes read per token)."""
    base = "f16" if quant == "q4_k_m" else quant
    plans = random_plans(shape, base)
    emb = next(p for p in plans if p.name == "token_embd.weight")
    if quant == "q4_k_m":
        per_token = 0  # measured from the file below
    else:
        per_token = sum(p.nbytes() for p in plans) - emb.nbytes() + emb.nbytes() // shape.vocab
    t0 = time.perf_counter()
    if not path.is_file():

        def meta(w: Any) -> None:
            add_neox_metadata(w, shape=shape, vocab=vocab, quant=quant, name="bench dolly-v2-3b")

        if quant == "q4_k_m":
            inter = path.with_name(path.name + ".f16")
            write_gguf(inter, metadata=meta, plans=plans)
            llama_quantize(inter, path, quant=quant, threads=threads)
            inter.unlink()
        else:
            write_gguf(path, metadata=meta, plans=plans)
    if quant == "q4_k_m":
        import gguf

        reader = gguf.GGUFReader(str(path))
        sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
        per_token = (
            sum(sizes.values()) - sizes["token_embd.weight"] * (shape.vocab - 1) // shape.vocab
        )
    return time.perf_counter() - t0, int(per_token)


def prompt_ids(tok: Any, n: int) -> list[int]:
    """A CXR->report prompt (text + 256 image ids) padded or cut to ``n`` tokens."""
    from models.prompts import report_prompt

    codes = [(37 * i + 11) % 1024 for i in range(256)]
    ids = tok.encode_with_image(report_prompt(), codes)
    while len(ids) < n:
        ids = ids[:10] + ids[10:11] + ids[10:]
    return ids[-n:]


def best_rates(engine: Any, ids: list[int], decode_tokens: int, repeats: int) -> tuple[dict, Any]:
    """Best prefill and decode tokens/s of ``repeats`` greedy runs of ``ids`` on a loaded
    backend; returns them and the last run's result."""
    from models.backends.base import GenerationRequest

    best: dict[str, float] = {}
    r = None
    for _ in range(repeats):
        r = engine.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=decode_tokens)])[0]
        if r.error:
            raise RuntimeError(r.error)
        rate = (r.new_tokens - 1) / r.decode_s if r.new_tokens > 1 else float("nan")
        best["prefill_tok_s"] = max(best.get("prefill_tok_s", 0.0), len(ids) / r.prefill_s)
        best["decode_tok_s"] = max(best.get("decode_tok_s", 0.0), rate)
    return best, r


def run_engine(
    path: Path, quant: str, ids: list[int], args: argparse.Namespace, threads: int
) -> dict[str, Any]:
    """Time one GGUF file with the llama.cpp backend."""
    from models.backends.base import GenerationRequest
    from models.backends.llamacpp import LlamaCppBackend

    n_ctx = len(ids) + max(args.report_tokens, args.decode_tokens) + 16
    # the same prompt runs several times: without the prefix cache every run computes it all
    engine = LlamaCppBackend(
        path, threads=threads, n_ctx=n_ctx, max_batch=args.batch, prefix_cache=False
    )
    t0 = time.perf_counter()
    engine.load()
    load_s = time.perf_counter() - t0
    engine.generate([GenerationRequest(prompt_ids=ids[:32], max_new_tokens=4)])  # page in
    best, _ = best_rates(engine, ids, args.decode_tokens, args.repeats)
    rep = engine.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=args.report_tokens)])[0]
    reqs = [
        GenerationRequest(prompt_ids=[*ids[:-1], ids[-1] + k], max_new_tokens=args.report_tokens)
        for k in range(args.batch)
    ]
    t0 = time.perf_counter()
    batch = engine.generate(reqs)
    wall = time.perf_counter() - t0
    if any(b.error for b in batch):
        raise RuntimeError(batch[0].error)
    new = sum(b.new_tokens for b in batch)
    row = {
        "engine": f"llama.cpp {quant}",
        "load_s": load_s,
        "prompt_tokens": len(ids),
        **best,
        "report_tokens": rep.new_tokens,
        "s_per_report": rep.prefill_s + rep.decode_s,
        f"batch{args.batch}_decode_tok_s": (new - args.batch) / batch[0].decode_s,
        f"batch{args.batch}_s_per_report": wall / args.batch,
        "threads": threads,
    }
    engine.close()
    return row


def main(argv: list[str] | None = None) -> None:
    """Write the GGUF files, run engine and transformers rows, print one table."""
    bench_llm = bench_llm_module()
    ap = bench_llm.option_parser(__doc__)
    ap.add_argument("--quants", default="f16,q8_0", help="comma list of f32,f16,q8_0,q4_k_m")
    ap.add_argument("--hf-dtypes", default="fp32,bf16", help="transformers rows, or 'none'")
    ap.add_argument("--decode-tokens", type=int, default=32, help="new tokens for decode tok/s")
    ap.add_argument("--report-tokens", type=int, default=150, help="new tokens of one report")
    ap.add_argument("--batch", type=int, default=4, help="parallel sequences for throughput")
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--out-dir", type=Path, default=None, help="GGUF files (default: a tmp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files")
    args = ap.parse_args(argv)
    threads = int(args.threads or os.cpu_count() or 1)
    import torch

    torch.set_num_threads(threads)
    from models.text import LLMCXRTokenizer

    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-cpu-engine-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = tokenizer_dir(out_dir / "tokenizer")
    vocab = build_gguf_vocab(tok_dir / "tokenizer.json")
    tok = LLMCXRTokenizer.from_dir(tok_dir)
    ids = prompt_ids(tok, args.prompt_tokens)
    shape = dolly_shape(args.layers)

    bw = bench_llm.read_bandwidth(args.bandwidth_gib)
    rows: list[dict[str, Any]] = []
    for quant in [q.strip() for q in args.quants.split(",") if q.strip()]:
        path = out_dir / f"dolly-{args.layers}l-{quant}.gguf"
        write_s, per_token = write_random_gguf(path, shape, quant, vocab, threads=threads)
        row = run_engine(path, quant, ids, args, threads)
        row.update(
            write_s=write_s, weight_bytes_per_token=per_token, file_bytes=path.stat().st_size
        )
        rows.append(row)
        if not args.keep:
            path.unlink()
        gc.collect()
    for dtype in [d.strip() for d in args.hf_dtypes.split(",") if d.strip() and d != "none"]:
        r = bench_llm.run_one(args.layers, dtype, args.prompt_tokens, args.decode_tokens, 1)
        rows.append(
            {
                "engine": f"transformers {dtype}",
                "prompt_tokens": r["prompt_tokens"],
                "prefill_tok_s": r["prefill_tok_s"],
                "decode_tok_s": r["decode_tok_s"],
                "weight_bytes_per_token": r["weight_bytes_per_token"],
                # prefill + report_tokens decode steps at the measured rates
                "s_per_report": r["prompt_tokens"] / r["prefill_tok_s"]
                + args.report_tokens / r["decode_tok_s"],
            }
        )
        gc.collect()
    bw = max(bw, bench_llm.read_bandwidth(args.bandwidth_gib))

    import llama_cpp

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"threads {threads}; llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}; "
        f"read bandwidth {bw / 1e9:.1f} GB/s (best of tensor sums, same run)"
    )
    print(
        f"model: dolly-v2-3b shape, {args.layers} layers, vocab {VOCAB}, random weights; "
        f"prompt {len(ids)} tokens, report {args.report_tokens} new tokens, batch {args.batch}"
    )
    bkey, rkey = f"batch{args.batch}_decode_tok_s", f"batch{args.batch}_s_per_report"
    ref = next((r for r in rows if r["engine"] == "transformers bf16"), None)
    head = (
        f"{'engine':<18}{'GB/tok':>8}{'prefill t/s':>12}{'decode t/s':>11}{'limit t/s':>10}"
        f"{'frac':>6}{'s/report':>10}{f'b{args.batch} t/s':>9}{f'b{args.batch} s/rep':>10}"
        f"{'dec x bf16':>11}{'rep x bf16':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        limit = bench_llm.bandwidth_limit(r, bw)
        dec_x = r["decode_tok_s"] / ref["decode_tok_s"] if ref else float("nan")
        rep_x = ref["s_per_report"] / r["s_per_report"] if ref else float("nan")
        r["decode_x_bf16"], r["report_speedup_x_bf16"] = dec_x, rep_x
        b_tok = f"{r[bkey]:>9.2f}" if bkey in r else f"{'-':>9}"
        b_rep = f"{r[rkey]:>10.1f}" if rkey in r else f"{'-':>10}"
        print(
            f"{r['engine']:<18}{r['weight_bytes_per_token'] / 1e9:>8.2f}{r['prefill_tok_s']:>12.1f}"
            f"{r['decode_tok_s']:>11.2f}{limit:>10.2f}{r['fraction_of_limit']:>6.2f}"
            f"{r['s_per_report']:>10.1f}{b_tok}{b_rep}{dec_x:>11.2f}{rep_x:>11.2f}"
        )
    print(
        "targets: engine decode >= 0.75 of its limit and >= 3x transformers bf16 decode; "
        "Q8_0 s/report >= 3x lower than bf16 (LLM part of a study)"
    )
    if args.json:
        print(json.dumps({"read_bandwidth_bytes_s": bw, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
