"""Speculative greedy decoding on the CPU engine: what checking proposals costs, what it buys.

The llama.cpp backend's ``speculative=k`` checks up to *k* n-gram proposals per decode step
(``models.backends.speculative``). Its gain depends on how often the model agrees with the
proposals, which random weights cannot tell: a trained LLM-CXR writes templated reports,
random weights write noise. So this benchmark separates what holds for any weights from
what does not. On one random GGUF of the full dolly-v2-3b shape
(``bench_cpu_engine.write_random_gguf``; ``--gguf`` re-uses a file), in one run:

1. **The cost of a step of k+1 tokens** (one ``llama_decode``, logits for every row, after a
   ``--prompt-tokens`` prompt), least of ``--rounds`` (one-token steps timed after two
   others, as in plain decoding), against one token: T(k+1)/T(1).
   Speed does not depend on the weights' values, so this holds for the trained model. From
   it, for a per-token acceptance *a* (each proposal right with probability *a*, the first
   wrong one ends the step), the expected tokens per step (1 - a^(k+1)) / (1 - a) and the
   decode speed-up over plain decoding.
2. **Whole reports** (``--report-tokens`` new tokens, greedy) with the node's backend, plain
   and speculative, each on a new study (shifted image ids, the template from the prefix
   cache) and on the same study again (its whole prompt cached, its earlier report
   remembered: a trained model would repeat that report, random weights at this size
   diverge from it at the first near tie that another summation order flips). The table
   gives prefill and decode seconds, tokens per step, the share of proposals kept, how much
   of each report equals plain greedy's from the first token, and the ratio of decode
   rates against plain decoding measured in this run. These are random weights' figures
   and say nothing about a trained model's acceptance.
3. With ``--hf-bf16``, one transformers bf16 report of a new study, the end-to-end reference
   of the issue's targets (seconds per report, prefill + decode, without the VQ-GAN
   encode, which is the same for both).
4. With ``--reports FILE``, what speculation would do for outputs that are not random: the
   reports in FILE, in order, are taken as a model's greedy outputs (each after a report
   prompt with its own image ids) and replayed through the drafter
   (``speculative.replay``, which counts the engine's steps exactly for a known output),
   with the node's memory of earlier reports, proposals as long as n-grams match and sized
   by part 1's step costs as the backend does. It prints the share of proposals kept,
   tokens per step, the decode speed-up that the step costs of part 1 give for those steps,
   and for ``--timed`` reports the speed-up measured by running their replayed steps on the
   full-size engine (each step's tokens fed, every row's logits read, the rejected ones'
   K/V dropped: the work the backend does for that output).
   A site can run it on its own drafts; public report corpora (e.g. Open-i's Indiana
   University chest X-ray reports, ``findings``/``impression`` columns) stand in for a
   trained LLM-CXR's outputs, which no machine here has. ``--replay-only`` runs this part
   alone, without building the model (a speed-up column only with ``--step-costs``).
5. With ``--batch B`` too, the same reports in consecutive groups of B decoded together, as
   a worker batch of B studies (``speculative.replay_batch``): every step feeds each running
   report's token and proposals. Proposals sized together for the step (the backend's way)
   against each report's sized as if it were alone (the backend before), and the decode
   speed-up over plain batched decoding that part 1's step costs give; part 1 then
   measures steps up to B x (k+1) tokens. With ``--timed``, the groups that hold the
   timed reports are also decoded on the engine batch step by batch step as replayed (B
   sequences, every row's logits read, the rejected K/V dropped), plain batched decoding
   and each setting in turn, so that speed-up is measured too.

Not a test::

    python benchmarks/bench_speculative.py --speculative 1,2,3,4,8 --hf-bf16
    python benchmarks/bench_speculative.py --speculative 2,3,4 --reports reports.jsonl
    python benchmarks/bench_speculative.py --speculative 2,4 --reports reports.jsonl \
        --batch 4 --report-rounds 0
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_cpu_engine  # noqa: E402
import bench_generation  # noqa: E402
from bench_generation import shifted_study  # noqa: E402

from models.backends.base import GenerationRequest  # noqa: E402
from models.backends.llamacpp_backend import LlamaCppBackend, common_prefix  # noqa: E402
from models.backends.speculative import (  # noqa: E402
    BatchReplay,
    NgramDrafter,
    Replay,
    batch_replay_summary,
    replay_batches,
    replay_reports,
    replay_summary,
    report_outputs,
)
from models.layout import IMAGE_TOKEN_OFFSET  # noqa: E402

ACCEPTANCE = (0.3, 0.5, 0.7, 0.9)


def step_costs(
    engine: LlamaCppBackend, ids: list[int], sizes: list[int], rounds: int
) -> dict[int, float]:
    """Seconds of one decode step of ``n`` tokens (every row's logits read) after the prompt
    ``ids``, per ``n`` in ``sizes`` (``LlamaCppBackend.step_seconds``: the least of
    ``rounds``, the sizes taking turns, one-token steps after two others as in plain
    decoding)."""
    engine.load()
    try:
        return engine.step_seconds(sizes, rounds=rounds, prompt=ids)
    finally:
        engine.close()


def expected_tokens(a: float, k: int) -> float:
    """Tokens per step with ``k`` proposals, each right with probability ``a``."""
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def report(engine: LlamaCppBackend, ids: list[int], new: int) -> dict[str, Any]:
    """One greedy report: seconds, tokens, steps and proposals from the engine's counters."""
    h0 = engine.health()
    res = engine.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=new)])[0]
    if res.error:
        raise RuntimeError(res.error)
    h1 = engine.health()

    def d(key: str) -> int:
        return int(h1[key]) - int(h0[key])

    return {
        "tokens": res.token_ids,
        "new_tokens": res.new_tokens,
        "prefill_s": res.prefill_s,
        "decode_s": res.decode_s,
        # the first new token comes from prefill
        "decode_tok_s": (res.new_tokens - 1) / res.decode_s if res.new_tokens > 1 else 0.0,
        "steps": d("decode_steps"),
        "drafted": d("draft_tokens"),
        "accepted": d("draft_tokens_accepted"),
        "reused": d("prompt_tokens_reused"),
    }


