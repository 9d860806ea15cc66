"""Draft tokens for speculative greedy decoding by n-gram counts (no draft model).

Decoding one token reads every weight of the model, and on a CPU that read sets most of
the speed. Checking *k* proposed tokens in one forward pass reads the weights once, so
every proposal the model agrees with is a token gained for less than the cost of a step
(how much less depends on the cores' arithmetic: docs/cpu-engine.md, "Decode steps of
several tokens"). A greedy answer is unchanged by speculation: a proposal is kept only
where it equals the model's own argmax, and the first disagreement is replaced by that
argmax (Leviathan et al., "Fast Inference from Transformers via Speculative Decoding",
ICML 2023; the draft-free n-gram variant is "prompt lookup decoding", Saxena 2023).

Where the proposals come from: radiology reports repeat their phrasing, within a report
and from one study to the next ("No pleural effusion or pneumothorax. The cardiomediastinal
silhouette is normal."). :class:`NgramDrafter` counts which token followed each n-gram
(1 to 6 tokens) in the sequence itself and in the token ids of the reports it generated
last, and proposes, token by token, the most frequent follower of the longest n-gram of the
text so far that it has seen (the latest at equal counts). The share of that follower
among all seen is its estimated chance to be right; with the measured cost of a step of
*n* tokens (``step_costs``) the drafter proposes only as many tokens as lower the expected
time per token (SuffixDecoding, Oliaro et al. 2024, chooses its speculation length
likewise). The remembered reports are token ids in memory only, never written or logged.

:func:`replay` counts the steps of a greedy output already known (a stored draft, a report
text), which measures a drafter on real report text without a model
(``benchmarks/bench_speculative.py --reports``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from models.layout import CODES_PER_IMAGE, END_ID, EOS_ID
from models.prompts import report_prompt

if TYPE_CHECKING:
    from models.text import LLMCXRTokenizer

__all__ = [
    "BatchReplay",
    "NgramDrafter",
    "Replay",
    "SequenceIndex",
    "batch_replay_summary",
    "pass_cost",
    "replay",
    "replay_batch",
    "replay_batches",
    "replay_reports",
    "replay_summary",
    "report_outputs",
]

# key (the n ids before a position) -> follower id -> [count, latest serial]
_Counts = dict[tuple[int, ...], dict[int, list[int]]]
# the sequence's own occurrences are newer than any remembered report's
_OWN = 1 << 62


def pass_cost(rows: Sequence[int], step_cost: Callable[[int], float]) -> float:
    """Cost of a decode step in which each sequence feeds ``rows[i]`` tokens.

    With a KV stream per sequence, llama.cpp runs such a step as passes over the weights
    that each hold as many rows of every sequence taking part
    (``llama_batch_allocr::split_equal``): first as many rows of each as the shortest has,
    then of the sequences with rows left, and so on. Rows 2, 1, 1, 1 are a pass of 4 rows
    and a pass of 1; one sequence's n rows, or n rows of each, are one pass. Each pass of
    m rows costs ``step_cost(m)``. (It assumes the sequences' slots are consecutive, as
    the llama.cpp backend arranges when they feed as many rows: a lower bound otherwise.)
    """
    left = sorted(r for r in rows if r > 0)
    cost, done = 0.0, 0
    for i, r in enumerate(left):
        if r > done:
            cost += step_cost((len(left) - i) * (r - done))
            done = r
    return cost


def _count(counts: _Counts, tokens: Sequence[int], end: int, sizes: range, serial: int) -> None:
    """Count ``tokens[end]`` as the follower of each n-gram ending just before it."""
    t = tokens[end]
    for n in sizes:
        if end - n < 0:
            break
        nxt = counts.setdefault(tuple(tokens[end - n : end]), {})
        e = nxt.get(t)
        if e is None:
            nxt[t] = [1, serial]
        else:
            e[0] += 1
            e[1] = serial


def _uncount(counts: _Counts, tokens: Sequence[int], end: int, sizes: range) -> None:
    """Undo :func:`_count` (the latest serial stays: it only breaks ties)."""
    t = tokens[end]
    for n in sizes:
        if end - n < 0:
            break
        key = tuple(tokens[end - n : end])
        nxt = counts[key]
        nxt[t][0] -= 1
        if nxt[t][0] == 0:
            del nxt[t]
            if not nxt:
                del counts[key]


class SequenceIndex:
    """The n-gram counts of one growing token list (a prompt and the tokens after it)."""

    def __init__(self, tokens: Sequence[int], sizes: range) -> None:
        self.tokens: list[int] = []
        self._sizes = sizes
        self.counts: _Counts = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` and count them as followers of the n-grams before them."""
        for t in tokens:
            self.tokens.append(int(t))
            end = len(self.tokens) - 1
            _count(self.counts, self.tokens, end, self._sizes, _OWN + end)


