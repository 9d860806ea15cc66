"""Talking about a CXR: multi-turn conversation, plain-language summaries, streamed text.

LLM-CXR was instruction-tuned on single turns in dolly-v2's template
(:func:`models.prompts.format_prompt`): an instruction, an optional ``Input:`` block and
``### Response:``, and in training the response followed by ``### End``. A conversation is
rendered as the sequence of its turns in that same template, each earlier turn complete
(prompt, answer, ``### End``), then the current question ending at ``### Response:``. The
image goes once, as the ``Input:`` of the first turn kept, so its 256 tokens are always in
the prompt whatever is dropped. When the prompt and ``max_new_tokens`` would not fit in
LLM-CXR's 2,048 positions, the oldest turns are dropped first and the caller is told how
many (:attr:`ChatPrompt.dropped_turns`).

A summary rewrites a report (a draft or a pasted one) in plain language for the referring
clinician or for the patient, as XrayGPT's interactive summaries do: a text-only turn with
a fixed instruction per audience and the report as its input.

Streaming: ``on_text(delta)`` gets the newly decoded visible text as tokens arrive (never
the ``### End`` marker, never half a UTF-8 character); the deltas add up to the answer's
text. Returning ``False`` stops the generation (``stop_reason == "cancelled"``) with the
text so far. Backends that cannot stream deliver the whole text as one delta at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from models.layout import END_ID, END_MARKER, EOS_ID, IMAGE_PLACEHOLDER
from models.prompts import PromptError, format_prompt

if TYPE_CHECKING:
    from models.runtime import LLMCXR
    from models.text import LLMCXRTokenizer

__all__ = [
    "CONTEXT_TOKENS",
    "SUMMARY_INSTRUCTIONS",
    "ChatAnswer",
    "ChatPrompt",
    "ChatTurn",
    "build_chat_prompt",
    "chat",
    "summarize",
]

CONTEXT_TOKENS = 2048
"""LLM-CXR's maximum length (prompt and answer), as trained."""

SUMMARY_INSTRUCTIONS: dict[str, str] = {
    "clinician": (
        "Rewrite this chest X-ray report in plain language for the referring clinician, "
        "keeping every finding and its certainty."
    ),
    "patient": (
        "Rewrite this chest X-ray report in plain language for the patient, avoiding "
        "medical jargon and explaining what each finding means."
    ),
}


