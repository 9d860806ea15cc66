"""The llama.cpp generation backend: batches of requests as parallel llama.cpp sequences."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.backends.base import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    error_result,
)
from models.backends.llamacpp.library import import_llama_cpp, init_llama
from models.backends.llamacpp.sampling import SequenceState
from models.backends.llamacpp.session import KV_TYPES, ContextSpec, Session, open_session
from models.backends.llamacpp.slots import Row
from models.layout import CODES_PER_IMAGE, END_ID, EOS_ID, IMAGE_TOKEN_OFFSET, VOCAB, id_to_code

__all__ = ["LlamaCppBackend"]

log = logging.getLogger(__name__)


class LlamaCppBackend:
    """Generation with llama.cpp on a GGUF file made by :mod:`models.gguf_convert`.

    Prompts go in as token ids (so image ids enter exactly); up to ``max_batch`` requests
    decode together, one llama.cpp sequence (slot) each, one ``llama_decode`` per step for
    all of them; the next token is chosen in numpy under the transformers backend's rules
    (:mod:`models.backends.llamacpp.sampling`). A request's greedy tokens do not depend on
    the other requests of its batch, up to the floating-point summation order of a
    several-row matrix product. A request's ``on_token`` gets each id as it is chosen; one
    that cancels leaves the batch at once while the others decode on.

    Parameters
    ----------
    model_dir
        A bundle root, its ``llm/`` folder (the converted files are found through the
        manifest's ``engines.llamacpp``) or a ``.gguf`` file.
    quant
        Which converted file to use (``"q8_0"``, ``"f16"``, ...); default: see
        :data:`~models.backends.llamacpp.session.QUANT_PREFERENCE`.
    threads
        CPU threads for decode and prefill (default: all cores).
    n_ctx
        Positions per sequence (prompt + new tokens), 16..32768; requests are also bounded
        by the model's own context length.
    n_batch
        Most tokens per ``llama_decode`` call (prefill chunk); at least ``max_batch``.
    max_batch
        Most requests decoded together (llama.cpp sequences).
    kv_type
        KV-cache precision: ``"f16"``, ``"f32"`` (exact agreement checks), ``"q8_0"``, or
        ``"auto"`` (default): F32 for an F32 file (so ``quant="f32"`` reproduces the
        transformers fp32 reference), else F16.
    flash_attn
        Use llama.cpp's flash attention (needs an F16 KV cache).
    prefix_cache
        Keep each sequence's K/V after a call and, when a later prompt shares a prefix
        with them, prefill only the rest (default on; :mod:`models.backends.llamacpp.slots`).
        Results are the same either way.
    device
        ``"cpu"``, or ``"cuda"``/``"gpu"`` to offload every layer when llama-cpp-python was
        built with a GPU backend.
    prefill_quant
        Another converted file of the bundle that computes the prompts; each sequence's K/V
        are then copied into the ``quant`` file's context and decoding continues there.
        Costs the memory of both files; the first new token comes from the prefill file's
        logits. Default: one file does both.
    dtype
        Ignored (the precision is the GGUF file's); accepted so the node can pass the same
        options to every backend.

    Raises
    ------
    ValueError
        An option out of range.
    """

    name = "llamacpp"

    def __init__(
        self,
        model_dir: Path | str,
        *,
        quant: str | None = None,
        threads: int | None = None,
        n_ctx: int = 1024,
        n_batch: int = 512,
        max_batch: int = 4,
        kv_type: str = "auto",
        flash_attn: bool = False,
        prefix_cache: bool = True,
        device: str = "cpu",
        prefill_quant: str | None = None,
        dtype: str | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if not 16 <= n_ctx <= 32768:
            raise ValueError(f"n_ctx must be in 16..32768, got {n_ctx}")
        if n_batch < max_batch:
            raise ValueError(f"n_batch ({n_batch}) must hold max_batch ({max_batch}) tokens")
        if kv_type != "auto" and kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be auto or one of {sorted(KV_TYPES)}, got {kv_type!r}")
        if device not in ("cpu", "cuda", "gpu") and not device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        self.model_dir = Path(model_dir)
        self.quant = quant
        self.threads = int(threads or os.cpu_count() or 1)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.max_batch = max_batch
        self.kv_type = kv_type
        self.flash_attn = flash_attn
        self.prefix_cache = prefix_cache
        self.device = device
        self.prefill_quant = prefill_quant
        self.gguf_path: Path | None = None
        self.prefill_path: Path | None = None
        self._llama: Any = None
        self._cpu_features: list[str] | None = None
        self._session: Session | None = None
        self._lock = threading.Lock()
        self._counters = {
            "requests": 0,
            "errors": 0,
            "new_tokens": 0,
            "prompt_tokens": 0,
            "prompt_tokens_reused": 0,
            "decode_steps": 0,  # llama_decode calls after the prompts
        }

    # -- lifecycle --------------------------------------------------------------------------

    def load(self) -> None:
        """Load the GGUF file(s), check the vocabulary layout, create the context(s);
        idempotent.

        Raises
        ------
        GenerationError
            llama-cpp-python is missing or loads no CPU backend, or a file cannot be used.
        """
        if self._session is not None:
            return
        llama_cpp = import_llama_cpp()
        self._cpu_features = init_llama(llama_cpp)
        self._llama = llama_cpp
        spec = ContextSpec(
            n_ctx=self.n_ctx,
            n_batch=self.n_batch,
            max_batch=self.max_batch,
            threads=self.threads,
            kv_type=self.kv_type,
            flash_attn=self.flash_attn,
            device=self.device,
        )
        s = open_session(
            llama_cpp, self.model_dir, spec, quant=self.quant, prefill_quant=self.prefill_quant
        )
        self._session = s
        self.kv_type = s.decode.kv_type
        self.gguf_path = s.decode.path
        self.quant = s.quant
        self.prefill_path = s.prefill.path if s.prefill is not None else None
        log.info(
            "llama.cpp backend loaded (%s, quant=%s, prefill=%s, threads=%d, max_batch=%d)",
            s.decode.path.name,
            self.quant,
            s.prefill.path.name if s.prefill is not None else "same file",
            self.threads,
            self.max_batch,
        )

    def _loaded(self) -> Session:
        self.load()
        assert self._session is not None
        return self._session

    @property
    def _ctx(self) -> Any:
        """The decoding context (``None`` before :meth:`load`)."""
        return self._session.decode.ctx if self._session is not None else None

    def close(self) -> None:
        """Free the contexts, the batch and the model(s); :meth:`load` may load them again."""
        if self._session is not None:
            self._session.close(self._llama)
            self._session = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        with contextlib.suppress(Exception):
            self.close()

    def warmup(self) -> None:
        """One tiny greedy generation."""
        self.load()
        self.generate([GenerationRequest(prompt_ids=[EOS_ID, END_ID], max_new_tokens=2)])

    def health(self) -> dict[str, Any]:
        """Loaded flag, model file(s), quantisation, options, the llama-cpp-python version,
        the CPU features of ggml's backend in use, and the counters since construction."""
        out: dict[str, Any] = {
            "backend": self.name,
            "loaded": self._session is not None,
            "device": self.device,
            "model_path": str(self.gguf_path or self.model_dir),
            "quant": self.quant,
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "max_batch": self.max_batch,
            "kv_type": self.kv_type,
            "prefix_cache": self.prefix_cache,
            "prefill_quant": self.prefill_quant,
            "prefill_model_path": str(self.prefill_path) if self.prefill_path else None,
            "engine_version": f"llama-cpp-python {getattr(self._llama, '__version__', '?')}"
            if self._llama is not None
            else None,
            "cpu_features": list(self._cpu_features) if self._cpu_features is not None else None,
            **self._counters,
        }
        if self._session is not None:
            model = self._session.decode.model
            out["model_bytes"] = int(self._llama.llama_model_size(model))
            out["parameters"] = int(self._llama.llama_model_n_params(model))
        return out

    # -- vocabulary -------------------------------------------------------------------------

    def vocab_entry(self, token_id: int) -> tuple[str, str]:
        """``(text, kind)`` of a GGUF vocabulary entry as llama.cpp sees it; ``kind`` is
        ``"control"``, ``"user_defined"``, ``"normal"`` or ``"other"``."""
        return self._loaded().vocab.entry(token_id)

    def tokenize(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` with llama.cpp's tokenizer (the GGUF vocabulary)."""
        return self._loaded().vocab.tokenize(text, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` from the GGUF vocabulary (control tokens and image ids dropped)."""
        return self._loaded().vocab.detokenize(ids)

    def _text(self, s: Session, ids: list[int]) -> str:
        if s.tokenizer is not None:
            return str(s.tokenizer.decode(ids, skip_special_tokens=True)).strip()
        return s.vocab.detokenize(ids).strip()

    # -- generation -------------------------------------------------------------------------

    def _validate(self, s: Session, req: GenerationRequest) -> str | None:
        try:
            req.validate()
        except GenerationError as exc:
            return str(exc)
        new = CODES_PER_IMAGE + 2 if req.mode == "image" else req.max_new_tokens
        limit = min(self.n_ctx, s.max_pos)
        if len(req.prompt_ids) + new > limit:
            return f"prompt ({len(req.prompt_ids)}) + new tokens ({new}) exceed {limit} positions"
        return None

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run requests, up to ``max_batch`` at a time as parallel sequences.

        Returns
        -------
        list of GenerationResult
            One per request, in order. An invalid request gets a ``stop_reason="error"``
            result; a batch that fails in llama.cpp fails only its own requests (and the
            prefix cache starts empty after it).
        """
        s = self._loaded()
        results: list[GenerationResult | None] = [None] * len(requests)
        with self._lock:
            runnable: list[int] = []
            for i, req in enumerate(requests):
                self._counters["requests"] += 1
                err = self._validate(s, req)
                if err is not None:
                    self._counters["errors"] += 1
                    results[i] = error_result(req, err)
                else:
                    runnable.append(i)
            for k in range(0, len(runnable), self.max_batch):
                chunk = runnable[k : k + self.max_batch]
                try:
                    outs = self._run(s, [requests[j] for j in chunk])
                except (GenerationError, RuntimeError, ValueError) as exc:
                    log.exception("llama.cpp generation failed")
                    outs = [error_result(requests[j], f"generation failed: {exc}") for j in chunk]
                    self._counters["errors"] += len(chunk)
                for j, res in zip(chunk, outs, strict=True):
                    results[j] = res
                    self._counters["new_tokens"] += res.new_tokens
        return [r for r in results if r is not None]

    def _run(self, s: Session, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        """One batch (at most ``max_batch`` valid requests): prefill, then decode steps."""
        seqs = [SequenceState.start(r, open_id=s.open_id, close_id=s.close_id) for r in reqs]
        try:
            t0 = time.perf_counter()
            self._prefill(s, seqs)
            t1 = time.perf_counter()
            self._decode(s, seqs)
            t2 = time.perf_counter()
            return [self._result(s, q, t1 - t0, t2 - t1) for q in seqs]
        except BaseException:
            # a failed llama_decode leaves the cache in an unknown state: start clean
            s.clear(self._llama)
            raise

    def _prefill(self, s: Session, seqs: list[SequenceState]) -> None:
        """Place the sequences in slots and compute what their slots do not hold yet, the
        prompts' remaining ids of all sequences packed into ``n_batch``-row calls; each
        sequence's logits after its last prompt id are set. With a prefill file, the K/V
        are then copied to the decoding context."""
        if not self.prefix_cache:
            s.clear(self._llama)
        for q, place in zip(seqs, s.slots.assign([q.prompt for q in seqs]), strict=True):
            q.slot, q.reused = place
            self._counters["prompt_tokens"] += len(q.prompt)
            self._counters["prompt_tokens_reused"] += place.reused
        rows = [
            Row(q.prompt[p], p, q.slot, p == len(q.prompt) - 1)
            for q in seqs
            for p in range(q.reused, len(q.prompt))
        ]
        by_slot = {q.slot: q for q in seqs}
        ctx = s.prefill_ctx
        for lo in range(0, len(rows), self.n_batch):
            chunk = rows[lo : lo + self.n_batch]
            s.batch.decode(ctx, chunk)
            for i, row in enumerate(chunk):
                if row.logits:
                    by_slot[row.seq].logits = s.batch.logits(ctx, i)
        for q in seqs:
            s.slots.record(q.slot, q.prompt)
            if s.prefill is not None:
                s.kv.copy(s.prefill.ctx, s.decode.ctx, q.slot)

    def _decode(self, s: Session, seqs: list[SequenceState]) -> None:
        """Decode steps until every sequence has ended: each step feeds every running
        sequence's latest token, in slot order, in one ``llama_decode`` call."""
        ctx = s.decode.ctx
        active = sorted(seqs, key=lambda q: q.slot)
        while active:
            fed: list[tuple[SequenceState, int]] = []
            for q in active:
                tok = q.advance()
                if tok is not None:
                    fed.append((q, tok))
            if not fed:
                break
            s.batch.decode(ctx, [Row(tok, q.last_pos, q.slot, True) for q, tok in fed])
            self._counters["decode_steps"] += 1
            for i, (q, tok) in enumerate(fed):
                q.logits = s.batch.logits(ctx, i)
                if s.prefill is None:  # the prefix cache lives in the prefilling context
                    s.slots.extend(q.slot, [tok])
            active = [q for q, _ in fed]

    def _result(
        self, s: Session, q: SequenceState, prefill: float, decode: float
    ) -> GenerationResult:
        common: dict[str, Any] = {
            "token_ids": list(q.out),
            "prompt_tokens": len(q.prompt),
            "new_tokens": len(q.out),
            "prefill_s": prefill,
            "decode_s": decode,
        }
        if q.stop == "error":  # its on_token raised
            self._counters["errors"] += 1
            why = q.feed.error if q.feed is not None else None
            return error_result(q.req, why or "the token callback failed")
        if q.req.mode == "image":
            codes = q.out[:CODES_PER_IMAGE]
            if len(codes) != CODES_PER_IMAGE or not all(
                IMAGE_TOKEN_OFFSET <= t < VOCAB for t in codes
            ):
                raise GenerationError(f"constrained decoding produced {len(codes)} image ids")
            return GenerationResult(
                text=None,
                image_codes=[id_to_code(t) for t in codes],
                stop_reason="image_complete",
                **common,
            )
        return GenerationResult(
            text=self._text(s, q.out),
            image_codes=None,
            stop_reason=q.stop or "max_new_tokens",
            **common,
        )

    def clear_cache(self) -> None:
        """Forget every sequence's cached K/V: the next prompts are prefilled in full."""
        if self._session is None:
            return
        with self._lock:
            self._session.clear(self._llama)

    def next_token_logits(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Logits (float32 [51305]) of the token after ``prompt_ids`` (for agreement checks),
        from the ``quant`` file (not the prefill file). Clears the prefix cache.

        Raises
        ------
        GenerationError
            An empty prompt or one longer than the context.
        """
        s = self._loaded()
        ids = [int(t) for t in prompt_ids]
        if not ids or len(ids) > min(self.n_ctx, s.max_pos):
            raise GenerationError(f"prompt length {len(ids)} outside 1..{self.n_ctx}")
        with self._lock:
            s.clear(self._llama)
            logits: np.ndarray | None = None
            for lo in range(0, len(ids), self.n_batch):
                rows = [
                    Row(t, lo + p, 0, lo + p == len(ids) - 1)
                    for p, t in enumerate(ids[lo : lo + self.n_batch])
                ]
                s.batch.decode(s.decode.ctx, rows)
                if rows[-1].logits:
                    logits = s.batch.logits(s.decode.ctx, len(rows) - 1)
        assert logits is not None
        return logits
