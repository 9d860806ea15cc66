"""Talking about a CXR: multi-turn conversation, plain-language summaries, streamed text.

Prompt design
-------------
LLM-CXR was instruction-tuned on single turns in dolly-v2's template
(:func:`models.prompts.format_prompt`): the intro, ``### Instruction:`` and the
instruction, an optional ``Input:`` block, ``### Response:``, and in training the response
followed by ``### End`` (:func:`models.prompts.training_text`). A conversation is the
sequence of its turns in that same template, each earlier turn a complete training example
(its prompt with the question as the instruction, the answer given, ``### End``, a blank
line), then the current question as ``format_prompt(question, input)`` ending at
``### Response:``, so the model continues with a response as it was trained to::

    <intro> ### Instruction: Q1  Input: <image>  ### Response: A1  ### End
    <intro> ### Instruction: Q2                  ### Response: A2  ### End
    <intro> ### Instruction: Q3                  ### Response:

The image goes once, as the ``Input:`` of the first turn kept (the current turn's when
there is no history), its ``<image>`` placeholder replaced by the 256 image ids
(:meth:`models.text.LLMCXRTokenizer.encode_with_image`). With no history the prompt is
exactly :func:`models.prompts.vqa_prompt`'s, so the first answer is
:meth:`models.runtime.LLMCXR.vqa`'s. Without an image (a text-only conversation) no turn
has an ``Input:`` block.

The window: LLM-CXR has 2,048 positions (:data:`CONTEXT_TOKENS`) for the prompt and the
answer. When the prompt and ``max_new_tokens`` would not fit, the oldest turns are dropped
first, the fewest that make it fit, and the caller is told how many
(:attr:`ChatPrompt.dropped_turns`); the image stays. When even the current turn alone
(with the image) does not fit, the question is refused.

A summary rewrites a report (a draft or a pasted one) in plain language for the referring
clinician or for the patient, as XrayGPT's interactive summaries do: one text-only turn
with a fixed instruction per audience (:data:`SUMMARY_INSTRUCTIONS`) and the report as its
input.

Streaming
---------
``on_text(delta)`` gets the answer's visible text as it is generated
(:class:`models.text_stream.TextStream`); returning ``False`` cancels
(``stop_reason == "cancelled"``, the answer is the text sent so far); an exception raised
by ``on_text`` stops the generation and is raised again by :func:`chat` / :func:`summarize`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from models.layout import (
    END_MARKER,
    IMAGE_PLACEHOLDER,
    TokenLayoutError,
    codes_to_ids,
)
from models.prompts import PromptError, format_prompt
from models.results import ModelInputError, timings_of
from models.text_stream import TextStream

if TYPE_CHECKING:
    from models.backends.base import GenerationResult
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
    "context_window",
    "summarize",
    "summary_prompt",
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
    """One answer with its provenance; ``text`` is AI generated and unverified.

    ``stop_reason``: ``"end"`` (``### End``), ``"eos"``, ``"max_new_tokens"``,
    ``"cancelled"`` (``on_text`` returned ``False``; ``text`` is what was sent) or
    ``"error"``. ``timings``: ``encode_s`` (0 with cached codes), ``prefill_s``,
    ``decode_s``, ``prompt_tokens``, ``tokens``.
    """

    text: str
    dropped_turns: int
    stop_reason: str
    prompt_tokens: int
    new_tokens: int
    model_name: str
    model_version: str
    demo: bool
    timings: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)
    """The generation settings and backend (as :attr:`models.results.Answer.settings`)."""


def _turn(question: str, answer: str | None, *, image: bool) -> str:
    """One turn in the template: the prompt, and for an earlier turn its answer and
    ``### End``."""
    prompt = format_prompt(question, IMAGE_PLACEHOLDER if image else None)
    return prompt if answer is None else f"{prompt}{answer.strip()}\n\n{END_MARKER}\n\n"


def _earlier(text: str) -> str:
    """An earlier turn's text with any ``<image>`` written as ``image`` (a prompt holds the
    placeholder once: the image's)."""
    return text.replace(IMAGE_PLACEHOLDER, "image")


def build_chat_prompt(
    tokenizer: LLMCXRTokenizer,
    image_codes: Sequence[int] | None,
    history: Sequence[ChatTurn],
    question: str,
    *,
    max_new_tokens: int,
    context_tokens: int = CONTEXT_TOKENS,
) -> ChatPrompt:
    """The prompt of ``question`` after ``history``, oldest turns dropped to fit (see the
    module text).

    Parameters
    ----------
    tokenizer
        The LLM-CXR tokenizer (``encode``, ``encode_with_image``).
    image_codes
        The image's 256 VQ-GAN codes (0..1023), or ``None`` for a text-only conversation.
    history
        Earlier turns, oldest first.
    question
        This turn's question (the instruction).
    max_new_tokens
        Room kept for the answer.
    context_tokens
        The positions for prompt and answer (2,048 for LLM-CXR; less where the backend
        has fewer, :func:`context_window`).

    Returns
    -------
    ChatPrompt
        ``ids`` has ``len(ids) + max_new_tokens <= context_tokens``; ``dropped_turns`` is
        the fewest oldest turns left out for that.

    Raises
    ------
    PromptError
        The question is empty or holds ``<image>``, the codes are not an image's, or this
        turn alone (with the image) does not fit.
    """
    if not question.strip():
        raise PromptError("the question is empty")
    if IMAGE_PLACEHOLDER in question:
        raise PromptError(f"the question must not contain {IMAGE_PLACEHOLDER}")
    if max_new_tokens < 0:
        raise PromptError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    codes = [int(c) for c in image_codes] if image_codes is not None else None
    if codes is not None:
        try:
            codes_to_ids(codes)
        except TokenLayoutError as exc:
            raise PromptError(str(exc)) from exc
    image = codes is not None
    turns = [(_earlier(t.question), _earlier(t.answer)) for t in history]
    room = context_tokens - max_new_tokens

    def build(dropped: int) -> tuple[str, list[int]]:
        kept = turns[dropped:]
        blocks = [_turn(q, a, image=image and k == 0) for k, (q, a) in enumerate(kept)]
        blocks.append(_turn(question, None, image=image and not kept))
        text = "".join(blocks)
        return text, tokenizer.encode_with_image(text, codes)

    alone_text, alone_ids = build(len(turns))  # this turn alone, with the image
    if len(alone_ids) > room:
        raise PromptError(
            f"the question does not fit: {len(alone_ids)} prompt tokens + {max_new_tokens} "
            f"for the answer exceed the model's {context_tokens} positions"
        )
    # Where to start: with each earlier turn tokenized alone (joined, a seam takes a token
    # more), no fewer dropped turns than this estimate can fit; one less is tried too.
    start, total = len(turns), len(alone_ids)
    for dropped in range(len(turns) - 1, -1, -1):
        total += len(tokenizer.encode(_turn(*turns[dropped], image=False)))
        if total > room:
            break
        start = dropped
    for dropped in range(max(0, start - 1), len(turns)):
        text, ids = build(dropped)
        if len(ids) <= room:
            return ChatPrompt(text=text, ids=ids, dropped_turns=dropped)
    return ChatPrompt(text=alone_text, ids=alone_ids, dropped_turns=len(turns))


def context_window(runtime: LLMCXR) -> int:
    """The positions a conversation may use with ``runtime``: :data:`CONTEXT_TOKENS`, or
    fewer where the backend has fewer per sequence (llama.cpp's ``n_ctx``)."""
    n_ctx = getattr(runtime.backend, "n_ctx", None)
    if isinstance(n_ctx, int) and 0 < n_ctx < CONTEXT_TOKENS:
        return n_ctx
    return CONTEXT_TOKENS


def _run(
    runtime: LLMCXR,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    greedy: bool | None,
    seed: int | None,
    on_text: Callable[[str], bool] | None,
) -> tuple[str, GenerationResult]:
    """Generate text for ``prompt_ids`` streaming to ``on_text``: the answer's text and the
    backend's result. A cancelled answer is the text sent so far."""
    streamer = TextStream(runtime.tokenizer, on_text) if on_text is not None else None
    text, res = runtime.generate_text(
        prompt_ids,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        seed=seed,
        on_token=streamer,
    )
    if streamer is None:
        return text, res
    if streamer.error is not None:
        raise streamer.error
    if res.stop_reason == "cancelled":
        return streamer.sent, res
    text = streamer.finish(text)
    if streamer.error is not None:  # raised by the last delta
        raise streamer.error
    return text, res


def _answer(
    runtime: LLMCXR,
    prompt_ids: list[int],
    *,
    dropped_turns: int,
    encode_s: float,
    max_new_tokens: int,
    greedy: bool | None,
    seed: int | None,
    on_text: Callable[[str], bool] | None,
) -> ChatAnswer:
    """Generate, and the answer with its provenance (settings as the runtime records
    them for its own tasks)."""
    text, res = _run(
        runtime,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        seed=seed,
        on_text=on_text,
    )
    req = runtime._request(
        prompt_ids,
        mode="text",
        max_new_tokens=max_new_tokens,
        default_key="vqa_max_new_tokens",
        greedy=greedy,
        seed=seed,
    )
    return ChatAnswer(
        text=text,
        dropped_turns=dropped_turns,
        stop_reason=res.stop_reason,
        prompt_tokens=res.prompt_tokens,
        new_tokens=res.new_tokens,
        model_name=runtime.model_name,
        model_version=runtime.model_version,
        demo=runtime.bundle.demo,
        timings=timings_of(encode_s, res),
        settings=runtime._settings(req),
    )


def _budget(runtime: LLMCXR, max_new_tokens: int | None) -> int:
    """``max_new_tokens``, or the bundle's default for VQA answers."""
    if max_new_tokens is None:
        return int(runtime.defaults.get("vqa_max_new_tokens", 128))
    if max_new_tokens < 1:
        raise ModelInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return int(max_new_tokens)


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
    context_tokens: int | None = None,
    on_dropped: Callable[[int], object] | None = None,
) -> ChatAnswer:
    """Answer ``question`` about the image after ``history`` (see the module text).

    Parameters
    ----------
    runtime
        The loaded model.
    image_in
        The model input ``[3, 256, 256]`` (encoded here), or ``None`` with ``image_codes``
        or for a text-only conversation.
    history
        Earlier turns, oldest first.
    question
        This turn's question.
    image_codes
        The image's 256 codes already encoded (a conversation keeps them); used instead of
        ``image_in``.
    on_text
        Streams the answer's text (see the module text); returning ``False`` cancels.
    max_new_tokens, greedy, seed
        As for :meth:`models.runtime.LLMCXR.vqa` (defaults from the bundle).
    context_tokens
        The window; default :func:`context_window`.
    on_dropped
        Called with the number of oldest turns left out to fit the window, before the
        answer is generated, when there are any (:attr:`ChatAnswer.dropped_turns` says it
        again after).

    Returns
    -------
    ChatAnswer
        With no history, greedy, the text of :meth:`models.runtime.LLMCXR.vqa`.

    Raises
    ------
    models.results.ModelInputError
        An empty question or one holding ``<image>``, an invalid image or codes, a bad
        ``max_new_tokens``, or a turn that does not fit the window with the image.
    models.results.InferenceError
        The backend failed.
    Exception
        Whatever ``on_text`` raised (the generation is stopped first).
    """
    budget = _budget(runtime, max_new_tokens)
    window = context_window(runtime) if context_tokens is None else context_tokens
    t0 = time.perf_counter()
    codes = image_codes
    if codes is None and image_in is not None:
        codes = [int(c) for c in runtime.encode_images([image_in])[0]]
    encode_s = time.perf_counter() - t0 if image_codes is None else 0.0
    try:
        prompt = build_chat_prompt(
            runtime.tokenizer,
            codes,
            history,
            question,
            max_new_tokens=budget,
            context_tokens=window,
        )
    except PromptError as exc:
        raise ModelInputError(str(exc)) from exc
    if prompt.dropped_turns and on_dropped is not None:
        on_dropped(prompt.dropped_turns)
    return _answer(
        runtime,
        prompt.ids,
        dropped_turns=prompt.dropped_turns,
        encode_s=encode_s,
        max_new_tokens=budget,
        greedy=greedy,
        seed=seed,
        on_text=on_text,
    )


