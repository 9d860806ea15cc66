"""What the LLM-CXR tasks of :class:`models.runtime.LLMCXR` return and raise: a report
draft, a VQA answer, a generated image, each with its provenance; the two errors (input the
model cannot take, a backend that failed); the report's sections; the check of a model
input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from models.backends.base import GenerationResult
from models.layout import IMAGE_SIZE

__all__ = [
    "Answer",
    "GeneratedImage",
    "InferenceError",
    "ModelInputError",
    "Provenance",
    "ReportDraft",
    "check_model_input",
    "split_sections",
    "timings_of",
]

_SECTION = re.compile(r"\b(FINDINGS|IMPRESSION)\s*:", re.IGNORECASE)


class ModelInputError(ValueError):
    """The image or text given to the model is invalid (HTTP 422)."""

    http_status = 422


class InferenceError(RuntimeError):
    """The backend failed to produce a result (HTTP 500)."""

    http_status = 500


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """What produced a result: the model, whether it is the DEMO model, the prompt and
    the generation settings."""

    model_name: str
    model_version: str
    demo: bool
    prompt: str
    settings: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class ReportDraft(Provenance):
    """A generated report with its provenance.

    ``findings`` is ``None`` when the text has no ``FINDINGS:`` section; without any
    section heading the whole text is the ``impression``. ``timings`` has ``encode_s``,
    ``prefill_s``, ``decode_s``, ``prompt_tokens`` and ``tokens`` (generated tokens).
    """

    text: str
    findings: str | None
    impression: str
    timings: dict[str, float]
    stop_reason: str = ""


@dataclass(frozen=True, kw_only=True)
class Answer(Provenance):
    """A CXR-VQA answer with its provenance."""

    question: str
    text: str
    timings: dict[str, float]
    stop_reason: str = ""


@dataclass(frozen=True, kw_only=True)
class GeneratedImage(Provenance):
    """A report -> CXR result: 256 codes, the 8-bit 256x256 grey image, provenance."""

    codes: npt.NDArray[np.int64]
    image: npt.NDArray[np.uint8]
    timings: dict[str, float] = field(default_factory=dict)


def split_sections(text: str) -> tuple[str | None, str]:
    """Split a report into (findings, impression) at ``FINDINGS:`` / ``IMPRESSION:``.

    Without headings, everything is the impression (LLM-CXR's stage-2 reports are
    impressions only). Text before the first heading joins the findings.
    """
    text = text.strip()
    marks = list(_SECTION.finditer(text))
    if not marks:
        return None, text
    findings: str | None = None
    impression = ""
    preamble = text[: marks[0].start()].strip()
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        body = text[m.end() : end].strip()
        if m.group(1).upper() == "FINDINGS":
            findings = body if findings is None else f"{findings} {body}".strip()
        else:
            impression = body if not impression else f"{impression} {body}"
    if preamble:
        findings = f"{preamble} {findings or ''}".strip()
    return findings, impression


def check_model_input(image_in: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Validate one model input ``float32[3,256,256]`` in [-1, 1] (see models.preprocess)."""
    if not isinstance(image_in, np.ndarray):
        raise ModelInputError(f"model input must be a numpy array, got {type(image_in).__name__}")
    if image_in.dtype != np.float32 or image_in.shape != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ModelInputError(
            f"model input must be float32 [3, {IMAGE_SIZE}, {IMAGE_SIZE}], "
            f"got {image_in.dtype} {list(image_in.shape)}"
        )
    if not np.all(np.isfinite(image_in)) or image_in.min() < -1.001 or image_in.max() > 1.001:
        raise ModelInputError("model input must be finite and scaled to [-1, 1]")
    return image_in


def timings_of(encode_s: float, res: GenerationResult) -> dict[str, float]:
    """The ``timings`` of a result: ``encode_s`` (the image's share of the VQ-GAN encode, 0
    without an image), the backend's ``prefill_s`` and ``decode_s``, ``prompt_tokens`` and
    ``tokens`` (generated)."""
    return {
        "encode_s": encode_s,
        "prefill_s": res.prefill_s,
        "decode_s": res.decode_s,
        "prompt_tokens": float(res.prompt_tokens),
        "tokens": float(res.new_tokens),
    }
