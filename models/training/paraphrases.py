"""The instructions drawn at random in training, 10 per direction.

LLM-CXR drew each example's instruction from a set of paraphrases so that the model does
not tie a task to one wording. The first of each list is the fixed instruction that
:mod:`models.prompts` uses at inference; the others are this project's paraphrases.
"""

from __future__ import annotations

import random

from models.prompts import IMAGE_INSTRUCTION, REPORT_INSTRUCTION

__all__ = ["IMAGE_PARAPHRASES", "REPORT_PARAPHRASES", "pick"]

#: CXR -> report: the input is ``<image>``, the response the report.
REPORT_PARAPHRASES: tuple[str, ...] = (
    REPORT_INSTRUCTION,
    "Write a free-text radiology report for the given chest X-ray image.",
    "Describe the entered chest X-ray image in a free-text radiology report.",
    "Produce the radiology report for the chest radiograph provided.",
    "Read the entered chest X-ray image and write its free-text radiology report.",
    "Create the radiology report that corresponds to the given chest X-ray image.",
    "Interpret this chest X-ray image and write a free-text radiology report.",
    "Given the chest radiograph, generate the corresponding radiology report.",
    "Report on the entered chest X-ray image as a radiologist would.",
    "Generate a free-text report that describes the entered chest radiograph.",
)

#: report -> CXR: the input is the report, the response ``<image>``.
IMAGE_PARAPHRASES: tuple[str, ...] = (
    IMAGE_INSTRUCTION,
    "Generate a chest X-ray image that matches the entered free-text radiology report.",
    "Create a chest X-ray image corresponding to the given radiology report.",
    "Produce a chest radiograph consistent with the entered free-text report.",
    "Synthesize a chest X-ray image from the following free-text radiology report.",
    "Draw the chest X-ray image that the entered radiology report describes.",
    "Given the radiology report, generate the corresponding chest X-ray image.",
    "Generate a chest radiograph that fits the findings of the entered report.",
    "Make a chest X-ray image that agrees with the given free-text radiology report.",
    "From the entered radiology report, generate a matching chest X-ray image.",
)


def pick(paraphrases: tuple[str, ...], rng: random.Random | None) -> str:
    """One instruction of ``paraphrases``: drawn with ``rng``, or the first (the inference
    instruction) when ``rng`` is ``None``."""
    if rng is None:
        return paraphrases[0]
    return paraphrases[rng.randrange(len(paraphrases))]
