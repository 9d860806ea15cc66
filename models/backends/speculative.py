"""Draft tokens for speculative greedy decoding by n-gram lookup (no draft model).

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
silhouette is normal."). :class:`NgramDrafter` looks up the last few tokens of the text so
far in the sequence itself and in the token ids of the reports it generated last, and
proposes what followed them there. The remembered reports are token ids in memory only,
never written or logged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

__all__ = ["NgramDrafter", "Replay", "SequenceIndex", "replay"]


def _add_ngrams(
    index: dict[tuple[int, ...], tuple[int, int]],
    tokens: Sequence[int],
    end: int,
    doc: int,
    sizes: range,
) -> None:
    """Index the n-grams ending just before ``tokens[end]``: each maps to (doc, end)."""
    for n in sizes:
        if end - n < 0:
            break
        index[tuple(tokens[end - n : end])] = (doc, end)


class SequenceIndex:
    """The n-grams of one growing token list (a prompt and the tokens generated after it).

    Each n-gram maps to the position after its latest occurrence whose follower is known,
    so a lookup of the list's own tail finds an earlier occurrence, never itself.
    """

    def __init__(self, tokens: Sequence[int], sizes: range) -> None:
        self.tokens: list[int] = []
        self._sizes = sizes
        self._index: dict[tuple[int, ...], tuple[int, int]] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` and index the n-grams they complete."""
        for t in tokens:
            self.tokens.append(int(t))
            _add_ngrams(self._index, self.tokens, len(self.tokens) - 1, 0, self._sizes)

    def follower(self, key: tuple[int, ...]) -> int | None:
        """Where the tokens after the latest earlier occurrence of ``key`` start."""
        hit = self._index.get(key)
        return None if hit is None else hit[1]


class NgramDrafter:
    """Proposes the next tokens of a greedy text generation by n-gram lookup.

    Parameters
    ----------
    max_tokens
        Most tokens proposed per step.
    ngram
        ``(shortest, longest)`` n-gram looked up; the longest match wins.
    memory
        How many finished generations are remembered (oldest forgotten first).
    context
        How many tokens before a remembered generation (the end of its prompt) are kept
        with it, so that the first tokens of the next report can be proposed.
    max_id
        Proposals end before the first id at or above this (``None``: no bound). Text
        generation never emits an image id, so a proposal holding one could not be kept.
    """

    def __init__(
        self,
        *,
        max_tokens: int = 4,
        ngram: tuple[int, int] = (2, 4),
        memory: int = 256,
        context: int = 8,
        max_id: int | None = None,
    ) -> None:
        lo, hi = ngram
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 1 <= lo <= hi:
            raise ValueError(f"ngram must be 1 <= shortest <= longest, got {ngram}")
        if memory < 0 or context < 0:
            raise ValueError("memory and context must be >= 0")
        self.max_tokens = max_tokens
        self.sizes = range(lo, hi + 1)
        self.memory = memory
        self.context = context
        self.max_id = max_id
        self._docs: OrderedDict[int, list[int]] = OrderedDict()
        self._next_doc = 0
        self._index: dict[tuple[int, ...], tuple[int, int]] = {}

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
        self._docs[self._next_doc] = doc
        for end in range(1, len(doc)):
            _add_ngrams(self._index, doc, end, self._next_doc, self.sizes)
        self._next_doc += 1
        if len(self._docs) > self.memory:
            # forget the oldest quarter at once and rebuild: newer entries win again
            for _ in range(max(1, len(self._docs) - self.memory * 3 // 4)):
                self._docs.popitem(last=False)
            self._index = {}
            for d, toks in self._docs.items():
                for end in range(1, len(toks)):
                    _add_ngrams(self._index, toks, end, d, self.sizes)

    def forget(self) -> None:
        """Drop every remembered generation."""
        self._docs.clear()
        self._index = {}

    def propose(self, seq: SequenceIndex, limit: int | None = None) -> list[int]:
        """Up to ``limit`` (default ``max_tokens``) ids likely to follow ``seq.tokens``.

        The longest n-gram of the sequence's tail found wins; at equal length the sequence's
        own earlier text before the remembered generations. Empty when nothing matches.
        """
        k = self.max_tokens if limit is None else min(limit, self.max_tokens)
        toks = seq.tokens
        if k < 1:
            return []
        for n in reversed(self.sizes):
            if n > len(toks):
                continue
            key = tuple(toks[-n:])
            pos = seq.follower(key)
            if pos is not None:
                return self._bounded(toks[pos : pos + k])
            hit = self._index.get(key)
            if hit is not None:
                doc = self._docs.get(hit[0])
                if doc is not None:
                    return self._bounded(doc[hit[1] : hit[1] + k])
        return []

    def _bounded(self, ids: list[int]) -> list[int]:
        if self.max_id is None:
            return ids
        return ids[: next((i for i, t in enumerate(ids) if t >= self.max_id), len(ids))]


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
    proposed, accepted
        Proposals checked, and those equal to the model's own choice (kept).
    """

    new_tokens: int = 0
    plain_steps: int = 0
    step_tokens: list[int] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0

    @property
    def steps(self) -> int:
        """Decode steps after the prefill."""
        return len(self.step_tokens)


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
    gen = [int(t) for t in generated]
    stop = next((i for i, t in enumerate(gen) if t in stop_ids), None)
    end = len(gen) if stop is None else stop
    if max_new is None:
        max_new = end if stop is None else end + 1
    if max_new < 1 or (stop is None and end < max_new):
        raise ValueError(
            f"generated ({len(gen)} ids) must hold a stop id or max_new ({max_new}) ids"
        )
    limit = max_new
    # what the model emits: up to max_new ids, then the stop id if it comes first
    gen = gen[: min(end, limit) + (stop is not None and end < limit)]
    rep = Replay()
    seq = drafter.sequence(prompt)
    i = 0  # next position of gen the model emits
    while gen[i] not in stop_ids:
        i += 1
        if i >= limit:
            break
        seq.extend(gen[i - 1 : i])
        drafts = drafter.propose(seq, limit - i)
        rep.step_tokens.append(1 + len(drafts))
        rep.proposed += len(drafts)
        ended = False
        for d in drafts:
            if gen[i] != d or d in stop_ids:
                ended = d in stop_ids and gen[i] == d
                break
            i += 1
            rep.accepted += 1
            seq.extend([d])
            if i >= limit:
                ended = True
                break
        if ended:
            break
    rep.new_tokens = min(end, limit)
    rep.plain_steps = rep.new_tokens if end < limit else rep.new_tokens - 1
    if remember:
        drafter.remember(prompt, gen)
    return rep