class NgramDrafter:
    """Proposes the next tokens of a greedy text generation from n-gram counts.

    Parameters
    ----------
    max_tokens
        Most tokens proposed per step.
    ngram
        ``(shortest, longest)`` n-gram counted; the longest one seen decides each token.
    memory
        How many finished generations are remembered (oldest forgotten first).
    context
        How many tokens before a remembered generation (the end of its prompt) are kept
        with it, so that the first tokens of the next report can be proposed.
    max_id
        Proposals end before the first id at or above this (``None``: no bound). Text
        generation never emits an image id, so a proposal holding one could not be kept.
    step_costs
        Relative seconds of a decode step of 1, 2, ... tokens (the first 1.0; longer steps
        are extrapolated from the last two, :meth:`step_cost`). With them a proposal is as
        long as minimises the expected seconds per token, and the proposals of sequences
        decoded together are sized together (:meth:`plan`); ``None`` proposes up to
        ``max_tokens`` while n-grams match.
    smoothing
        The chance of the most frequent follower of an n-gram is estimated as its count
        over (all followers' count + ``smoothing`` / n): a follower seen once after a
        short n-gram is trusted less than one seen once after a long one.
    """

    def __init__(
        self,
        *,
        max_tokens: int = 4,
        ngram: tuple[int, int] = (1, 6),
        memory: int = 256,
        context: int = 8,
        max_id: int | None = None,
        step_costs: Sequence[float] | None = None,
        smoothing: float = 3.0,
    ) -> None:
        lo, hi = ngram
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 1 <= lo <= hi:
            raise ValueError(f"ngram must be 1 <= shortest <= longest, got {ngram}")
        if memory < 0 or context < 0 or smoothing < 0:
            raise ValueError("memory, context and smoothing must be >= 0")
        self.max_tokens = max_tokens
        self.sizes = range(lo, hi + 1)
        self.memory = memory
        self.context = context
        self.max_id = max_id
        self.smoothing = smoothing
        self.step_costs = step_costs
        self._docs: OrderedDict[int, list[int]] = OrderedDict()
        self._serial = 0
        self._counts: _Counts = {}

    @property
    def step_costs(self) -> list[float] | None:
        """Relative cost of a step of 1, 2, ... tokens (``None``: not used)."""
        return self._step_costs

    @step_costs.setter
    def step_costs(self, costs: Sequence[float] | None) -> None:
        if costs is not None:
            costs = [float(c) for c in costs]
            if not costs or costs[0] != 1.0 or any(c <= 0 for c in costs):
                raise ValueError(f"step_costs must start with 1.0 and be positive: {costs}")
        self._step_costs = costs

    def __len__(self) -> int:
        return len(self._docs)

    def sequence(self, prompt: Sequence[int]) -> SequenceIndex:
        """A fresh index of one sequence, starting with its prompt."""
        return SequenceIndex(prompt, self.sizes)

    def remember(self, prompt: Sequence[int], generated: Sequence[int]) -> None:
        """Keep a finished generation (with the last ``context`` prompt ids) for lookups."""
        if self.memory == 0 or not generated:
            return
        doc = [int(t) for t in prompt[len(prompt) - min(self.context, len(prompt)) :]]
        doc += [int(t) for t in generated]
        self._docs[self._serial] = doc
        for end in range(1, len(doc)):
            _count(self._counts, doc, end, self.sizes, self._serial)
        self._serial += 1
        while len(self._docs) > self.memory:
            _, old = self._docs.popitem(last=False)
            for end in range(1, len(old)):
                _uncount(self._counts, old, end, self.sizes)

    def forget(self) -> None:
        """Drop every remembered generation."""
        self._docs.clear()
        self._counts = {}

    def _follower(self, seq: SequenceIndex, ctx: list[int]) -> tuple[int | None, float]:
        """The most frequent follower of the longest n-gram ending ``ctx`` that was seen
        (in the sequence or the memory; the latest at equal counts) and its estimated
        chance."""
        for n in reversed(self.sizes):
            if n > len(ctx):
                continue
            key = tuple(ctx[-n:])
            own, mem = seq.counts.get(key), self._counts.get(key)
            if not own and not mem:
                continue
            merged: dict[int, list[int]] = {t: list(e) for t, e in (mem or {}).items()}
            for t, (c, last) in (own or {}).items():
                e = merged.setdefault(t, [0, last])
                e[0] += c
                e[1] = max(e[1], last)
            t, (c, _) = max(merged.items(), key=lambda kv: (kv[1][0], kv[1][1]))
            total = sum(e[0] for e in merged.values())
            return t, c / (total + self.smoothing / n)
        return None, 0.0

    def step_cost(self, rows: int) -> float:
        """Relative cost of a decode step of ``rows`` tokens (``step_costs``; past the last
        measured size, the last two's difference per further row, so a longer step never
        looks free)."""
        costs = self._step_costs
        if costs is None:
            raise ValueError("no step_costs")
        if rows <= len(costs):
            return costs[max(rows, 1) - 1]
        slope = costs[-1] - costs[-2] if len(costs) > 1 else 0.0
        return costs[-1] + (rows - len(costs)) * max(slope, 0.0)

    def _chain(self, seq: SequenceIndex, k: int) -> list[tuple[int, float]]:
        """Up to ``k`` proposed ids after ``seq.tokens``, each with the estimated chance
        that it and all before it are kept."""
        ctx = seq.tokens[-self.sizes.stop :]
        out: list[tuple[int, float]] = []
        chance = 1.0
        for _ in range(max(k, 0)):
            t, p = self._follower(seq, ctx)
            if t is None or (self.max_id is not None and t >= self.max_id):
                break
            chance *= p
            out.append((t, chance))
            ctx.append(t)
        return out

    def propose(self, seq: SequenceIndex, limit: int | None = None) -> list[int]:
        """Up to ``limit`` (default ``max_tokens``) ids likely to follow ``seq.tokens``.

        Each id is the most likely follower of the text so far with the ids before it;
        the proposal ends where nothing was seen, at an id of ``max_id`` or above, or
        (with ``step_costs``) where a longer step would cost more per expected token.
        The proposals of one sequence decoded alone: :meth:`plan` with it only.
        """
        return self.plan([(seq, limit)])[0]

    def plan(
        self, seqs: Sequence[tuple[SequenceIndex, int | None]], other_rows: int = 0
    ) -> list[list[int]]:
        """Proposals for sequences decoded together in one step, sized together.

        A step of several sequences feeds each one's latest token and its proposals, so
        every proposal makes the whole step longer, and sequences feeding unequal numbers
        of rows take several passes over the weights (:func:`pass_cost`). With
        ``step_costs``, the proposals are taken in order of their estimated chance to be
        kept, across the sequences, for as long as that lowers the step's expected seconds
        per token; alone, a sequence gets what :meth:`propose` gives. Without
        ``step_costs`` each sequence proposes up to its limit while n-grams match.

        Parameters
        ----------
        seqs
            Each sequence's index and its limit (``None``: ``max_tokens``; never more).
        other_rows
            Tokens in the same step that propose nothing (sampled or image sequences).

        Returns
        -------
        list of list of int
            The proposals of each sequence, in order.
        """
        chains = [
            self._chain(seq, self.max_tokens if lim is None else min(lim, self.max_tokens))
            for seq, lim in seqs
        ]
        if self._step_costs is None:
            return [[t for t, _ in chain] for chain in chains]
        # a chain's chances fall along it, so taking the likeliest first (at equal chance
        # the nearer one, then the earlier sequence) keeps each sequence's proposals a
        # prefix of its chain
        order = sorted(
            ((c, i, j) for i, chain in enumerate(chains) for j, (_, c) in enumerate(chain)),
            key=lambda x: (-x[0], x[2], x[1]),
        )
        # each sequence's rows in the step; those of other_rows propose nothing
        rows = [1] * (len(seqs) + other_rows)
        expected = float(len(rows))  # every row's own token is a sure one
        best, best_rate = 0, pass_cost(rows, self.step_cost) / max(expected, 1.0)
        for n, (c, i, _) in enumerate(order, 1):
            expected += c
            rows[i] += 1
            rate = pass_cost(rows, self.step_cost) / expected
            if rate < best_rate:
                best, best_rate = n, rate
        take = [0] * len(chains)
        for _, i, _ in order[:best]:
            take[i] += 1
        return [[t for t, _ in chain[:n]] for chain, n in zip(chains, take, strict=True)]


