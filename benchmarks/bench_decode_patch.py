"""Two llama-cpp-python builds against each other on one GGUF file: the patched flavour's A/B.

``scripts/build-llama-cpp.sh`` installs stock llama-cpp-python by default, and with
``CXR_NODE_LLAMACPP_FLAVOUR=patched`` the node's patch (``scripts/patches/``: CPU decode
kernels, AMX fixes). This benchmark measures what the patch buys and how far it changes the
arithmetic. It writes one random GGUF of the full dolly-v2-3b shape
(``bench_cpu_engine.write_random_gguf``; ``--gguf`` re-uses a file), then runs each build in
its own subprocess (``--stock DIR`` and ``--patched DIR``, each a ``pip install --target``
directory put first on ``PYTHONPATH``; ``--stock`` defaults to this interpreter's own
install), alternating ``--rounds`` times, because the noise of a shared 2-core machine
drifts over minutes. Each run measures, with the node's
:class:`~models.backends.llamacpp.LlamaCppBackend` at batch 1, prefill tokens/s of a
``--prompt-tokens`` (300) prompt and decode tokens/s over ``--decode-tokens`` (best of two),
and records the greedy tokens and the prompt's next-token logits.

The table gives medians over the rounds, decode as a fraction of the memory-bandwidth limit
(read bandwidth measured in this run / weight bytes read per token), the ratio to the stock
build, how many of the patched build's greedy tokens match the stock build's (from the
first), and whether its prompt logits are bit-identical to the stock build's, or else their
largest difference. Not a test. A patched build to compare with (the wheel that
``CXR_NODE_LLAMACPP_FLAVOUR=patched scripts/build-llama-cpp.sh`` leaves in its cache)::

    pip install --no-deps --target /tmp/lcpp-patched \\
        ~/.cache/llm-cxr-node/wheels/llama-cpp-python-0.3.36+cxrnode.*/*.whl
    python benchmarks/bench_decode_patch.py --patched /tmp/lcpp-patched
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_cpu_engine  # noqa: E402

from models.backends.llamacpp import common_prefix  # noqa: E402


def child(gguf: Path, tok_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One build's run (in its own process): rates and tokens; the prompt's logits go to
    ``--logits-out``."""
    import llama_cpp

    from models.backends.base import GenerationRequest
    from models.backends.llamacpp import LlamaCppBackend
    from models.text import LLMCXRTokenizer

    ids = bench_cpu_engine.prompt_ids(LLMCXRTokenizer.from_dir(tok_dir), args.prompt_tokens)
    engine = LlamaCppBackend(
        gguf,
        threads=args.threads,
        n_ctx=len(ids) + args.decode_tokens + 16,
        max_batch=1,
        prefix_cache=False,
    )
    engine.load()
    engine.generate([GenerationRequest(prompt_ids=ids[:32], max_new_tokens=4)])  # page in
    logits = engine.next_token_logits(ids)
    best, last = bench_cpu_engine.best_rates(engine, ids, args.decode_tokens, 2)
    engine.close()
    np.save(args.logits_out, logits.astype("float32"))
    return {
        "version": llama_cpp.__version__,
        **best,
        "tokens": last.token_ids,
    }