def report_rows(
    gguf: Path, ids: list[int], args: argparse.Namespace, specs: list[int]
) -> list[dict[str, Any]]:
    """Reports per setting: ``rounds`` new studies and, after each, the same study again."""
    rows: list[dict[str, Any]] = []
    plain_tokens: dict[int, list[int]] = {}
    for k in [0, *specs]:
        engine = LlamaCppBackend(gguf, threads=args.threads, max_batch=1, speculative=k)
        engine.load()
        report(engine, shifted_study(ids, 7), 8)  # page the weights in
        new_runs, again_runs = [], []
        for r in range(args.report_rounds):
            shift = 131 * (r + 1)
            new_runs.append(report(engine, shifted_study(ids, shift), args.report_tokens))
            again_runs.append(report(engine, shifted_study(ids, shift), args.report_tokens))
            if k == 0:
                plain_tokens[shift] = new_runs[-1]["tokens"]
        engine.close()
        for case, runs in (("new study", new_runs), ("same study again", again_runs)):
            same = [
                common_prefix(run["tokens"], plain_tokens[131 * (r + 1)])
                for r, run in enumerate(runs)
            ]
            rows.append(
                {
                    "speculative": k,
                    "case": case,
                    "prefill_s": statistics.median(x["prefill_s"] for x in runs),
                    "decode_s": statistics.median(x["decode_s"] for x in runs),
                    "decode_tok_s": statistics.median(x["decode_tok_s"] for x in runs),
                    "new_tokens": statistics.median(x["new_tokens"] for x in runs),
                    "tokens_per_step": statistics.median(
                        (x["new_tokens"] - 1) / max(x["steps"], 1) for x in runs
                    ),
                    "acceptance": sum(x["accepted"] for x in runs)
                    / max(sum(x["drafted"] for x in runs), 1),
                    "same_as_plain": min(
                        s / max(len(run["tokens"]), 1) for s, run in zip(same, runs, strict=True)
                    ),
                    "reused": statistics.median(x["reused"] for x in runs),
                }
            )
    return rows