@dataclass
class Replay:
    """The decode steps a speculative greedy generation takes (:func:`replay`).

    Attributes
    ----------
    new_tokens
        Tokens generated (without the stop id).
    plain_steps
        Decode steps of plain greedy decoding, one per token after the prefill's: as many
        as ``new_tokens`` when the output ended on a stop id, one fewer at ``max_new``.
    step_tokens
        Tokens fed to each decode step: the latest token and the proposals checked with it.
    step_accepted
        Proposals kept in each step (the sequence advances by 1 + this).
    """

    new_tokens: int = 0
    plain_steps: int = 0
    step_tokens: list[int] = field(default_factory=list)
    step_accepted: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Decode steps after the prefill."""
        return len(self.step_tokens)

    @property
    def proposed(self) -> int:
        """Proposals checked (each step feeds its latest token and these)."""
        return sum(self.step_tokens) - self.steps

    @property
    def accepted(self) -> int:
        """Proposals equal to the model's own choice (kept)."""
        return sum(self.step_accepted)


class _Walk:
    """One sequence of a replay: where the known output stands, and its steps so far."""

    def __init__(
        self,
        drafter: NgramDrafter,
        prompt: Sequence[int],
        generated: Sequence[int],
        stop_ids: Collection[int],
        max_new: int | None,
    ) -> None:
        gen = [int(t) for t in generated]
        stop = next((i for i, t in enumerate(gen) if t in stop_ids), None)
        end = len(gen) if stop is None else stop
        if max_new is None:
            max_new = end if stop is None else end + 1
        if max_new < 1 or (stop is None and end < max_new):
            raise ValueError(
                f"generated ({len(gen)} ids) must hold a stop id or max_new ({max_new}) ids"
            )
        self.prompt = [int(t) for t in prompt]
        self.limit = max_new
        self.stop_ids = stop_ids
        # what the model emits: up to max_new ids, then the stop id if it comes first
        self.gen = gen[: min(end, max_new) + (stop is not None and end < max_new)]
        self.rep = Replay()
        self.rep.new_tokens = min(end, max_new)
        self.rep.plain_steps = self.rep.new_tokens if end < max_new else self.rep.new_tokens - 1
        self.seq = drafter.sequence(prompt)
        self.i = 0  # next position of gen the model emits
        self.done = False

    def start_step(self) -> bool:
        """Emit the model's next token (the prefill's or the last step's); whether the
        sequence goes on, feeding it to the next step."""
        if self.gen[self.i] in self.stop_ids:
            self.done = True
            return False
        self.i += 1
        if self.i >= self.limit:
            self.done = True
            return False
        self.seq.extend(self.gen[self.i - 1 : self.i])
        return True

    def finish_step(self, drafts: Sequence[int]) -> None:
        """Keep the proposals equal to the output, up to the first other one."""
        self.rep.step_tokens.append(1 + len(drafts))
        kept = 0
        for d in drafts:
            if self.gen[self.i] != d or d in self.stop_ids:
                self.done = d in self.stop_ids and self.gen[self.i] == d
                break
            self.i += 1
            kept += 1
            self.seq.extend([d])
            if self.i >= self.limit:
                self.done = True
                break
        self.rep.step_accepted.append(kept)


