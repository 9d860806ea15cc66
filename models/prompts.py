"""Dolly-v2 prompt template as used by LLM-CXR, one fixed instruction per task."""

from __future__ import annotations

from enum import StrEnum

from models.layout import (
    END_MARKER,
    IMAGE_PLACEHOLDER,
    INPUT_KEY,
    INSTRUCTION_MARKER,
    RESPONSE_MARKER,
)

INTRO_BLURB = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
REPORT_INSTRUCTION = "Generate free-text radiology reports for the entered chest X-ray images."
IMAGE_INSTRUCTION = (
    "Generate a chest X-ray image that corresponds to the entered free-text radiology "
    "reports for the chest X-ray image."
)


class Task(StrEnum):
    """The LLM-CXR tasks the node runs."""

    REPORT = "report"
    VQA = "vqa"
    REPORT_TO_IMAGE = "report_to_image"
    INSTRUCT = "instruct"


class PromptError(ValueError):
    """A prompt cannot be built from the given parts."""


def format_prompt(instruction: str, input_text: str | None = None) -> str:
    """Dolly's template: intro, ``### Instruction:``, optional ``Input:`` block, response key.

    Parameters
    ----------
    instruction
        The instruction (for VQA: the question itself).
    input_text
        The input (``<image>`` for CXR tasks, the report for report->CXR); ``None`` or empty
        leaves the ``Input:`` block out, as in dolly.

    Returns
    -------
    str
        The prompt, ending with ``### Response:\\n``.
    """
    instruction = instruction.strip()
    if not instruction:
        raise PromptError("the instruction is empty")
    parts = [INTRO_BLURB, "", INSTRUCTION_MARKER, instruction, ""]
    if input_text is not None and input_text.strip():
        parts += [INPUT_KEY, input_text.strip(), ""]
    return "\n".join(parts) + "\n" + RESPONSE_MARKER


def report_prompt() -> str:
    """CXR -> report prompt (input ``<image>``)."""
    return format_prompt(REPORT_INSTRUCTION, IMAGE_PLACEHOLDER)


def vqa_prompt(question: str) -> str:
    """CXR-VQA prompt: the question is the instruction, the image the input."""
    if IMAGE_PLACEHOLDER in question:
        raise PromptError(f"the question must not contain {IMAGE_PLACEHOLDER}")
    return format_prompt(question, IMAGE_PLACEHOLDER)


def report_to_image_prompt(report: str) -> str:
    """Report -> CXR prompt: the report text is the input; the response is ``<image>``."""
    if not report.strip():
        raise PromptError("the report text is empty")
    if IMAGE_PLACEHOLDER in report:
        raise PromptError(f"the report must not contain {IMAGE_PLACEHOLDER}")
    return format_prompt(IMAGE_INSTRUCTION, report)


def training_text(prompt: str, response: str) -> str:
    """A full training example: prompt + response + ``\\n\\n### End``."""
    return f"{prompt}{response}\n\n{END_MARKER}"


def extract_response(text: str) -> str:
    """The text between the last ``### Response:\\n`` and the next ``### End`` (or the end).

    A text without the response marker is taken as the response itself (backends return
    only the generated part).
    """
    idx = text.rfind(RESPONSE_MARKER)
    if idx >= 0:
        text = text[idx + len(RESPONSE_MARKER) :]
    end = text.find(END_MARKER)
    if end >= 0:
        text = text[:end]
    return text.strip()