def run_build(
    site: Path | None, gguf: Path, tok_dir: Path, args: argparse.Namespace, logits_out: Path
) -> dict:
    """Run :func:`child` under one build (``site`` first on ``PYTHONPATH``, or none); the
    prompt's logits go to ``logits_out`` (``.npy``)."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(gguf),
        str(tok_dir),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--decode-tokens",
        str(args.decode_tokens),
        "--threads",
        str(args.threads),
        "--logits-out",
        str(logits_out),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Write (or re-use) the GGUF, alternate the builds, print one table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stock", type=Path, default=None, help="default: this interpreter's")
    ap.add_argument("--patched", type=Path, help="site directory of the patched build")
    ap.add_argument("--quant", default="q8_0", choices=["q8_0", "f16"])
    ap.add_argument("--layers", type=int, default=32, help="transformer layers (32 = dolly-v2-3b)")
    ap.add_argument("--gguf", type=Path, default=None, help="re-use this file (same --quant)")
    ap.add_argument("--out-dir", type=Path, default=None, help="GGUF file (default: a tmp dir)")
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--decode-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--bandwidth-gib", type=float, default=1.0)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--logits-out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        if args.logits_out is None:
            ap.error("--child needs --logits-out")
        print(json.dumps(child(args.child[0], args.child[1], args)))
        return
    if args.patched is None:
        ap.error("--patched DIR is required (a pip --target install of the patched build)")

    from models.gguf_convert import build_gguf_vocab

    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-decode-patch-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = bench_cpu_engine.tokenizer_dir(out_dir / "tokenizer")
    shape = bench_cpu_engine.dolly_shape(args.layers)
    gguf = args.gguf or out_dir / f"dolly-{args.layers}l-{args.quant}.gguf"
    vocab = build_gguf_vocab(tok_dir / "tokenizer.json")
    # an existing file is re-used; the call still returns the weight bytes read per token
    _, per_token = bench_cpu_engine.write_random_gguf(
        gguf, shape, args.quant, vocab, threads=args.threads
    )
    bench_llm = bench_cpu_engine.bench_llm_module()
    bw = bench_llm.read_bandwidth(args.bandwidth_gib)
    builds = {"stock": args.stock, "patched": args.patched}
    runs: dict[str, list[dict]] = {name: [] for name in builds}
    for k in range(args.rounds):
        for name, site in builds.items():
            r = run_build(site, gguf, tok_dir, args, out_dir / f"logits-{name}-{k}.npy")
            runs[name].append(r)
            print(
                f"round {k + 1} {name:8s} {r['version']:20s} prefill {r['prefill_tok_s']:6.2f} "
                f"decode {r['decode_tok_s']:6.3f} tok/s",
                flush=True,
            )
    bw = max(bw, bench_llm.read_bandwidth(args.bandwidth_gib))
    limit = bw / per_token
    ref = runs["stock"][0]
    med = {n: statistics.median(r["decode_tok_s"] for r in rs) for n, rs in runs.items()}
    print(
        f"\n{args.quant} GGUF, {args.layers} layers, {per_token / 1e9:.2f} GB read per token; "
        f"read bandwidth {bw / 1e9:.1f} GB/s, limit {limit:.2f} tok/s; threads {args.threads}; "
        f"{args.rounds} rounds, medians\n"
    )
    print(
        "| build | llama-cpp-python | prefill t/s | decode t/s (min-max) | frac | x stock "
        "| greedy tokens = stock | logits = stock |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ref_logits = np.load(out_dir / "logits-stock-0.npy")
    rows = []
    for name, rs in runs.items():
        dec = [r["decode_tok_s"] for r in rs]
        # greedy tokens equal to the stock build's, from the first (worst round)
        agree = min(common_prefix(r["tokens"], ref["tokens"]) for r in rs)
        logits = [np.load(out_dir / f"logits-{name}-{k}.npy") for k in range(len(rs))]
        same_logits = all(lg.tobytes() == ref_logits.tobytes() for lg in logits)
        max_diff = max(float(np.max(np.abs(lg - ref_logits))) for lg in logits)
        row = {
            "build": name,
            "version": rs[0]["version"],
            "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in rs),
            "decode_tok_s": med[name],
            "decode_min": min(dec),
            "decode_max": max(dec),
            "fraction_of_limit": med[name] / limit,
            "x_stock": med[name] / med["stock"],
            "greedy_tokens_equal": agree,
            "greedy_tokens": len(ref["tokens"]),
            "logits_identical": same_logits,
            "logits_max_abs_diff": max_diff,
        }
        rows.append(row)
        print(
            f"| {name} | {row['version']} | {row['prefill_tok_s']:.1f} | {med[name]:.2f} "
            f"({min(dec):.2f}-{max(dec):.2f}) | {row['fraction_of_limit']:.2f} | "
            f"{row['x_stock']:.2f} | {agree}/{len(ref['tokens'])} | "
            f"{'yes' if same_logits else f'no, max |diff| {max_diff:.2e}'} |"
        )
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {"read_bandwidth_bytes_s": bw, "weight_bytes_per_token": per_token, "rows": rows},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
