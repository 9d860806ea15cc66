"""Choosing the next token from a sequence's logits, under LLM-CXR's decoding rules.

The rules are the transformers backend's: in text mode image ids are masked and ``### End``
or the end-of-text id stops the sequence, and each chosen id goes to the request's
``on_token`` at once (returning ``False`` stops the sequence there); in image mode only
image ids (50281..51304) are allowed for 256 steps and ``>`` follows them, so the result
always holds 256 codes. The choice is the argmax (greedy) or a seeded sample with
temperature, top-k and top-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.backends.base import GenerationRequest, TokenFeed
from models.layout import CODES_PER_IMAGE, END_ID, EOS_ID, IMAGE_TOKEN_OFFSET, VOCAB

__all__ = ["STOP_IDS", "SequenceState", "constrain", "sample_next"]

STOP_IDS = (END_ID, EOS_ID)
"""Text-mode ids that end a sequence (not part of its output)."""


def constrain(logits: np.ndarray, mode: str) -> np.ndarray:
    """The logits with the ids ``mode`` forbids set to ``-inf``: image ids and padded rows
    in ``"text"`` mode (in place), everything but image ids in ``"image"`` mode (a new
    array)."""
    if mode == "image":
        masked = np.full_like(logits, -np.inf)
        masked[IMAGE_TOKEN_OFFSET:VOCAB] = logits[IMAGE_TOKEN_OFFSET:VOCAB]
        return masked
    logits[IMAGE_TOKEN_OFFSET:] = -np.inf
    return logits


def sample_next(
    logits: np.ndarray,
    *,
    greedy: bool,
    rng: np.random.Generator | None,
    temperature: float,
    top_p: float,
    top_k: int,
) -> int:
    """Pick the next id from (already masked) logits.

    Parameters
    ----------
    logits
        One row of logits; ``-inf`` marks forbidden ids.
    greedy, rng
        The argmax when ``greedy`` or without ``rng``; else a draw from ``rng``.
    temperature, top_p, top_k
        Sampling: the logits divided by ``temperature``, then only the ``top_k`` largest
        (0: all), then the fewest most probable ids whose probabilities sum to ``top_p``.

    Returns
    -------
    int
        The chosen id.
    """
    if greedy or rng is None:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    finite = np.isfinite(z)
    idx = np.flatnonzero(finite)
    z = z[idx]
    if top_k > 0 and top_k < z.size:
        keep = np.argpartition(-z, top_k - 1)[:top_k]
        idx, z = idx[keep], z[keep]
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        n = int(np.searchsorted(cum, top_p) + 1)
        order = order[:n]
        idx, p = idx[order], p[order] / p[order].sum()
    return int(idx[rng.choice(p.size, p=p)])


@dataclass
class SequenceState:
    """Decoding state of one request in one llama.cpp sequence.

    Build it with :meth:`start`; after each set of ``logits``, :meth:`advance` chooses
    the next token.
    """

    req: GenerationRequest
    prompt: list[int]
    """The ids prefilled: the request's, with ``<`` appended in image mode if missing."""
    max_new: int
    close_id: int
    rng: np.random.Generator | None
    slot: int = 0
    reused: int = 0
    """Leading prompt ids taken from the slot's cached K/V."""
    out: list[int] = field(default_factory=list)
    logits: np.ndarray | None = None
    stop: str | None = None
    feed: TokenFeed | None = None
    """Streams the chosen ids to the request's ``on_token`` (set by :meth:`start`)."""

    @classmethod
    def start(cls, req: GenerationRequest, *, open_id: int, close_id: int) -> SequenceState:
        """The state before prefill for a validated request; ``open_id``/``close_id`` are
        the ids of ``<`` and ``>``."""
        prompt = [int(t) for t in req.prompt_ids]
        if req.mode == "image" and prompt[-1] != open_id:
            prompt.append(open_id)
        return cls(
            req=req,
            prompt=prompt,
            max_new=CODES_PER_IMAGE + 1 if req.mode == "image" else req.max_new_tokens,
            close_id=close_id,
            rng=None if req.greedy else np.random.default_rng(req.seed),
            feed=TokenFeed(req),
        )

    @property
    def last_pos(self) -> int:
        """The position of the latest output token."""
        return len(self.prompt) + len(self.out) - 1

    def advance(self) -> int | None:
        """Choose the next token from ``logits`` and append it to ``out``.

        In image mode, ``>`` is appended without running the model after the 256th code.

        Returns
        -------
        int or None
            The token to feed to the model next, or ``None`` when the sequence has ended
            (``stop`` says why: ``"end"``, ``"eos"``, ``"max_new_tokens"``,
            ``"image_complete"``, ``"cancelled"`` (``on_token`` returned ``False``; the id
            is kept) or ``"error"`` (``on_token`` raised; ``feed.error`` says so)).
        """
        assert self.logits is not None
        r = self.req
        tok = sample_next(
            constrain(self.logits, r.mode),
            greedy=r.greedy,
            rng=self.rng,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
        )
        feed = self.feed
        if r.mode == "text" and tok in STOP_IDS:
            if feed is not None:
                feed(tok)
            self.stop = "end" if tok == END_ID else "eos"
            return None
        self.out.append(tok)
        if feed is not None and not feed(tok):
            self.stop = "error" if feed.error is not None else "cancelled"
            return None
        if r.mode == "image" and len(self.out) == CODES_PER_IMAGE:
            self.out.append(self.close_id)
        if len(self.out) >= self.max_new:
            self.stop = "image_complete" if r.mode == "image" else "max_new_tokens"
            return None
        return tok