@dataclass
class BatchReplay:
    """The decode steps of greedy generations decoded together (:func:`replay_batch`).

    Attributes
    ----------
    replays
        Each sequence's own steps (:class:`Replay`), in the order given.
    step_rows
        Tokens fed to each step of the batch: every running sequence's latest token and
        its proposals.
    """

    replays: list[Replay]
    step_rows: list[int]

    @property
    def plain_step_rows(self) -> list[int]:
        """Tokens fed to each step of plain batched decoding (the running sequences)."""
        plain = [r.plain_steps for r in self.replays]
        return [sum(p > t for p in plain) for t in range(max(plain, default=0))]


def replay_batch(
    drafter: NgramDrafter,
    items: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    stop_ids: Collection[int],
    max_new: int | Sequence[int | None] | None = None,
    remember: bool = True,
    joint: bool = True,
) -> BatchReplay:
    """Count the decode steps of greedy generations, decoded in one batch, whose outputs
    are already known.

    As :func:`replay`, for the ``(prompt, generated)`` items started together as one
    batch of the llama.cpp backend: each step feeds every running sequence's latest token
    and the proposals :meth:`NgramDrafter.plan` sizes for all of them together; a sequence
    leaves the batch when it ends. With ``remember``, the generations are added to
    ``drafter``'s memory afterwards, in order, as the backend does.

    Parameters
    ----------
    drafter, stop_ids, remember
        As for :func:`replay`.
    items
        Each sequence's prompt ids and output ids (as ``generated`` for :func:`replay`).
    max_new
        The requests' ``max_new_tokens``: one for all, or one per item.
    joint
        Size the step's proposals together, as the backend does; ``False`` sizes each
        sequence's as if it were decoded alone (for comparison).

    Returns
    -------
    BatchReplay
        Each sequence's steps, and the tokens fed to each step of the batch.

    Raises
    ------
    ValueError
        As for :func:`replay`, or if ``max_new`` does not give one bound per item.
    """
    bounds = list(max_new) if isinstance(max_new, Sequence) else [max_new] * len(items)
    if len(bounds) != len(items):
        raise ValueError(f"max_new: {len(bounds)} bounds for {len(items)} items")
    walks = [
        _Walk(drafter, prompt, gen, stop_ids, bound)
        for (prompt, gen), bound in zip(items, bounds, strict=True)
    ]
    step_rows: list[int] = []
    active = walks
    while active:
        stepping = [w for w in active if w.start_step()]
        if not stepping:
            break
        if joint:
            drafts = drafter.plan([(w.seq, w.limit - w.i) for w in stepping])
        else:
            drafts = [drafter.propose(w.seq, w.limit - w.i) for w in stepping]
        step_rows.append(sum(1 + len(d) for d in drafts))
        for w, d in zip(stepping, drafts, strict=True):
            w.finish_step(d)
        active = [w for w in stepping if not w.done]
    if remember:
        for w in walks:
            drafter.remember(w.prompt, w.gen)
    return BatchReplay([w.rep for w in walks], step_rows)


