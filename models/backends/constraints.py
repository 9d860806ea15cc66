"""Logits processors for LLM-CXR decoding: constrained image decoding, text-only masking."""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor

from models.layout import CODES_PER_IMAGE, IMAGE_TOKEN_OFFSET, VOCAB


class ImageCodeConstraint(LogitsProcessor):
    """Allow only image ids (50281..51304) for 256 steps, then force ``close_id`` (``>``).

    The prompt must already end with ``<``; the backend appends it. Used with
    ``max_new_tokens = 257``, decoding always yields exactly 256 image codes, whatever the
    model's weights: no retry loop as in the original LLM-CXR.

    Parameters
    ----------
    prompt_len
        Length of the (padded) prompt passed to ``generate``; the step is derived from it.
    close_id
        Token forced after the 256 codes (``>``).
    """

    def __init__(self, *, prompt_len: int, close_id: int) -> None:
        self.prompt_len = prompt_len
        self.close_id = close_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.FloatTensor:  # type: ignore[override]
        step = input_ids.shape[1] - self.prompt_len
        masked = torch.full_like(scores, float("-inf"))
        if step < CODES_PER_IMAGE:
            masked[:, IMAGE_TOKEN_OFFSET:VOCAB] = scores[:, IMAGE_TOKEN_OFFSET:VOCAB]
        else:
            masked[:, self.close_id] = 0.0
        return masked  # type: ignore[return-value]


class TextOnlyConstraint(LogitsProcessor):
    """Mask image ids (and any padded rows beyond the vocabulary) in free-text decoding."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.FloatTensor:  # type: ignore[override]
        out = scores.clone()
        out[:, IMAGE_TOKEN_OFFSET:] = float("-inf")
        return out  # type: ignore[return-value]


class FirstStepTimer(LogitsProcessor):
    """Records when the first logits arrive: the end of prefill (it changes nothing)."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.FloatTensor:  # type: ignore[override]
        if self.first is None:
            self.first = time.perf_counter()
        return scores  # type: ignore[return-value]
