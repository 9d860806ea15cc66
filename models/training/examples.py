"""One training example: token ids and labels, built as the runtime builds its prompts.

An example is ``training_text(prompt, response)`` (dolly's template, ``\\n\\n### End``
after the response), tokenized as a whole with :meth:`LLMCXRTokenizer.encode_with_image`,
so ``<image>`` becomes ``<`` + the image's 256 ids + ``>`` exactly as in
:class:`models.runtime.LLMCXR`. The labels are ``-100`` on every prompt token (up to and
including ``"### Response:\\n"``), so the loss is on the response and ``### End`` only.

An example longer than ``max_length`` is cut at the end, never inside an image (the cut
moves before the image's ``<``); an example with no response token left is dropped
(``None``). General instruction data (dolly-15k style JSON Lines with ``instruction``,
optional ``context`` and ``response``) is read by :func:`read_general`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models.jsonl import json_lines
from models.layout import IMAGE_PLACEHOLDER, is_image_id
from models.prompts import format_prompt, training_text, vqa_prompt
from models.text import LLMCXRTokenizer
from models.training.paraphrases import IMAGE_PARAPHRASES, REPORT_PARAPHRASES, pick

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "ExampleError",
    "GeneralItem",
    "build_example",
    "general_example",
    "image_example",
    "image_spans",
    "read_general",
    "report_example",
    "vqa_example",
]

#: Label of tokens without loss (PyTorch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100


class ExampleError(ValueError):
    """An example or a general-data line cannot be built (the message says where)."""


@dataclass(frozen=True)
class Example:
    """Token ids and labels of one example (``IGNORE_INDEX`` on the prompt)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def attention_mask(self) -> list[int]:
        """All ones (padding is added by the collator)."""
        return [1] * len(self.input_ids)

    @property
    def prompt_len(self) -> int:
        """Tokens before the first supervised one."""
        return next(i for i, v in enumerate(self.labels) if v != IGNORE_INDEX)

    def to_features(self) -> dict[str, list[int]]:
        """``input_ids``, ``labels`` and ``attention_mask`` lists."""
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "attention_mask": self.attention_mask,
        }


@dataclass(frozen=True)
class GeneralItem:
    """One general instruction-following example (dolly-15k's fields)."""

    instruction: str
    response: str
    context: str | None = None


def image_spans(ids: Sequence[int], open_id: int, close_id: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every image in ``ids``: its run of image ids with the ``<``
    before and the ``>`` after it when present."""
    spans = []
    i, n = 0, len(ids)
    while i < n:
        if not is_image_id(ids[i]):
            i += 1
            continue
        j = i
        while j < n and is_image_id(ids[j]):
            j += 1
        start = i - 1 if i > 0 and ids[i - 1] == open_id else i
        end = j + 1 if j < n and ids[j] == close_id else j
        spans.append((start, end))
        i = j
    return spans


def _cut(ids: Sequence[int], max_length: int, open_id: int, close_id: int) -> int:
    for start, end in image_spans(ids, open_id, close_id):
        if start < max_length < end:
            return start
    return max_length


def build_example(
    tok: LLMCXRTokenizer,
    prompt: str,
    response: str,
    *,
    codes: Sequence[int] | None = None,
    max_length: int = 2048,
) -> Example | None:
    """The example of ``prompt`` + ``response`` (``codes`` fill the one ``<image>``).

    Returns
    -------
    Example or None
        ``None`` when cutting to ``max_length`` leaves no response token.

    Raises
    ------
    ExampleError
        The prompt does not tokenize as a prefix of the whole text.
    models.layout.TokenLayoutError
        ``<image>`` is missing with ``codes``, repeated, or present without ``codes``.
    """
    text = training_text(prompt, response)
    ids = tok.encode_with_image(text, codes)
    prompt_codes = codes if IMAGE_PLACEHOLDER in prompt else None
    prompt_ids = tok.encode_with_image(prompt, prompt_codes)
    n = len(prompt_ids)
    if ids[:n] != prompt_ids:
        raise ExampleError("the prompt does not tokenize as a prefix of the example")
    labels = [IGNORE_INDEX] * n + ids[n:]
    if len(ids) > max_length:
        cut = _cut(ids, max_length, tok.image_open_id, tok.image_close_id)
        ids, labels = ids[:cut], labels[:cut]
    if all(v == IGNORE_INDEX for v in labels):
        return None
    return Example(input_ids=ids, labels=labels)


def report_example(
    tok: LLMCXRTokenizer,
    codes: Sequence[int],
    report: str,
    *,
    max_length: int = 2048,
    rng: random.Random | None = None,
) -> Example | None:
    """CXR -> report: a report paraphrase (the inference one when ``rng`` is ``None``),
    input ``<image>``, response the report."""
    prompt = format_prompt(pick(REPORT_PARAPHRASES, rng), IMAGE_PLACEHOLDER)
    return build_example(tok, prompt, report.strip(), codes=codes, max_length=max_length)


def image_example(
    tok: LLMCXRTokenizer,
    codes: Sequence[int],
    report: str,
    *,
    max_length: int = 2048,
    rng: random.Random | None = None,
) -> Example | None:
    """Report -> CXR: an image paraphrase, input the report, response ``<image>``."""
    if IMAGE_PLACEHOLDER in report:
        raise ExampleError(f"the report contains {IMAGE_PLACEHOLDER}")
    prompt = format_prompt(pick(IMAGE_PARAPHRASES, rng), report)
    return build_example(tok, prompt, IMAGE_PLACEHOLDER, codes=codes, max_length=max_length)


def vqa_example(
    tok: LLMCXRTokenizer,
    codes: Sequence[int],
    question: str,
    answer: str,
    *,
    max_length: int = 2048,
) -> Example | None:
    """CXR-VQA: the question is the instruction, ``<image>`` the input, the answer the
    response."""
    return build_example(
        tok, vqa_prompt(question), answer.strip(), codes=codes, max_length=max_length
    )


def general_example(
    tok: LLMCXRTokenizer, item: GeneralItem, *, max_length: int = 2048
) -> Example | None:
    """A general instruction example (no image; ``context`` is the ``Input:`` block)."""
    parts = (item.instruction, item.response, item.context or "")
    if any(IMAGE_PLACEHOLDER in p for p in parts):
        raise ExampleError(f"a general example contains {IMAGE_PLACEHOLDER}")
    prompt = format_prompt(item.instruction, item.context)
    return build_example(tok, prompt, item.response.strip(), max_length=max_length)


def _general_item(obj: object, where: str) -> GeneralItem:
    if not isinstance(obj, dict):
        raise ExampleError(f"{where}: a line must be a JSON object")
    values = {}
    for key in ("instruction", "response"):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ExampleError(f"{where}: {key!r} must be a non-empty string")
        values[key] = value
    context = obj.get("context")
    if context is not None and not isinstance(context, str):
        raise ExampleError(f"{where}: 'context' must be a string")
    return GeneralItem(values["instruction"], values["response"], context or None)


def read_general(path: Path | str) -> list[GeneralItem]:
    """Read general instruction data (JSON Lines, dolly-15k's ``instruction``, ``context``,
    ``response``; other keys such as ``category`` are ignored; blank lines skipped).

    Raises
    ------
    ExampleError
        A malformed line (named), or no item at all.
    OSError
        The file cannot be read.
    """
    path = Path(path)
    items = [
        _general_item(obj, where)
        for where, _number, obj in json_lines(path.read_bytes(), path, ExampleError)
    ]
    if not items:
        raise ExampleError(f"{path}: no general examples")
    return items