def hf_bf16_report(args: argparse.Namespace, ids: list[int], tok: Any) -> dict[str, float]:
    """One transformers bf16 report of a new study (after a short warm-up run)."""
    bench_llm = bench_cpu_engine.bench_llm_module()
    from models.backends.transformers_backend import TransformersBackend

    model = bench_llm.build_model(args.layers, bench_llm.DTYPES["bf16"], device="cpu")
    backend = TransformersBackend.from_model(model, tok, device="cpu", max_batch=1)
    del model
    try:
        warm = GenerationRequest(prompt_ids=shifted_study(ids, 7)[:32], max_new_tokens=4)
        backend.generate([warm])
        req = GenerationRequest(
            prompt_ids=shifted_study(ids, 131), max_new_tokens=args.report_tokens
        )
        res = backend.generate([req])[0]
        if res.error:
            raise RuntimeError(res.error)
        dec_s = res.decode_s
        if 1 < res.new_tokens < args.report_tokens:  # random weights stopped early
            dec_s *= (args.report_tokens - 1) / (res.new_tokens - 1)
        return {"prefill_s": res.prefill_s, "decode_s": dec_s, "new_tokens": res.new_tokens}
    finally:
        del backend
        bench_generation.release_memory()


def load_reports(path: Path, fields: list[str]) -> list[str]:
    """Report texts from ``path``: JSON Lines or CSV whose ``fields`` columns are joined
    (empty ones left out; rows with none skipped), or plain text with one report a line."""
    if path.suffix in (".jsonl", ".csv"):
        with path.open(encoding="utf-8", newline="") as f:
            rows: list[dict[str, Any]] = (
                [json.loads(line) for line in f if line.strip()]
                if path.suffix == ".jsonl"
                else list(csv.DictReader(f))
            )
        texts = [" ".join(str(r.get(k) or "").strip() for k in fields).strip() for r in rows]
    else:
        texts = path.read_text(encoding="utf-8").splitlines()
    return [" ".join(t.split()) for t in texts if t.strip()]


def replay_corpus(
    items: list[tuple[list[int], list[int]]],
    k: int,
    *,
    max_new: int,
    memory: int,
    step_costs: list[float] | None,
) -> list[Replay]:
    """The reports, in order, replayed with up to ``k`` proposals per step (sized by
    ``step_costs``, or as many as match with ``None``) and the node's memory of earlier
    reports (``speculative.replay_reports``)."""
    drafter = NgramDrafter(
        max_tokens=k, memory=memory, max_id=IMAGE_TOKEN_OFFSET, step_costs=step_costs
    )
    return replay_reports(drafter, items, max_new=max_new)


def timed_replays(
    gguf: Path,
    items: list[tuple[list[int], list[int]]],
    replays: dict[tuple[int, str], list[Replay]],
    args: argparse.Namespace,
) -> dict[tuple[int, str], float]:
    """Decode seconds of ``--timed`` replayed reports (from the ``--warm``-th on), summed,
    per setting and for plain decoding (key ``(0, "plain")``): :func:`timed_batches` with
    batches of one report."""
    ones = {
        key: [BatchReplay(replays=[r], step_rows=list(r.step_tokens)) for r in reps]
        for key, reps in replays.items()
    }
    return timed_batches(gguf, items, ones, args, batch=1)[0]