@dataclass(frozen=True)
class ChatTurn:
    """An earlier turn: the question and the answer the model gave."""

    question: str
    answer: str


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation's prompt: its text (``<image>`` placeholder), token ids (256 image
    ids in place of the placeholder) and how many oldest turns were left out."""

    text: str
    ids: list[int]
    dropped_turns: int


@dataclass(frozen=True)
class ChatAnswer:
    """One answer with its provenance; ``text`` is AI generated and unverified."""

    text: str
    dropped_turns: int
    stop_reason: str
    prompt_tokens: int
    new_tokens: int
    model_name: str
    model_version: str
    demo: bool
    timings: dict[str, float]


def _turn(question: str, answer: str | None, *, image: bool) -> str:
    prompt = format_prompt(question, IMAGE_PLACEHOLDER if image else None)
    return prompt if answer is None else f"{prompt}{answer.strip()}\n\n{END_MARKER}\n\n"


def build_chat_prompt(
    tokenizer: LLMCXRTokenizer,
    image_codes: Sequence[int] | None,
    history: Sequence[ChatTurn],
    question: str,
    *,
    max_new_tokens: int,
    context_tokens: int = CONTEXT_TOKENS,
) -> ChatPrompt:
    """The prompt of ``question`` after ``history``, oldest turns dropped to fit.

    Parameters
    ----------
    tokenizer
        The LLM-CXR tokenizer (``encode_with_image``).
    image_codes
        The image's 256 VQ-GAN codes, or ``None`` for a text-only conversation.
    history
        Earlier turns, oldest first.
    question
        This turn's question (the instruction).
    max_new_tokens
        Room kept for the answer.
    context_tokens
        The model's positions (2,048 for LLM-CXR).

    Raises
    ------
    PromptError
        The question is empty, or this turn alone (with the image) does not fit.
    """
    if not question.strip():
        raise PromptError("the question is empty")
    image = image_codes is not None
    codes = [int(c) for c in image_codes] if image_codes is not None else None
    for dropped in range(len(history) + 1):
        kept = history[dropped:]
        blocks = [_turn(t.question, t.answer, image=image and k == 0) for k, t in enumerate(kept)]
        blocks.append(_turn(question, None, image=image and not kept))
        text = "".join(blocks)
        ids = tokenizer.encode_with_image(text, codes)
        if len(ids) + max_new_tokens <= context_tokens:
            return ChatPrompt(text=text, ids=ids, dropped_turns=dropped)
    raise PromptError(
        f"the question does not fit: {len(ids)} prompt tokens + {max_new_tokens} for the "
        f"answer exceed the model's {context_tokens} positions"
    )


class _Streamer:
    """Turns generated ids into visible text deltas for ``on_text``.

    Decodes the ids so far, holds back an incomplete UTF-8 tail (U+FFFD at the end) and
    any suffix that may be the start of ``### End``; stops at a stop id.
    """

    def __init__(self, tokenizer: LLMCXRTokenizer, on_text: Callable[[str], bool]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.sent = ""
        self.ended = False

    def visible(self, *, final: bool) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cut = text.find(END_MARKER)
        if cut >= 0:
            return text[:cut].rstrip()
        if final:
            return text.rstrip()
        text = text.rstrip("\ufffd")
        for k in range(min(len(END_MARKER), len(text)), 0, -1):
            if END_MARKER.startswith(text[-k:].lstrip()) and text[-k:].strip():
                return text[:-k]
        return text.rstrip()

    def emit(self, text: str) -> bool:
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return True
        delta, self.sent = text[len(self.sent) :], text
        return bool(self.on_text(delta))

    def __call__(self, token_id: int) -> bool:
        if self.ended or token_id in (END_ID, EOS_ID):
            self.ended = True
            return True
        self.ids.append(token_id)
        return self.emit(self.visible(final=False))

    def finish(self, final_text: str) -> None:
        """Send what is left of ``final_text`` (the whole text when nothing streamed)."""
        self.emit(final_text)


def _run(
    runtime: LLMCXR,
    prompt_ids: list[int],
    *,
    max_new_tokens: int | None,
    greedy: bool | None,
    seed: int | None,
    on_text: Callable[[str], bool] | None,
) -> tuple[str, str, int, int, dict[str, float]]:
    """Generate text for ``prompt_ids``: ``(text, stop_reason, prompt_tokens, new_tokens,
    timings)``, streaming to ``on_text``. A cancelled answer is the text streamed so far."""
    streamer = _Streamer(runtime.tokenizer, on_text) if on_text is not None else None
    text, res = runtime.generate_text(
        prompt_ids,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        seed=seed,
        on_token=streamer,
    )
    if streamer is not None:
        if res.stop_reason == "cancelled":
            text = streamer.sent
        else:
            streamer.finish(text)
    timings = {
        "prefill_s": res.prefill_s,
        "decode_s": res.decode_s,
        "prompt_tokens": float(res.prompt_tokens),
        "tokens": float(res.new_tokens),
    }
    return text, res.stop_reason, res.prompt_tokens, res.new_tokens, timings


def chat(
    runtime: LLMCXR,
    image_in: npt.NDArray[np.float32] | None,
    history: Sequence[ChatTurn],
    question: str,
    *,
    image_codes: Sequence[int] | None = None,
    on_text: Callable[[str], bool] | None = None,
    max_new_tokens: int | None = None,
    greedy: bool | None = None,
    seed: int | None = None,
) -> ChatAnswer:
    """Answer ``question`` about the image after ``history`` (see the module text).

    Parameters
    ----------
    runtime
        The loaded model.
    image_in
        The model input ``[3, 256, 256]`` (encoded here), or ``None`` with ``image_codes``
        (already encoded) or for a text-only conversation.
    history
        Earlier turns, oldest first.
    question
        This turn's question.
    on_text
        Streams the answer (see the module text); returning ``False`` cancels.
    max_new_tokens, greedy, seed
        As for :meth:`models.runtime.LLMCXR.vqa` (defaults from the bundle).

    Raises
    ------
    models.runtime.ModelInputError
        An empty question, or one that does not fit the context with the image.
    """
    from models.runtime import ModelInputError

    t0 = time.perf_counter()
    codes = image_codes
    if codes is None and image_in is not None:
        codes = [int(c) for c in runtime.encode_images([image_in])[0]]
    encode_s = time.perf_counter() - t0
    budget = int(max_new_tokens or runtime.defaults.get("vqa_max_new_tokens", 128))
    try:
        prompt = build_chat_prompt(
            runtime.tokenizer, codes, history, question, max_new_tokens=budget
        )
    except PromptError as exc:
        raise ModelInputError(str(exc)) from exc
    text, stop, prompt_tokens, new_tokens, timings = _run(
        runtime,
        prompt.ids,
        max_new_tokens=budget,
        greedy=greedy,
        seed=seed,
        on_text=on_text,
    )
    return ChatAnswer(
        text=text,
        dropped_turns=prompt.dropped_turns,
        stop_reason=stop,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        model_name=runtime.model_name,
        model_version=runtime.model_version,
        demo=runtime.bundle.demo,
        timings={"encode_s": encode_s, **timings},
    )


def summarize(
    runtime: LLMCXR,
    report: str,
    *,
    audience: Literal["clinician", "patient"],
    on_text: Callable[[str], bool] | None = None,
    max_new_tokens: int | None = None,
) -> ChatAnswer:
    """A plain-language summary of ``report`` for ``audience`` (text only, streamed).

    Raises
    ------
    models.runtime.ModelInputError
        An empty report, an unknown audience, or a report too long for the context.
    """
    from models.runtime import ModelInputError

    if audience not in SUMMARY_INSTRUCTIONS:
        raise ModelInputError(f"audience must be clinician or patient, got {audience!r}")
    if not report.strip():
        raise ModelInputError("the report is empty")
    budget = int(max_new_tokens or runtime.defaults.get("vqa_max_new_tokens", 128))
    prompt = format_prompt(SUMMARY_INSTRUCTIONS[audience], report)
    ids = runtime.tokenizer.encode_with_image(prompt, None)
    if len(ids) + budget > CONTEXT_TOKENS:
        raise ModelInputError(
            f"the report is too long to summarize: {len(ids)} tokens + {budget} for the "
            f"summary exceed {CONTEXT_TOKENS}"
        )
    text, stop, prompt_tokens, new_tokens, timings = _run(
        runtime,
        ids,
        max_new_tokens=budget,
        greedy=None,
        seed=None,
        on_text=on_text,
    )
    return ChatAnswer(
        text=text,
        dropped_turns=0,
        stop_reason=stop,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        model_name=runtime.model_name,
        model_version=runtime.model_version,
        demo=runtime.bundle.demo,
        timings=timings,
    )
