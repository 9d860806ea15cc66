"""LLM prefill/decode throughput at the dolly-v2-3b shape, against the memory-bandwidth limit.

Builds a ``GPTNeoXForCausalLM`` with dolly-v2-3b's shape (hidden 2560, 32 layers, 32 heads,
intermediate 10240, 2048 positions, rotary_pct 0.25, untied embeddings) and LLM-CXR's
vocabulary (51305 rows), random weights, directly in the target dtype (meta device, then
``to_empty``: weights are allocated once). Runs the transformers backend (fp32 and bf16):
prefill tokens/s for a ~300-token report prompt (46 text tokens + 256 image tokens, as in
CXR -> report), decode tokens/s (greedy, KV cache), and decode as a fraction of the
bandwidth limit: read bandwidth (measured here, large tensor sum) / weight bytes per token.

Full shape: 2.8 B parameters, 11 GB in fp32. Smoke run: ``--layers 2``.

Usage::

    python benchmarks/bench_llm.py --layers 2 --decode-tokens 8
    python benchmarks/bench_llm.py                      # the full shape (lead only)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dolly_config(layers: int) -> Any:
    """dolly-v2-3b's shape with LLM-CXR's vocabulary (``layers`` may be reduced)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=51305,
        hidden_size=2560,
        num_hidden_layers=layers,
        num_attention_heads=32,
        intermediate_size=10240,
        max_position_embeddings=2048,
        rotary_pct=0.25,  # type: ignore[call-arg]
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def build_model(layers: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> Any:
    """Random-weight model allocated once in ``dtype`` on ``device`` (no fp32 copy for bf16,
    no trip through host memory for a GPU)."""
    from transformers import GPTNeoXForCausalLM

    cfg = dolly_config(layers)
    model_cls: Any = GPTNeoXForCausalLM
    with torch.device("meta"):
        model = model_cls(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "layernorm" in name or "layer_norm" in name:
                p.fill_(1.0)
            else:
                p.uniform_(-0.03, 0.03, generator=gen)
    # non-persistent buffers (rotary inv_freq) were on meta: rebuild them in fp32, as
    # from_pretrained keeps them
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(config=cfg).to(device)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], fresh)
    return model.eval()


