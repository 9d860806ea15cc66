"""What a batch decode step costs on the CPU engine, by how its rows lie over the sequences.

The llama.cpp backend keeps one KV stream per sequence (``kv_unified = False``), and
``llama_decode`` then splits a batch into passes over the weights that each hold
consecutive sequence ids with as many rows each (``llama_batch_allocr::split_equal``).
This measures, on one GGUF file (``--gguf``; e.g. the one ``bench_speculative.py`` writes),
after a ``--prompt-tokens`` prompt in each of 4 sequences, the least of ``--rounds`` steps
for each layout, against a one-token step of one sequence: the costs that the backend's
filler rows (``LlamaCppBackend._filler_rows``: throw-away rows for idle sequences between
running ones) and its slot order avoid. Then whole batches through ``generate``: four
requests of different lengths, the second ending first, with and without the filler rows.

Not a test::

    python benchmarks/bench_batch_layout.py --gguf /tmp/spec/dolly-32l-q8_0.gguf
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.backends.base import GenerationRequest  # noqa: E402
from models.backends.llamacpp_backend import LlamaCppBackend  # noqa: E402

# name: rows per sequence 0-3 (a row count; "f" = that many filler rows, no logits), order
LAYOUTS: list[tuple[str, list[int | str], list[int] | None]] = [
    ("one sequence, 1 token", [1, 0, 0, 0], None),
    ("one sequence, 4 tokens", [4, 0, 0, 0], None),
    ("sequences 0-3, 1 token each", [1, 1, 1, 1], None),
    ("sequences 0-3 fed in order 2,0,1,3", [1, 1, 1, 1], [2, 0, 1, 3]),
    ("sequences 0,2,3", [1, 0, 1, 1], None),
    ("sequences 0,2,3 + a filler row in 1", [1, "f", 1, 1], None),
    ("sequences 0,2", [1, 0, 1, 0], None),
    ("sequences 0,2 + a filler row in 1", [1, "f", 1, 0], None),
    ("sequences 0,1", [1, 1, 0, 0], None),
    ("uneven 2,1,1,1", [2, 1, 1, 1], None),
    ("even 2,2,2,2", [2, 2, 2, 2], None),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--new-tokens", type=int, default=48, help="longest request of part 2")
    args = ap.parse_args(argv)

    e = LlamaCppBackend(args.gguf, threads=args.threads, max_batch=4)
    e.load()
    llama = e._llama
    mem = llama.llama_get_memory(e._ctx)
    rng = random.Random(0)
    n = args.prompt_tokens
    prompts = [[rng.randrange(1000, 50000) for _ in range(n)] for _ in range(4)]
    for s, ids in enumerate(prompts):
        e._decode_batch([(t, i, s, i == n - 1) for i, t in enumerate(ids)])

    def step(rows: list[int | str], order: list[int] | None) -> float:
        items: list[tuple[int, int, int, bool]] = []
        for s in order or range(4):
            r = rows[s]
            count, want = (1, False) if r == "f" else (int(r), True)
            items += [(1234 + i, n + i, s, want) for i in range(count)]
        t0 = time.perf_counter()
        e._decode_batch(items)
        dt = time.perf_counter() - t0
        for s in range(4):
            llama.llama_memory_seq_rm(mem, s, n, -1)
        return dt

    best = {name: 1e9 for name, _, _ in LAYOUTS}
    for _ in range(args.rounds):
        for name, rows, order in LAYOUTS:
            step(rows, order)
            best[name] = min(best[name], step(rows, order))
    one = best[LAYOUTS[0][0]]
    print(f"\n{args.gguf.name}, {args.threads} threads, prompts of {n} tokens in sequences 0-3")
    print(f"1. One decode step, least of {args.rounds}")
    print(f"{'layout':38} {'ms':>7} {'x one':>6}")
    for name, _, _ in LAYOUTS:
        print(f"{name:38} {best[name] * 1e3:7.1f} {best[name] / one:6.2f}")

    # 2. whole batches: the second request ends first, so slots 0 and 2-3 run on alone
    lengths = [args.new_tokens, args.new_tokens // 4, args.new_tokens, args.new_tokens // 2]
    reqs = [
        GenerationRequest(prompt_ids=p[:64], max_new_tokens=k)
        for p, k in zip(prompts, lengths, strict=True)
    ]
    fill = e._filler_rows
    secs: dict[str, list[float]] = {"with filler rows": [], "without": []}
    for r in range(args.rounds):
        for name in list(secs)[:: 1 if r % 2 == 0 else -1]:
            e._filler_rows = fill if name == "with filler rows" else (lambda drafted: [])  # type: ignore[method-assign]
            e.clear_cache()
            res = e.generate(reqs)
            secs[name].append(max(x.decode_s for x in res))
    e._filler_rows = fill  # type: ignore[method-assign]
    print(
        f"\n2. generate(): 4 requests of {lengths} new tokens, decode seconds, "
        f"median of {args.rounds}"
    )
    base = statistics.median(secs["without"])
    for name, v in secs.items():
        print(f"{name:18} {statistics.median(v):7.2f} s  x {base / statistics.median(v):4.2f}")
    e.close()


if __name__ == "__main__":
    main()