def replay(
    drafter: NgramDrafter,
    prompt: Sequence[int],
    generated: Sequence[int],
    *,
    stop_ids: Collection[int],
    max_new: int | None = None,
    remember: bool = True,
) -> Replay:
    """Count the decode steps of a greedy generation whose output is already known.

    A greedy output does not depend on speculation, so given it (a stored draft, or a
    report standing in for what a trained model would write) the proposals, which of them
    the model keeps, and so the steps and their sizes follow without running the model.
    This walks the llama.cpp backend's decode loop (``LlamaCppBackend._run_seqs``): the
    first token comes from the prefill; each step feeds the latest token and up to
    ``drafter.max_tokens`` proposals (never past ``max_new``); the proposals equal to the
    output are kept, up to the first other one or a stop id, whose place the model's own
    token takes in the next step. A site can so measure its own acceptance on its reports
    before turning speculation on (``benchmarks/bench_speculative.py --reports``).

    Parameters
    ----------
    drafter
        Its memory is used, and (``remember``) the generation added to it afterwards, as
        the backend does; replaying reports in order reproduces a node's memory.
    prompt
        The prompt ids.
    generated
        The output ids, followed by the stop id when the generation ended on one; ids after
        the first stop id or past ``max_new`` are ignored.
    stop_ids
        Ids that end a generation (``### End``, end of text).
    max_new
        The request's ``max_new_tokens``; by default the output did not reach it (the whole
        of ``generated`` up to its stop id, or all of it when it holds none).
    remember
        Add the generation to ``drafter``'s memory afterwards, as the backend does.

    Returns
    -------
    Replay
        Steps, tokens fed per step, proposals checked and kept.

    Raises
    ------
    ValueError
        If ``generated`` holds neither a stop id nor ``max_new`` ids, or ``max_new`` < 1.
    """
    return replay_batch(
        drafter, [(prompt, generated)], stop_ids=stop_ids, max_new=max_new, remember=remember
    ).replays[0]