def summary_prompt(report: str, audience: Literal["clinician", "patient"]) -> str:
    """The prompt of a plain-language summary of ``report`` for ``audience``: the
    audience's instruction, the report as the input.

    Raises
    ------
    PromptError
        An unknown audience, an empty report, or one holding ``<image>``.
    """
    if audience not in SUMMARY_INSTRUCTIONS:
        raise PromptError(f"audience must be clinician or patient, got {audience!r}")
    if not report.strip():
        raise PromptError("the report is empty")
    if IMAGE_PLACEHOLDER in report:
        raise PromptError(f"the report must not contain {IMAGE_PLACEHOLDER}")
    return format_prompt(SUMMARY_INSTRUCTIONS[audience], report)


def summarize(
    runtime: LLMCXR,
    report: str,
    *,
    audience: Literal["clinician", "patient"],
    on_text: Callable[[str], bool] | None = None,
    max_new_tokens: int | None = None,
    context_tokens: int | None = None,
) -> ChatAnswer:
    """A plain-language summary of ``report`` for ``audience`` (text only, streamed as
    :func:`chat`; greedy unless the bundle says otherwise).

    Parameters
    ----------
    runtime
        The loaded model.
    report
        The report to rewrite (a draft or a pasted one).
    audience
        ``"clinician"`` (the referring clinician) or ``"patient"``.
    on_text, max_new_tokens, context_tokens
        As for :func:`chat`.

    Raises
    ------
    models.results.ModelInputError
        An empty report, an unknown audience, or a report too long for the window.
    models.results.InferenceError
        The backend failed.
    """
    budget = _budget(runtime, max_new_tokens)
    window = context_window(runtime) if context_tokens is None else context_tokens
    try:
        prompt = summary_prompt(report, audience)
    except PromptError as exc:
        raise ModelInputError(str(exc)) from exc
    ids = runtime.tokenizer.encode(prompt)
    if len(ids) + budget > window:
        raise ModelInputError(
            f"the report is too long to summarize: {len(ids)} tokens + {budget} for the "
            f"summary exceed the model's {window} positions"
        )
    return _answer(
        runtime,
        ids,
        dropped_turns=0,
        encode_s=0.0,
        max_new_tokens=budget,
        greedy=None,
        seed=None,
        on_text=on_text,
    )
