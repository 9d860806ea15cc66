"""The generation backend interface shared by the transformers and llama.cpp backends."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from models.layout import CODES_PER_IMAGE, END_ID, EOS_ID, VOCAB

log = logging.getLogger(__name__)

Mode = Literal["text", "image"]
StopReason = Literal["end", "eos", "max_new_tokens", "image_complete", "cancelled", "error"]
IMAGE_MODE_NEW_TOKENS = CODES_PER_IMAGE + 2
"""Image mode generates ``<`` + 256 image ids + ``>`` (``<`` is skipped if the prompt ends
with it)."""


class GenerationError(RuntimeError):
    """A generation request is invalid or the backend failed to run it."""


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One generation request.

    Parameters
    ----------
    prompt_ids
        Prompt token ids (text ids and, for CXR tasks, 256 image ids), each < 51305.
    max_new_tokens
        Upper bound of generated tokens in ``"text"`` mode (>= 1). In ``"image"`` mode the
        backend always generates ``<`` + exactly 256 image ids + ``>``; the value is ignored.
    mode
        ``"text"``: free text until ``### End`` (image ids are masked out);
        ``"image"``: constrained decoding of exactly 256 image ids (50281..51304).
    greedy
        Greedy decoding; otherwise sampling with ``temperature``/``top_p``/``top_k`` and
        ``seed`` (the original LLM-CXR defaults: 1.0 / 0.92 / 0).
    on_token
        Streaming and cancellation (``"text"`` mode; ignored in ``"image"`` mode): called
        in the generating thread with each generated id, in order, as soon as the backend
        has it, up to and including the stop id that ends the request, and never after the
        request has ended (the transformers backend's own CUDA loop hands them over at its
        stop checks). Returning ``False`` ends this request only, as soon as possible
        (other requests of its batch go on unchanged), with stop reason ``"cancelled"`` and
        the ids handed over so far, the last one included. A callback that raises ends
        its request with stop reason ``"error"``. Not part of :meth:`settings`.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    mode: Mode = "text"
    greedy: bool = True
    seed: int | None = None
    temperature: float = 1.0
    top_p: float = 0.92
    top_k: int = 0
    on_token: Callable[[int], bool] | None = field(default=None, compare=False, repr=False)

    def validate(self) -> None:
        """Raise :class:`GenerationError` naming the first bad field."""
        if not self.prompt_ids:
            raise GenerationError("prompt_ids is empty")
        bad = [i for i in self.prompt_ids if not 0 <= int(i) < VOCAB]
        if bad:
            raise GenerationError(f"prompt_ids has {len(bad)} id(s) outside 0..{VOCAB - 1}")
        if self.mode not in ("text", "image"):
            raise GenerationError(f"mode must be 'text' or 'image', got {self.mode!r}")
        if self.mode == "text" and self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy:
            if not self.temperature > 0:
                raise GenerationError(f"temperature must be > 0, got {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise GenerationError(f"top_k must be >= 0, got {self.top_k}")

    def settings(self) -> dict[str, Any]:
        """The generation settings (without the prompt) for provenance records."""
        return {
            "mode": self.mode,
            "max_new_tokens": self.max_new_tokens,
            "greedy": self.greedy,
            "seed": self.seed,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """The outcome of one request.

    ``token_ids`` are the generated ids only (not the prompt), up to and excluding the stop
    token. ``text`` is their decoded text (``"text"`` mode); ``image_codes`` the 256 codes
    (``"image"`` mode). ``stop_reason``: ``"end"`` (``### End``), ``"eos"``,
    ``"max_new_tokens"``, ``"image_complete"``, ``"cancelled"`` (the request's
    ``on_token`` asked to stop) or ``"error"`` (then ``error`` says why and
    the other requests of the batch are unaffected).
    """

    token_ids: list[int]
    text: str | None
    image_codes: list[int] | None
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    stop_reason: str
    error: str | None = None


@runtime_checkable
class GenerationBackend(Protocol):
    """What every backend implements (transformers, llama.cpp)."""

    def load(self) -> None:
        """Load weights and check the token layout; idempotent."""
        ...

    def warmup(self) -> None:
        """Run a tiny generation so that the first real request is not slow."""
        ...

    def health(self) -> dict[str, Any]:
        """A JSON-able status: loaded, device, dtype, model path, counters."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run the requests (as one batch where possible); one result per request, in order."""
        ...


def error_result(request: GenerationRequest, message: str) -> GenerationResult:
    """The result for a request that failed validation."""
    return GenerationResult(
        token_ids=[],
        text=None,
        image_codes=None,
        prompt_tokens=len(request.prompt_ids),
        new_tokens=0,
        prefill_s=0.0,
        decode_s=0.0,
        stop_reason="error",
        error=message,
    )


class TokenFeed:
    """Hands one request's generated ids to its ``on_token`` and records how that ended.

    Both backends drive one per request (see :attr:`GenerationRequest.on_token`): call it
    with each generated id in order, the stop id included; it calls the callback while the
    request runs (never past ``max_new_tokens`` ids, never after a stop id, a cancel or a
    failure) and answers whether the request goes on. A request without a callback, or in
    ``"image"`` mode, is never stopped by it.

    Attributes
    ----------
    fed
        Ids handed to the callback so far.
    cancelled
        The callback returned ``False`` for an id that was not a stop id.
    error
        Why the request failed (the callback raised), else ``None``.
    """

    def __init__(self, request: GenerationRequest) -> None:
        self.callback = request.on_token if request.mode == "text" else None
        self.limit = request.max_new_tokens
        self.fed = 0
        self.ended = self.callback is None
        self.cancelled = False
        self.error: str | None = None

    @property
    def stopped(self) -> bool:
        """Whether the request was cancelled or failed (rather than ending by itself)."""
        return self.cancelled or self.error is not None

    def __call__(self, token_id: int) -> bool:
        """Hand over the next generated id; ``False`` when the request is to stop now."""
        if self.ended or self.callback is None:
            return not self.stopped
        self.fed += 1
        stop_id = token_id in (END_ID, EOS_ID)
        try:
            keep = bool(self.callback(int(token_id)))
        except Exception as exc:  # the caller's code: its request fails, not the batch
            log.warning("a token callback raised %s: its request ends", type(exc).__name__)
            self.error = f"the token callback raised {type(exc).__name__}"
            self.ended = True
            return False
        if stop_id or self.fed >= self.limit:
            self.ended = True
        if not keep and not stop_id:
            self.cancelled = self.ended = True
            return False
        return True