def report_outputs(
    tokenizer: LLMCXRTokenizer, texts: Sequence[str], *, seed: int = 0
) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, output ids)`` for report texts taken as a model's greedy outputs.

    Each prompt is the CXR -> report prompt with its own image ids (random, from ``seed``:
    text n-grams never match image ids, so their values do not matter); each output is
    laid out as in training (:func:`models.prompts.training_text`): the text, ``\\n\\n``,
    then ``### End``.
    """
    rng = np.random.default_rng(seed)
    template = report_prompt()
    return [
        (
            tokenizer.encode_with_image(template, rng.integers(0, 1024, CODES_PER_IMAGE).tolist()),
            [*tokenizer.encode(text + "\n\n"), END_ID],
        )
        for text in texts
    ]


def replay_reports(
    drafter: NgramDrafter, items: Sequence[tuple[list[int], list[int]]], *, max_new: int
) -> list[Replay]:
    """:func:`replay` of each ``(prompt, output)`` in order, as a node (batch 1) would meet
    them: each report is remembered for the next ones."""
    return [b.replays[0] for b in replay_batches(drafter, items, batch=1, max_new=max_new)]


def replay_summary(
    reps: Sequence[Replay], step_cost: Callable[[int], float] | None = None
) -> dict[str, float]:
    """Reports, tokens per report, tokens per step (plain steps over speculative ones), the
    share of proposals kept, and with ``step_cost`` (a step of n tokens' cost, e.g.
    :meth:`NgramDrafter.step_cost`) the decode speed-up over plain decoding."""
    steps = sum(r.steps for r in reps)
    plain = sum(r.plain_steps for r in reps)
    out = {
        "reports": float(len(reps)),
        "new_tokens": sum(r.new_tokens for r in reps) / max(len(reps), 1),
        "tokens_per_step": plain / max(steps, 1),
        "acceptance": sum(r.accepted for r in reps) / max(sum(r.proposed for r in reps), 1),
    }
    if step_cost is not None:
        spec_s = sum(step_cost(n) for r in reps for n in r.step_tokens)
        out["decode_x_plain"] = plain * step_cost(1) / spec_s if spec_s else 1.0
    return out


def replay_batches(
    drafter: NgramDrafter,
    items: Sequence[tuple[list[int], list[int]]],
    *,
    batch: int,
    max_new: int,
    joint: bool = True,
) -> list[BatchReplay]:
    """:func:`replay_batch` of consecutive groups of ``batch`` ``(prompt, output)`` items,
    in order, as a node whose queue always holds a worker batch would meet them."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    return [
        replay_batch(
            drafter, items[lo : lo + batch], stop_ids={END_ID, EOS_ID}, max_new=max_new, joint=joint
        )
        for lo in range(0, len(items), batch)
    ]


def batch_replay_summary(
    batches: Sequence[BatchReplay], step_cost: Callable[[int], float] | None = None
) -> dict[str, float]:
    """Reports, tokens generated per step of the batch, tokens fed per step, the most fed
    in one step, the share of proposals kept, and with ``step_cost`` (a step of n tokens'
    cost, e.g. :meth:`NgramDrafter.step_cost`) the decode speed-up over plain batched
    decoding (its steps priced by the running sequences; each step with speculation by
    its passes, :func:`pass_cost`)."""
    reps = [r for b in batches for r in b.replays]
    steps = sum(len(b.step_rows) for b in batches)
    out = {
        "reports": float(len(reps)),
        "tokens_per_step": sum(r.plain_steps for r in reps) / max(steps, 1),
        "rows_per_step": sum(sum(b.step_rows) for b in batches) / max(steps, 1),
        "max_rows": float(max((max(b.step_rows, default=0) for b in batches), default=0)),
        "acceptance": sum(r.accepted for r in reps) / max(sum(r.proposed for r in reps), 1),
    }
    if step_cost is not None:
        plain_s = sum(step_cost(n) for b in batches for n in b.plain_step_rows)
        spec_s = sum(
            pass_cost([r.step_tokens[t] for r in b.replays if t < len(r.step_tokens)], step_cost)
            for b in batches
            for t in range(len(b.step_rows))
        )
        out["decode_x_plain"] = plain_s / spec_s if spec_s else 1.0
    return out