def read_bandwidth_samples(gib: float = 1.0, repeats: int = 5) -> list[float]:
    """``repeats`` sums over a ``gib`` GiB fp32 tensor: bytes read per second, each."""
    n = int(gib * (1 << 30) // 4)
    x = torch.ones(n, dtype=torch.float32)
    x.sum()  # touch once
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        rates.append(n * 4 / (time.perf_counter() - t0))
    del x
    gc.collect()
    return rates


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best of ``repeats`` sums over a ``gib`` GiB fp32 tensor: bytes read per second."""
    return max(read_bandwidth_samples(gib, repeats))


def weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights read per decoded token: all parameters but the input embedding
    (a single row is gathered)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    return int(total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size())


def bandwidth_limit(row: dict[str, Any], bw: float) -> float:
    """Add the row's decode limit at read bandwidth ``bw`` and its fraction of it.

    Parameters
    ----------
    row
        A table row with ``weight_bytes_per_token`` and ``decode_tok_s``; gets
        ``bandwidth_limit_tok_s`` and ``fraction_of_limit``.
    bw
        Read bandwidth, bytes per second.

    Returns
    -------
    float
        The limit: tokens per second if each token reads every weight once at ``bw``.
    """
    limit = bw / row["weight_bytes_per_token"]
    row["bandwidth_limit_tok_s"] = limit
    row["fraction_of_limit"] = row["decode_tok_s"] / limit
    return limit


def run_one(
    layers: int, dtype_name: str, prompt_tokens: int, decode_tokens: int, repeats: int
) -> dict[str, Any]:
    """Build, warm up and time one dtype; returns the row of the table."""
    from models.backends.base import GenerationRequest
    from models.backends.transformers_backend import TransformersBackend
    from models.prompts import report_prompt
    from models.text import LLMCXRTokenizer, build_llmcxr_tokenizer

    tok = LLMCXRTokenizer(build_llmcxr_tokenizer())
    t0 = time.perf_counter()
    model = build_model(layers, DTYPES[dtype_name])
    build_s = time.perf_counter() - t0
    backend = TransformersBackend.from_model(model, tok)
    codes = [(37 * i + 11) % 1024 for i in range(256)]
    ids = tok.encode_with_image(report_prompt(), codes)
    while len(ids) < prompt_tokens:  # pad the instruction side to the requested length
        ids = ids[:10] + ids[10:11] + ids[10:]
    ids = ids[-prompt_tokens:] if len(ids) > prompt_tokens else ids
    req = GenerationRequest(prompt_ids=ids, max_new_tokens=decode_tokens)
    backend.generate([GenerationRequest(prompt_ids=ids[:32], max_new_tokens=2)])  # warm-up
    prefill, decode, new = [], [], []
    for _ in range(repeats):
        res = backend.generate([req])[0]
        if res.error:
            raise RuntimeError(res.error)
        prefill.append(res.prefill_s)
        decode.append(res.decode_s)
        new.append(res.new_tokens)
    best = min(range(repeats), key=lambda i: prefill[i] + decode[i])
    bpt = weight_bytes_per_token(model)
    params = sum(p.numel() for p in model.parameters())
    row = {
        "dtype": dtype_name,
        "layers": layers,
        "params": params,
        "weight_bytes_per_token": bpt,
        "build_s": build_s,
        "prompt_tokens": len(ids),
        "prefill_tok_s": len(ids) / prefill[best],
        "decode_tokens": new[best],
        "decode_tok_s": (new[best] - 1) / decode[best] if new[best] > 1 else float("nan"),
    }
    del backend, model
    gc.collect()
    return row


def option_parser(description: str | None) -> argparse.ArgumentParser:
    """The options this benchmark shares with ``bench_cpu_engine.py``.

    Parameters
    ----------
    description
        The script's ``__doc__``.

    Returns
    -------
    argparse.ArgumentParser
        With ``--layers``, ``--prompt-tokens``, ``--repeats``, ``--bandwidth-gib`` and
        ``--json``; the script adds its own.
    """
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=32, help="transformer layers (32 = dolly-v2-3b)")
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="tensor size for bandwidth")
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    return ap


def main(argv: list[str] | None = None) -> None:
    """Parse options, run fp32 and bf16, print one table."""
    ap = option_parser(__doc__)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bw = read_bandwidth(args.bandwidth_gib)
    rows = [
        run_one(args.layers, d.strip(), args.prompt_tokens, args.decode_tokens, args.repeats)
        for d in args.dtypes.split(",")
        if d.strip()
    ]
    bw_after = read_bandwidth(args.bandwidth_gib)
    bw = max(bw, bw_after)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"read bandwidth {bw / 1e9:.1f} GB/s (best of tensor sums)"
    )
    print(f"model: dolly-v2-3b shape, {args.layers} layers, vocab 51305, random weights")
    head = (
        f"{'dtype':<6}{'params':>10}{'GB/token':>10}{'prefill tok/s':>15}{'decode tok/s':>14}"
        f"{'limit tok/s':>13}{'frac':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        limit = bandwidth_limit(r, bw)
        print(
            f"{r['dtype']:<6}{r['params'] / 1e9:>9.2f}B{r['weight_bytes_per_token'] / 1e9:>10.2f}"
            f"{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.2f}{limit:>13.2f}"
            f"{r['fraction_of_limit']:>7.2f}"
        )
    by = {r["dtype"]: r for r in rows}
    if "fp32" in by and "bf16" in by:
        print(
            f"bf16/fp32: prefill x{by['bf16']['prefill_tok_s'] / by['fp32']['prefill_tok_s']:.2f}, "
            f"decode x{by['bf16']['decode_tok_s'] / by['fp32']['decode_tok_s']:.2f}"
        )
    if args.json:
        print(json.dumps({"read_bandwidth_bytes_s": bw, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