def timed_batch_steps(
    engine: LlamaCppBackend, starts: list[int], gens: list[list[int]], batch: BatchReplay
) -> float:
    """Seconds of the decode steps of ``batch`` (:class:`BatchReplay`: sequence ``s``'s
    t-th step is the batch's t-th), run on ``engine`` after prompts of ``starts[s]``
    tokens in sequences 0, 1, ...: each step feeds every running sequence's tokens (its
    output's own ids) with logits read for every row, keeps 1 + the accepted ones per
    sequence and drops the rest's K/V, as the backend's loop does. Leaves the prompts'
    K/V."""
    llama = engine._llama
    mem = llama.llama_get_memory(engine._ctx)
    reps = batch.replays
    pos = list(starts)
    t0 = time.perf_counter()
    for t, rows in enumerate(batch.step_rows):
        items: list[tuple[int, int, int, bool]] = []
        running = [(s, r) for s, r in enumerate(reps) if t < len(r.step_tokens)]
        for s, r in running:
            done = pos[s] - starts[s]
            items += [
                (gens[s][min(done + i, len(gens[s]) - 1)], pos[s] + i, s, True)
                for i in range(r.step_tokens[t])
            ]
        if len(items) != rows:
            raise RuntimeError(f"step {t}: {len(items)} rows, the replay says {rows}")
        engine._decode_batch(items)
        for i in range(len(items)):
            engine._logits_row(i)
        for s, r in running:
            size, kept = r.step_tokens[t], r.step_accepted[t]
            pos[s] += 1 + kept
            if kept + 1 < size and not llama.llama_memory_seq_rm(mem, s, pos[s], -1):
                raise RuntimeError("could not drop the rejected tokens' K/V")
    dt = time.perf_counter() - t0
    for s, start in enumerate(starts):
        if not llama.llama_memory_seq_rm(mem, s, start, -1):
            raise RuntimeError("could not drop the reports' K/V")
    return dt


