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
from collections.abc import Sequence

__all__ = ["NgramDrafter", "SequenceIndex"]


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
    """

    def __init__(
        self,
        *,
        max_tokens: int = 4,
        ngram: tuple[int, int] = (2, 4),
        memory: int = 256,
        context: int = 8,
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
                return toks[pos : pos + k]
            hit = self._index.get(key)
            if hit is not None:
                doc = self._docs.get(hit[0])
                if doc is not None:
                    return doc[hit[1] : hit[1] + k]
        return []
