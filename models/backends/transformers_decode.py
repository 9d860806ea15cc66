"""Decoding pieces of the transformers backend: batch inputs, the own greedy loop, results.

:func:`left_pad` builds the left-padded batch both decode paths start from. The own greedy
loop (``decode_loop="graph"``) is :class:`GraphBatch` plus :func:`run_graph_loop`: one
eager prefill, then one :func:`greedy_step` per token (forward, constraint bias, argmax; the
function the backend compiles) on fixed-shape tensors, looking for ``### End``/EOS only every
:data:`~models.backends.transformers_support.STOP_CHECK_EVERY` steps. :func:`to_result`
turns the generated ids of either path into a :class:`GenerationResult`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from models.backends.base import GenerationRequest, GenerationResult, TokenFeed, error_result
from models.backends.constraints import FirstStepTimer
from models.backends.transformers_support import (
    STOP_CHECK_EVERY,
    batch_bucket,
    static_cache_len,
)
from models.layout import CODES_PER_IMAGE, END_ID, EOS_ID, IMAGE_TOKEN_OFFSET, VOCAB, id_to_code
from models.text import LLMCXRTokenizer

__all__ = [
    "STREAM_CHECK_EVERY",
    "GraphBatch",
    "GraphTimes",
    "StreamStopping",
    "SyncedTimer",
    "constraint_biases",
    "greedy_step",
    "left_pad",
    "run_generate",
    "run_graph_loop",
    "seeded_rng",
    "streamed_result",
    "to_result",
]


class SyncedTimer(FirstStepTimer):
    """:class:`FirstStepTimer` that waits for the GPU first (CUDA kernels run asynchronously)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.FloatTensor:  # type: ignore[override]
        if self.first is None:  # pragma: no cover - CUDA only (tests marked gpu)
            torch.cuda.synchronize(self.device)
        return super().__call__(input_ids, scores)


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[len(prompts), longest]`` int64 on the CPU:
    each prompt right-aligned, EOS (the pad id) and mask 0 before it."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), EOS_ID, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention[row, width - len(p) :] = 1
    return input_ids, attention


@contextmanager
def seeded_rng(seed: int | None) -> Iterator[None]:
    """Run the body with torch's global RNG seeded with ``seed`` and restore the RNG state
    afterwards, so that a seeded request leaves other requests' randomness alone; ``None``:
    the RNG is left as it is."""
    if seed is None:
        yield
        return
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


STREAM_CHECK_EVERY = 1
"""Steps between hand-overs of new ids to the requests' ``on_token`` in the own loop when a
request of the batch streams (each hand-over waits for the GPU)."""


class StreamStopping:
    """A ``StoppingCriteria`` for ``generate`` that streams every row's new id.

    Called after each step with the sequences so far: hands each row's newest id to its
    :class:`~models.backends.base.TokenFeed` and stops the rows whose request was cancelled
    or failed (``generate`` pads them from then on; the other rows go on unchanged).
    """

    def __init__(self, feeds: Sequence[TokenFeed]) -> None:
        self.feeds = list(feeds)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        """``[batch]`` booleans: whether each row stops now."""
        last = input_ids[:, -1].tolist()
        stop = [not feed(int(t)) for feed, t in zip(self.feeds, last, strict=True)]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)


def run_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    *,
    config: Any,
    processors: Any,
    timer: FirstStepTimer,
    seed: int | None,
    device: str,
    stopping: StreamStopping | None = None,
) -> tuple[list[list[int]], float, float]:
    """Decode a left-padded batch with transformers' ``generate``.

    Parameters
    ----------
    model
        The ``GPTNeoXForCausalLM``, on ``device``.
    input_ids, attention
        From :func:`left_pad`.
    config
        The ``GenerationConfig``.
    processors
        The ``LogitsProcessorList`` (constraints), ending with ``timer``.
    timer
        Marks the end of prefill (:class:`SyncedTimer` on CUDA).
    seed
        Seeds the global RNG for the call, restored after (:func:`seeded_rng`).
    device
        Where the model runs (the inputs are moved there; CUDA is waited for).
    stopping
        Streams the rows' ids and stops cancelled rows (:class:`StreamStopping`).

    Returns
    -------
    generated : list of list of int
        Every row's new ids (stop ids and padding after them included).
    prefill_s, decode_s : float
        Seconds to the first logits and from there to the end.
    """
    width = input_ids.shape[1]
    with seeded_rng(seed):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=[stopping] if stopping is not None else None,
            )
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    prefill = (timer.first or t1) - t0
    decode = t1 - (timer.first or t1)
    return [[int(x) for x in row[width:].tolist()] for row in out], prefill, decode


