"""llama.cpp sequences as slots: batched decode calls, each slot's KV cache, prefix reuse.

A context holds ``max_batch`` sequences (slots), each with its own KV stream. A request
runs in one slot; the token ids whose K/V a slot holds are remembered between calls, so a
new prompt that shares a prefix with them prefills only the rest (report prompts share the
template before the image). Cached K/V are exactly what prefilling those ids again would
compute, so the cache changes no result.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from models.backends.base import GenerationError
from models.layout import VOCAB

__all__ = ["BatchDecoder", "KvCopier", "Placement", "Row", "SlotCache", "common_prefix"]


class Row(NamedTuple):
    """One token of a ``llama_decode`` call."""

    token: int
    pos: int
    """Its position in the sequence."""
    seq: int
    """The sequence (slot) it belongs to."""
    logits: bool
    """Whether llama.cpp keeps the logits after it."""


class Placement(NamedTuple):
    """Where :meth:`SlotCache.assign` put a prompt."""

    slot: int
    reused: int
    """Leading prompt ids whose K/V the slot already holds (prefill starts there)."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class BatchDecoder:
    """One reusable ``llama_batch`` of up to ``n_batch`` rows, and the logits it yields.

    Parameters
    ----------
    llama_cpp
        The initialised ``llama_cpp`` module.
    n_batch
        The most rows of one :meth:`decode` call (the contexts' ``n_batch``).
    """

    def __init__(self, llama_cpp: Any, n_batch: int) -> None:
        self._llama = llama_cpp
        self.n_batch = n_batch
        self._batch: Any = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def decode(self, ctx: Any, rows: Sequence[Row]) -> None:
        """Run one ``llama_decode`` of ``rows`` (at most ``n_batch``) on ``ctx``.

        Raises
        ------
        GenerationError
            llama.cpp failed; the context's KV cache is then in an unknown state.
        """
        if len(rows) > self.n_batch:
            raise GenerationError(f"{len(rows)} rows exceed n_batch {self.n_batch}")
        b = self._batch
        for n, row in enumerate(rows):
            b.token[n] = row.token
            b.pos[n] = row.pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = row.seq
            b.logits[n] = 1 if row.logits else 0
        b.n_tokens = len(rows)
        rc = self._llama.llama_decode(ctx, b)
        if rc != 0:
            raise GenerationError(f"llama_decode failed with code {rc}")

    def logits(self, ctx: Any, index: int) -> np.ndarray:
        """A copy of the logits (float32 [51305]) after row ``index`` of the last
        :meth:`decode` on ``ctx`` (a row decoded with ``logits=True``)."""
        ptr = self._llama.llama_get_logits_ith(ctx, index)
        if not ptr:
            raise GenerationError(f"llama.cpp returned no logits for batch row {index}")
        return np.ctypeslib.as_array(ptr, shape=(VOCAB,)).copy()

    def close(self) -> None:
        """Free the batch (idempotent)."""
        if self._batch is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None


class SlotCache:
    """The token ids whose K/V each slot of one context holds, for prefix reuse.

    Parameters
    ----------
    llama_cpp
        The initialised ``llama_cpp`` module.
    ctx
        The context that prefills (whose KV cache this describes).
    max_batch
        Its number of slots.
    """

    def __init__(self, llama_cpp: Any, ctx: Any, max_batch: int) -> None:
        self._llama = llama_cpp
        self._mem = llama_cpp.llama_get_memory(ctx)
        self.tokens: list[list[int]] = [[] for _ in range(max_batch)]

    def assign(self, prompts: Sequence[Sequence[int]]) -> list[Placement]:
        """Place each prompt (at most one per slot) in the free slot whose cached ids share
        its longest prefix, and drop that slot's K/V after the shared prefix.

        At least the last prompt id is always prefilled again: its logits start decoding.
        Ties go to the lowest slot. The slots' recorded ids are not changed here: set them
        with :meth:`record` once the K/V are written.
        """
        free = list(range(len(self.tokens)))
        out: list[Placement] = []
        for prompt in prompts:
            scored = [
                (min(common_prefix(self.tokens[k], prompt), len(prompt) - 1), k) for k in free
            ]
            keep, slot = max(scored, key=lambda x: (x[0], -x[1]))
            free.remove(slot)
            if not self._llama.llama_memory_seq_rm(self._mem, slot, keep, -1):
                self._llama.llama_memory_seq_rm(self._mem, slot, -1, -1)
                keep = 0
            out.append(Placement(slot, keep))
        return out

    def record(self, slot: int, ids: Sequence[int]) -> None:
        """``slot``'s K/V now hold exactly ``ids``."""
        self.tokens[slot] = list(ids)

    def extend(self, slot: int, ids: Sequence[int]) -> None:
        """``slot``'s K/V now also hold ``ids`` after the recorded ones."""
        self.tokens[slot] += ids

    def forget(self) -> None:
        """Every slot holds nothing (call after clearing the context's KV cache)."""
        self.tokens = [[] for _ in self.tokens]


class KvCopier:
    """Copies a sequence's K/V from one context to another (the prefill file's to the
    decode file's), through one reusable buffer."""

    def __init__(self, llama_cpp: Any) -> None:
        self._llama = llama_cpp
        self._buf = np.empty(0, dtype=np.uint8)

    def copy(self, src: Any, dst: Any, slot: int) -> None:
        """Replace sequence ``slot`` of ``dst`` by that of ``src``.

        Raises
        ------
        GenerationError
            llama.cpp wrote or read nothing.
        """
        llama = self._llama
        size = int(llama.llama_state_seq_get_size(src, slot))
        if self._buf.size < size:
            self._buf = np.empty(size, dtype=np.uint8)
        ptr = self._buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        written = int(llama.llama_state_seq_get_data(src, ptr, size, slot))
        # set_data replaces the sequence in this llama.cpp; emptying it first does not
        # depend on that
        llama.llama_memory_seq_rm(llama.llama_get_memory(dst), slot, -1, -1)
        if written == 0 or int(llama.llama_state_seq_set_data(dst, ptr, written, slot)) == 0:
            raise GenerationError(f"copying sequence {slot}'s K/V to the decoding context failed")