def timed_batches(
    gguf: Path,
    items: list[tuple[list[int], list[int]]],
    batches: dict[tuple[int, str], list[BatchReplay]],
    args: argparse.Namespace,
    *,
    batch: int,
) -> tuple[dict[tuple[int, str], float], range]:
    """Decode seconds of the groups of ``batch`` reports that hold the ``--timed`` reports
    from the ``--warm``-th on, summed per setting and for plain (batched) decoding (key
    ``(0, "plain")``), on a full-size engine holding ``batch`` sequences: each group's
    prompts prefilled once, its settings run in turn, each group starting the turn at the
    next setting (the host's drift spreads over all). Returns the sums and the groups
    timed. Part 4 times batches of one, part 5 of ``--batch``."""
    b = batch
    groups = range(args.warm // b, min((args.warm + args.timed - 1) // b + 1, len(items) // b))
    engine = LlamaCppBackend(gguf, threads=args.threads, max_batch=b)
    engine.load()
    total: dict[tuple[int, str], float] = {(0, "plain"): 0.0, **{key: 0.0 for key in batches}}
    try:
        for g in groups:
            engine.clear_cache()
            group = items[g * b : (g + 1) * b]
            for s, (prompt, _) in enumerate(group):
                n = len(prompt)
                for lo in range(0, n, engine.n_batch):
                    chunk = prompt[lo : lo + engine.n_batch]
                    engine._decode_batch(
                        [(t, lo + i, s, lo + i == n - 1) for i, t in enumerate(chunk)]
                    )
            starts = [len(p) for p, _ in group]
            gens = [gen for _, gen in group]
            any_batch = next(iter(batches.values()))[g]
            plain = BatchReplay(
                replays=[
                    Replay(step_tokens=[1] * r.plain_steps, step_accepted=[0] * r.plain_steps)
                    for r in any_batch.replays
                ],
                step_rows=any_batch.plain_step_rows,
            )
            runs = [((0, "plain"), plain), *((key, reps[g]) for key, reps in batches.items())]
            shift = (g - groups.start) % len(runs)
            for key, rep in runs[shift:] + runs[:shift]:
                total[key] += timed_batch_steps(engine, starts, gens, rep)
    finally:
        engine.close()
    return total, groups


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--gguf", type=Path, default=None, help="re-use this file (same --quant)")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--report-tokens", type=int, default=150)
    ap.add_argument("--speculative", default="4", help="proposal counts to run, e.g. 2,4,6")
    ap.add_argument("--rounds", type=int, default=5, help="step-cost rounds")
    ap.add_argument(
        "--report-rounds", type=int, default=2, help="reports per case (0: skip part 2)"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--hf-bf16", action="store_true", help="add the transformers bf16 report")
    ap.add_argument(
        "--reports",
        type=Path,
        default=None,
        help="replay these reports (JSON Lines or CSV with --fields columns, or one a line)",
    )
    ap.add_argument("--fields", default="findings,impression", help="columns joined into a report")
    ap.add_argument("--memory", type=int, default=256, help="reports the drafter remembers")
    ap.add_argument("--warm", type=int, default=32, help="reports before the 'later' figures")
    ap.add_argument("--replay-only", action="store_true", help="part 4 alone, no model")
    ap.add_argument(
        "--timed", type=int, default=4, help="replayed reports also decoded on the engine"
    )
    ap.add_argument(
        "--step-costs",
        default=None,
        help="with --replay-only: relative cost of a step of 1, 2, ... tokens, e.g. 1,1.3,1.65",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=0,
        help="also replay the reports in batches of this many decoded together (part 5)",
    )
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    specs = sorted({int(x) for x in args.speculative.split(",") if x.strip()})
    if not specs or min(specs) < 1 or max(specs) > 16:
        ap.error("--speculative: proposal counts in 1..16")
    if args.replay_only and args.reports is None:
        ap.error("--replay-only needs --reports")
    if args.batch < 0 or args.batch == 1 or (args.batch and args.reports is None):
        ap.error("--batch: 2 or more, with --reports")
    reports = (
        load_reports(args.reports, [f.strip() for f in args.fields.split(",") if f.strip()])
        if args.reports
        else []
    )
    if args.reports and not reports:
        ap.error(f"--reports: no report text in {args.reports}")

    from models.gguf_convert import build_gguf_vocab
    from models.text import LLMCXRTokenizer

    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-speculative-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = bench_cpu_engine.tokenizer_dir(out_dir / "tokenizer")
    tok = LLMCXRTokenizer.from_dir(tok_dir)
    if args.replay_only:
        rel = [float(x) for x in args.step_costs.split(",")] if args.step_costs else None
        items = report_outputs(tok, reports)
        replays = replay_all(items, specs, args, rel)
        print_replays(
            args, replays, None if rel is None else dict(enumerate(rel, 1)), None, None, {}
        )
        if args.batch and rel is not None:
            print_batches(args, batch_replays(items, specs, args, rel), rel)
        return
    gguf = args.gguf or out_dir / f"dolly-{args.layers}l-{args.quant}.gguf"
    vocab = build_gguf_vocab(tok_dir / "tokenizer.json")
    bench_cpu_engine.write_random_gguf(
        gguf, bench_cpu_engine.dolly_shape(args.layers), args.quant, vocab, threads=args.threads
    )
    ids = bench_cpu_engine.prompt_ids(tok, args.prompt_tokens)

    sizes = list(range(1, max(max(specs) + 1, args.batch * (max(specs) + 1)) + 1))
    costs = step_costs(
        LlamaCppBackend(gguf, threads=args.threads, max_batch=1), ids, sizes, args.rounds
    )
    rows = report_rows(gguf, ids, args, specs) if args.report_rounds else []
    hf = hf_bf16_report(args, ids, tok) if args.hf_bf16 else None
    rel = [costs[n] / costs[1] for n in sizes]
    items = report_outputs(tok, reports)
    replays = replay_all(items, specs, args, rel) if reports else {}
    timed = timed_replays(gguf, items, replays, args) if replays and args.timed else {}

    t1 = costs[1]
    print(
        f"\nmodel: dolly-v2-3b shape, {args.layers} layers, {args.quant}, random weights; "
        f"prompt {len(ids)} tokens; threads {args.threads}; llama-cpp-python "
        f"{__import__('llama_cpp').__version__}"
    )
    print(
        "\n1. One decode step of n tokens (logits for each) after the prompt, least of "
        f"{args.rounds}"
    )
    head = "".join(f"  a={a:.1f}" for a in ACCEPTANCE)
    print("   (columns a=: decode speed-up with n-1 proposals at that per-token acceptance)")
    print(f"{'n':>3} {'ms':>8} {'x n=1':>6}{head}")
    for n in sizes:
        gains = "".join(f"  {expected_tokens(a, n - 1) * t1 / costs[n]:5.2f}" for a in ACCEPTANCE)
        print(f"{n:>3} {costs[n] * 1e3:8.1f} {costs[n] / t1:6.2f}{gains}")

    if rows:
        print(
            f"\n2. Reports of {args.report_tokens} new tokens, greedy, medians of "
            f"{args.report_rounds} (ratios against plain decoding in this run)"
        )
        print(
            f"{'proposals':>9} {'case':17} {'prefill s':>9} {'decode s':>8} {'dec t/s':>8} "
            f"{'tok/step':>8} {'accept':>6} {'=plain':>6} {'dec x plain':>11} {'report s':>8}"
            + ("  x hf bf16" if hf else "")
        )
        base = {r["case"]: r for r in rows if r["speculative"] == 0}
        for r in rows:
            rep_s = r["prefill_s"] + r["decode_s"]
            gain = r["decode_tok_s"] / base[r["case"]]["decode_tok_s"]
            line = (
                f"{r['speculative']:>9} {r['case']:17} {r['prefill_s']:9.2f} {r['decode_s']:8.2f} "
                f"{r['decode_tok_s']:8.2f} {r['tokens_per_step']:8.2f} {r['acceptance']:6.2f} "
                f"{r['same_as_plain']:6.2f} {gain:11.2f} {rep_s:8.2f}"
            )
            if hf:
                line += f"  {(hf['prefill_s'] + hf['decode_s']) / rep_s:9.2f}"
            print(line)
        if hf:
            print(
                f"transformers bf16, new study: prefill {hf['prefill_s']:.2f} s, decode "
                f"{hf['decode_s']:.2f} s, report {hf['prefill_s'] + hf['decode_s']:.2f} s"
            )
        print(
            "'=plain': share of each report's tokens, from the first, equal to plain greedy's "
            "(the least over the runs). 'accept' and the new-study rows are random weights' "
            "figures, not a trained model's."
        )
    plain_new = next((r for r in rows if r["speculative"] == 0 and r["case"] == "new study"), None)
    summaries = print_replays(args, replays, costs, plain_new, hf, timed)
    batches: dict[str, dict[str, float]] = {}
    if args.batch:
        groups = batch_replays(items, specs, args, rel)
        timed_b = timed_batches(gguf, items, groups, args, batch=args.batch) if args.timed else None
        batches = print_batches(args, groups, rel, timed_b)
    if args.json_out:
        for r in rows:
            r.pop("tokens", None)
        args.json_out.write_text(
            json.dumps(
                {
                    "step_s": costs,
                    "reports": rows,
                    "hf_bf16": hf,
                    "prompt_tokens": len(ids),
                    "replay": summaries,
                    "batch_replay": batches,
                },
                indent=1,
            )
        )


def print_table(table: list[list[tuple[str, str]]]) -> None:
    """Rows of ``(column, cell)`` pairs under a header of the first row's column names."""
    print(" ".join(f"{name:>{len(cell)}}" for name, cell in table[0]))
    for cells in table:
        print(" ".join(cell for _, cell in cells))


def replay_all(
    items: list[tuple[list[int], list[int]]],
    specs: list[int],
    args: argparse.Namespace,
    rel: list[float] | None,
) -> dict[tuple[int, str], list[Replay]]:
    """Part 4's replays per proposal count: proposals as long as n-grams match ("fixed")
    and, given relative step costs, sized by them ("costs", what the backend does)."""
    out: dict[tuple[int, str], list[Replay]] = {}
    for k in specs:
        for sizing, sc in (("fixed", None), ("costs", rel)):
            if sizing == "costs" and rel is None:
                continue
            out[(k, sizing)] = replay_corpus(
                items, k, max_new=args.report_tokens, memory=args.memory, step_costs=sc
            )
    return out


def print_replays(
    args: argparse.Namespace,
    replays: dict[tuple[int, str], list[Replay]],
    costs: dict[int, float] | None,
    plain: dict[str, Any] | None,
    hf: dict[str, float] | None,
    timed: dict[tuple[int, str], float],
) -> dict[str, dict[str, dict[str, float]]]:
    """Part 4's table; with step costs, the decode speed-up they give for the replayed
    steps, and (with part 2's plain row) the report seconds at that speed-up."""
    if not replays:
        return {}
    n = len(next(iter(replays.values())))
    print(
        f"\n4. {n} reports of {args.reports} ({args.fields}) replayed as greedy outputs "
        f"(max_new {args.report_tokens}, memory {args.memory} reports), in order; "
        f"'later': after the first {args.warm}"
    )
    # priced as the drafter prices steps (extrapolated past the measured sizes)
    cost = (
        None
        if costs is None
        else NgramDrafter(step_costs=[costs[n] / costs[1] for n in sorted(costs)]).step_cost
    )
    table: list[list[tuple[str, str]]] = []  # per row: (column, cell)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (k, sizing), reps in replays.items():
        every, later = replay_summary(reps, cost), replay_summary(reps[args.warm :], cost)
        out[f"{k} {sizing}"] = {"all": every, "later": later}
        cells = [
            ("proposals", f"{k:>9}"),
            ("sizing", f"{sizing:>6}"),
            ("reports", f"{int(every['reports']):>7}"),
            ("tok/report", f"{every['new_tokens']:10.1f}"),
            ("tok/step", f"{every['tokens_per_step']:8.2f}"),
            ("accept", f"{every['acceptance']:6.2f}"),
        ]
        if costs:
            cells.append(("dec x plain", f"{every['decode_x_plain']:11.2f}"))
        cells += [
            ("later tok/step", f"{later['tokens_per_step']:14.2f}"),
            ("later accept", f"{later['acceptance']:12.2f}"),
        ]
        if costs:
            cells.append(("later dec x", f"{later['decode_x_plain']:11.2f}"))
        if costs and plain:
            # a report of --report-tokens at plain decoding's measured rate, sped up
            rep_s = plain["prefill_s"] + plain["decode_s"] / every["decode_x_plain"]
            cells.append(("report s", f"{rep_s:8.2f}"))
            if hf:
                cells.append(("x hf bf16", f"{(hf['prefill_s'] + hf['decode_s']) / rep_s:9.2f}"))
        if timed:
            out[f"{k} {sizing}"]["timed"] = {"decode_s": timed[(k, sizing)]}
            cells.append(("timed dec x", f"{timed[(0, 'plain')] / timed[(k, sizing)]:11.2f}"))
        table.append(cells)
    print_table(table)
    print(
        "'sizing': fixed, proposals as long as n-grams match; costs, as long as the step "
        "costs make pay (the backend's way, with the costs it measures when it loads)."
    )
    if costs:
        print(
            "'dec x plain': plain steps x T(1) over the replayed steps' summed T(n), with T "
            "from part 1 (or --step-costs); 'report s': part 2's plain new-study prefill "
            "plus its decode divided by that speed-up."
        )
    if timed:
        print(
            f"'timed dec x': reports {args.warm}-{args.warm + args.timed - 1} decoded on the "
            "full-size engine step by step as replayed (plain: "
            f"{timed[(0, 'plain')]:.2f} s), plain seconds over the setting's."
        )
    print(
        "These are the steps for these texts as outputs: a model that writes them (greedy) "
        "would take them; a model that writes otherwise keeps a different share."
    )
    return out


def batch_replays(
    items: list[tuple[list[int], list[int]]],
    specs: list[int],
    args: argparse.Namespace,
    rel: list[float],
) -> dict[tuple[int, str], list[BatchReplay]]:
    """Part 5: the reports in consecutive groups of ``--batch``, each group decoded as one
    batch (``speculative.replay_batch``), remembered in order as the node does. "joint":
    the step's proposals sized together, with the step costs the backend measures (up to
    9 tokens, or the longest step); "alone": each sequence's sized as if decoded alone,
    with costs up to k+1 tokens (the backend before joint sizing)."""
    out: dict[tuple[int, str], list[BatchReplay]] = {}
    for k in specs:
        for mode in ("alone", "joint"):
            n = k + 1 if mode == "alone" else max(k + 1, min(args.batch * (k + 1), 9))
            drafter = NgramDrafter(
                max_tokens=k, memory=args.memory, max_id=IMAGE_TOKEN_OFFSET, step_costs=rel[:n]
            )
            out[(k, mode)] = replay_batches(
                drafter,
                items,
                batch=args.batch,
                max_new=args.report_tokens,
                joint=mode == "joint",
            )
    return out


def print_batches(
    args: argparse.Namespace,
    batches: dict[tuple[int, str], list[BatchReplay]],
    rel: list[float],
    timed: tuple[dict[tuple[int, str], float], range] | None = None,
) -> dict[str, dict[str, float]]:
    """Part 5's table: per setting, tokens per step of the batch, the share of proposals
    kept, and the decode speed-up over plain batched decoding that the step costs give
    (each step of n tokens priced at part 1's T(n), measured up to the longest step; past
    the given costs, extrapolated as the drafter does), and with ``timed``
    (:func:`timed_batches`) the speed-up measured on the engine."""
    cost = NgramDrafter(step_costs=rel).step_cost

    print(
        f"\n5. The same reports in batches of {args.batch} decoded together (max_new "
        f"{args.report_tokens}), in order; step costs up to {len(rel)} tokens from part 1"
    )
    table: list[list[tuple[str, str]]] = []
    out: dict[str, dict[str, float]] = {}
    for (k, mode), groups in batches.items():
        fig = batch_replay_summary(groups, cost)
        row = [
            ("proposals", f"{k:>9}"),
            ("sizing", f"{mode:>6}"),
            ("tok/step", f"{fig['tokens_per_step']:8.2f}"),
            ("rows/step", f"{fig['rows_per_step']:9.2f}"),
            ("max rows", f"{int(fig['max_rows']):>8}"),
            ("accept", f"{fig['acceptance']:6.2f}"),
            ("dec x plain batch", f"{fig['decode_x_plain']:17.2f}"),
        ]
        if timed is not None:
            fig["timed_decode_x_plain"] = timed[0][(0, "plain")] / timed[0][(k, mode)]
            row.append(("timed dec x", f"{fig['timed_decode_x_plain']:11.2f}"))
        out[f"{k} {mode}"] = fig
        table.append(row)
    print_table(table)
    print(
        "'tok/step': tokens generated (all sequences) per step of the batch; 'rows/step': "
        "tokens fed per step; 'dec x plain batch': plain batched decoding's steps priced "
        "by T(running sequences) over these steps' T(rows)."
    )
    if timed is not None:
        sums, groups = timed
        b = args.batch
        print(
            f"'timed dec x': groups {groups.start}-{groups.stop - 1} (reports "
            f"{groups.start * b}-{groups.stop * b - 1}) decoded batch step by batch step as "
            f"replayed on part 1's engine (plain batched: {sums[(0, 'plain')]:.2f} s), "
            "plain seconds over the setting's."
        )
    return out


if __name__ == "__main__":
    main()