def greedy_step(
    model: Any,
    cache: Any,
    tok: torch.Tensor,
    attn: torch.Tensor,
    pos: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """One greedy step: forward one token per row, add the constraint bias, argmax.

    Written to be compiled as one function, so that mask building, the bias and the argmax
    are inside the captured graph instead of being host work on every step. Returns the next
    token of every row, ``[batch]``.
    """
    kw = {"attention_mask": attn, "position_ids": pos, "cache": cache}
    out = model(input_ids=tok, use_cache=True, **kw)
    return (out.logits[:, -1, :].float() + bias).argmax(dim=-1)


def constraint_biases(width: int, *, image: bool, close_id: int, device: str) -> list[torch.Tensor]:
    """Additive logit masks of ``width`` entries: text mode, one (no image ids); image mode,
    two (image ids only for the 256 codes, then ``close_id`` only), as the logits processors
    of ``generate``."""
    neg = float("-inf")
    if not image:
        text = torch.zeros(width, device=device)
        text[IMAGE_TOKEN_OFFSET:] = neg
        return [text]
    codes = torch.full((width,), neg, device=device)
    codes[IMAGE_TOKEN_OFFSET:VOCAB] = 0.0
    close = torch.full((width,), neg, device=device)
    close[close_id] = 0.0
    return [codes, close]


class GraphBatch:
    """A left-padded batch at its bucket size with the fixed-shape tensors the loop uses.

    The batch goes up to a power of two with copies of the first row (their tokens are
    dropped): one compiled step and CUDA graph per bucket instead of per batch size, so a
    worker batching up to N jobs compiles log2(N) + 1 times and never reaches Dynamo's
    recompile limit (8), after which the step would run eagerly. The cache length is the
    prompt plus ``max_new``, bucketed by :func:`static_cache_len` up to ``max_pos``.

    Parameters
    ----------
    input_ids, attention
        From :func:`left_pad`.
    max_new
        New tokens at most (the prefill's included).
    max_pos
        The model's position limit.
    device
        Where the model runs.

    Attributes
    ----------
    input_ids
        ``[size, width]`` prompt ids on the CPU (rows past ``real`` copy the first row).
    attn
        ``[size, length]`` attention mask on the device spanning the whole static cache:
        the prompt's mask, then ones (the causal mask hides what is not written yet).
    positions
        ``[size, width]`` position ids on the device, counted over each row's real tokens.
    out
        ``[size, max_new]`` generated ids on the device, written step by step.
    real, size, width, length
        Rows that belong to requests, the bucketed rows, the prompt width, the cache length.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention: torch.Tensor,
        *,
        max_new: int,
        max_pos: int,
        device: str,
    ) -> None:
        real, width = input_ids.shape
        bsz = batch_bucket(real)
        if bsz > real:
            input_ids = torch.cat([input_ids, input_ids[:1].expand(bsz - real, -1)])
            attention = torch.cat([attention, attention[:1].expand(bsz - real, -1)])
        length = static_cache_len(width + max_new, max_pos)
        attn = torch.ones((bsz, length), dtype=torch.long, device=device)
        attn[:, :width] = attention.to(device)
        self.input_ids = input_ids
        self.attn = attn
        self.positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0).to(device)
        self.out = torch.empty((bsz, max_new), dtype=torch.long, device=device)
        self.real, self.size, self.width, self.length = int(real), bsz, int(width), length
        self.max_new = max_new
        self.device = device


@dataclass(frozen=True)
class GraphTimes:
    """Where the time of one :func:`run_graph_loop` call went (seconds)."""

    prefill_s: float
    decode_s: float
    steps: int
    """Decode steps run after the prefill."""
    waited_s: float
    """Host time spent waiting for the GPU (stop checks and the final copy)."""


def run_graph_loop(
    model: Any,
    step: Callable[..., torch.Tensor],
    static_cache: Callable[[int, int], Any],
    batch: GraphBatch,
    *,
    image: bool,
    close_id: int,
    compile: bool,
    feeds: Sequence[TokenFeed] | None = None,
) -> tuple[list[list[int]], GraphTimes]:
    """Greedy decoding of ``batch`` with the own loop.

    Parameters
    ----------
    model
        A ``GPTNeoXForCausalLM`` whose forward takes ``cache=``.
    step
        :func:`greedy_step`, or its compiled form.
    static_cache
        ``(batch, length) -> StaticCache``, reset; called in inference mode.
    batch
        The padded batch; its ``out`` receives the ids.
    image
        Image mode: 256 image ids, then ``close_id``; no stop checks.
    close_id
        The ``>`` token ending an image.
    compile
        ``step`` is compiled with CUDA graphs (marks each step's start).
    feeds
        One per real row (text mode): their new ids are handed over every
        :data:`STREAM_CHECK_EVERY` steps and at the end; a cancelled or failed row counts as
        ended (it keeps decoding until the batch ends, its ids unused).

    Returns
    -------
    generated : list of list of int
        Every row's ids (bucket rows included), up to the step the loop stopped at.
    times : GraphTimes
    """
    stop_ids = torch.tensor([END_ID, EOS_ID], device=batch.device)
    t0 = time.perf_counter()
    with torch.inference_mode():  # the cache's tensors are made and reset in this mode
        cache = static_cache(batch.size, batch.length)
        biases = _prefill(model, cache, batch, image=image, close_id=close_id)
        if batch.device.startswith("cuda"):
            torch.cuda.synchronize(batch.device)
        t1 = time.perf_counter()
        streams = _Streams(feeds, batch.real) if feeds and not image else None
        done, waited = _decode(model, step, cache, batch, biases, stop_ids, image, compile, streams)
        tw = time.perf_counter()
        generated = batch.out[:, :done].tolist()  # waits for the GPU
        if streams is not None:
            streams.hand_over(generated, done)
    t2 = time.perf_counter()
    times = GraphTimes(
        prefill_s=t1 - t0, decode_s=t2 - t1, steps=done - 1, waited_s=waited + t2 - tw
    )
    return generated, times


def _prefill(
    model: Any, cache: Any, batch: GraphBatch, *, image: bool, close_id: int
) -> list[torch.Tensor]:
    """Run the prompt (eager), write the first token to ``batch.out[:, 0]`` and return the
    constraint biases (:func:`constraint_biases`) sized to the model's logits."""
    logits = model(
        input_ids=batch.input_ids.to(batch.device),
        attention_mask=batch.attn[:, : batch.width],
        position_ids=batch.positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits
    biases = constraint_biases(
        logits.shape[-1], image=image, close_id=close_id, device=batch.device
    )
    batch.out[:, 0] = (logits[:, -1, :].float() + biases[0]).argmax(dim=-1)
    return biases


def _decode(
    model: Any,
    step: Callable[..., torch.Tensor],
    cache: Any,
    batch: GraphBatch,
    biases: list[torch.Tensor],
    stop_ids: torch.Tensor,
    image: bool,
    compile: bool,
    streams: _Streams | None = None,
) -> tuple[int, float]:
    """The steps after the prefill: ``(tokens written per row, seconds waited at stop
    checks)``. Text stops at the first check at which every real row holds a stop id or
    was cancelled; with ``streams`` the checks come every :data:`STREAM_CHECK_EVERY` steps
    and hand the new ids over."""
    bsz, dev, out = batch.size, batch.device, batch.out
    # fresh contiguous (B, 1) tensors: a slice's strides would differ with the prompt
    # width or max_new_tokens, and torch.compile would recompile for each
    tok = torch.empty((bsz, 1), dtype=torch.long, device=dev)
    tok.copy_(out[:, :1])
    pos = torch.empty((bsz, 1), dtype=torch.long, device=dev)
    pos.copy_(batch.positions[:, -1:] + 1)
    done, waited = 1, 0.0
    every = STOP_CHECK_EVERY if streams is None else STREAM_CHECK_EVERY
    for i in range(1, batch.max_new):
        if compile:
            torch.compiler.cudagraph_mark_step_begin()
        bias = biases[1] if image and i >= CODES_PER_IMAGE else biases[0]
        nxt = step(model, cache, tok, batch.attn, pos, bias)
        out[:, i].copy_(nxt)  # before the next replay reuses the graph's output memory
        tok.copy_(nxt[:, None])
        pos += 1
        done = i + 1
        if not image and done % every == 0:
            tw = time.perf_counter()
            stopped = torch.isin(out[: batch.real, :done], stop_ids).any(dim=-1)
            if streams is not None:
                streams.hand_over(out[: batch.real, streams.sent : done].tolist(), done)
                stopped |= streams.stopped(dev)
            ended = bool(stopped.all())
            waited += time.perf_counter() - tw
            if ended:
                break
    return done, waited


class _Streams:
    """The own loop's hand-over of new ids to the real rows' feeds."""

    def __init__(self, feeds: Sequence[TokenFeed], real: int) -> None:
        self.feeds = list(feeds)[:real]
        self.sent = 0
        """Steps whose ids every feed has had."""

    def hand_over(self, rows: list[list[int]], done: int) -> None:
        """Give each feed its row's ids from step :attr:`sent` up to ``done``; ``rows`` are
        the real rows' ids from :attr:`sent` (or from step 0, the whole rows)."""
        for feed, ids in zip(self.feeds, rows, strict=False):
            for t in ids[len(ids) - (done - self.sent) :]:
                if not feed(int(t)) or feed.ended:
                    break
        self.sent = done

    def stopped(self, device: str) -> torch.Tensor:
        """``[real]`` booleans: the rows cancelled or failed."""
        return torch.tensor([f.stopped for f in self.feeds], dtype=torch.bool, device=device)


def to_result(
    req: GenerationRequest,
    gen: list[int],
    prompt_tokens: int,
    prefill: float,
    decode: float,
    *,
    tokenizer: LLMCXRTokenizer,
) -> GenerationResult:
    """The result of one request from its generated ids.

    Text is cut at ``req.max_new_tokens`` (a batch runs to its longest request's bound) and
    at the first ``### End``/EOS (the stop reason); image mode takes the 256 image ids.

    Raises
    ------
    RuntimeError
        Image mode produced fewer than 256 image ids.
    """
    stop = "max_new_tokens"
    if req.mode == "text":
        gen = gen[: req.max_new_tokens]  # a batch runs to its longest request's bound
    for j, t in enumerate(gen):
        if t in (END_ID, EOS_ID):
            stop = "end" if t == END_ID else "eos"
            gen = gen[:j]
            break
    text: str | None = None
    image_codes: list[int] | None = None
    if req.mode == "image":
        codes_ids = gen[:CODES_PER_IMAGE]
        if len(codes_ids) != CODES_PER_IMAGE or any(t < IMAGE_TOKEN_OFFSET for t in codes_ids):
            raise RuntimeError(f"constrained decoding produced {len(codes_ids)} image ids")
        image_codes, stop = [id_to_code(t) for t in codes_ids], "image_complete"
    else:
        text = tokenizer.decode(gen, skip_special_tokens=True).strip()
    return GenerationResult(
        token_ids=gen,
        text=text,
        image_codes=image_codes,
        prompt_tokens=prompt_tokens,
        new_tokens=len(gen),
        prefill_s=prefill,
        decode_s=decode,
        stop_reason=stop,
    )


def streamed_result(
    req: GenerationRequest,
    feed: TokenFeed,
    gen: list[int],
    prompt_tokens: int,
    prefill: float,
    decode: float,
    *,
    tokenizer: LLMCXRTokenizer,
) -> GenerationResult:
    """:func:`to_result`, or for a request its ``on_token`` cancelled the ids handed over
    (stop reason ``"cancelled"``), or for one whose callback raised an error result."""
    if feed.error is not None:
        return error_result(req, feed.error)
    if feed.cancelled:
        res = to_result(req, gen[: feed.fed], prompt_tokens, prefill, decode, tokenizer=tokenizer)
        return replace(res, stop_reason="cancelled")
    return to_result(req, gen, prompt_tokens, prefill, decode, tokenizer=tokenizer)
