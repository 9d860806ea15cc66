"""Conversation about a CXR on the demo bundle (transformers backend, CPU): the multi-turn
prompt and its window, streamed text deltas, cancellation, summaries."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

from models.chat import (
    CONTEXT_TOKENS,
    SUMMARY_INSTRUCTIONS,
    ChatTurn,
    build_chat_prompt,
    chat,
    summarize,
)
from models.layout import CODES_PER_IMAGE, IMAGE_TOKEN_OFFSET
from models.prompts import PromptError
from models.runtime import LLMCXR, ModelInputError
from tests.models.llm_fixtures import demo_bundle_dir
from tests.models.test_runtime import _cxr


@functools.cache
def _model() -> LLMCXR:
    return LLMCXR.from_bundle(demo_bundle_dir(), backend_options={"dtype": "float32"})


@pytest.fixture
def model() -> LLMCXR:
    return _model()


def _collect(into: list[str]) -> Callable[[str], bool]:
    """An ``on_text`` that keeps every delta and never cancels."""

    def on_text(delta: str) -> bool:
        into.append(delta)
        return True

    return on_text


@functools.cache
def _codes() -> tuple[int, ...]:
    return tuple(int(c) for c in _model().encode_images([_cxr()])[0])


def _image_ids(ids: list[int]) -> list[int]:
    return [i for i in ids if i >= IMAGE_TOKEN_OFFSET]


def test_prompt_renders_turns_in_order_with_the_image_once(model: LLMCXR) -> None:
    history = [ChatTurn("Is there an effusion?", "No."), ChatTurn("Any fracture?", "None.")]
    p = build_chat_prompt(model.tokenizer, _codes(), history, "Heart size?", max_new_tokens=16)
    assert p.dropped_turns == 0
    assert p.text.index("Is there an effusion?") < p.text.index("Any fracture?")
    assert p.text.index("Any fracture?") < p.text.index("Heart size?")
    assert p.text.count("<image>") == 1
    assert p.text.index("<image>") < p.text.index("Any fracture?")  # in the first turn
    assert p.text.count("### End") == 2  # each earlier turn is complete
    assert p.text.endswith("### Response:\n")
    assert len(_image_ids(p.ids)) == CODES_PER_IMAGE
    # without an image: no image ids at all
    text_only = build_chat_prompt(model.tokenizer, None, history, "Heart size?", max_new_tokens=16)
    assert "<image>" not in text_only.text and not _image_ids(text_only.ids)


def test_oldest_turns_are_dropped_first_to_fit_the_window(model: LLMCXR) -> None:
    long = "Describe the lungs in detail, please. " * 40  # ~300 tokens a turn
    history = [ChatTurn(f"{k}: {long}".strip(), f"answer {k}") for k in range(8)]
    p = build_chat_prompt(model.tokenizer, _codes(), history, "Last question?", max_new_tokens=64)
    assert p.dropped_turns > 0
    assert len(p.ids) + 64 <= CONTEXT_TOKENS
    kept = history[p.dropped_turns :]
    assert all(t.question in p.text for t in kept)
    assert all(t.question not in p.text for t in history[: p.dropped_turns])
    assert len(_image_ids(p.ids)) == CODES_PER_IMAGE  # the image always stays
    image_at = p.text.index("<image>")  # the Input of the first turn kept
    assert p.text.index(kept[0].question) < image_at
    assert len(kept) < 2 or image_at < p.text.index(kept[1].question)
    with pytest.raises(PromptError, match="does not fit"):
        build_chat_prompt(model.tokenizer, _codes(), [], long * 6, max_new_tokens=64)
    with pytest.raises(PromptError, match="empty"):
        build_chat_prompt(model.tokenizer, _codes(), [], "  ", max_new_tokens=64)


def test_first_turn_equals_vqa_and_streams_the_same_text(model: LLMCXR) -> None:
    x = _cxr()
    question = "Is there a pleural effusion?"
    vqa = model.vqa(x, question, max_new_tokens=12)
    plain = chat(model, x, [], question, max_new_tokens=12)
    assert plain.text == vqa.text and plain.dropped_turns == 0
    deltas: list[str] = []
    streamed = chat(
        model,
        None,
        [],
        question,
        image_codes=_codes(),
        max_new_tokens=12,
        on_text=_collect(deltas),
    )
    assert streamed.text == vqa.text
    assert "".join(deltas) == streamed.text
    assert len(deltas) >= 2  # token by token, in order
    assert streamed.stop_reason in ("end", "eos", "max_new_tokens")
    assert streamed.demo is True and streamed.model_name == model.model_name


def test_cancel_stops_with_a_prefix_of_the_answer(model: LLMCXR) -> None:
    full = chat(model, None, [], "Describe the image.", image_codes=_codes(), max_new_tokens=24)
    seen: list[str] = []

    def stop_after_two(delta: str) -> bool:
        seen.append(delta)
        return len(seen) < 2

    cut = chat(
        model,
        None,
        [],
        "Describe the image.",
        image_codes=_codes(),
        max_new_tokens=24,
        on_text=stop_after_two,
    )
    assert cut.stop_reason == "cancelled"
    assert cut.new_tokens < full.new_tokens
    assert cut.text == "".join(seen) and len(seen) == 2
    assert full.text.startswith(cut.text)


def test_follow_up_uses_the_history(model: LLMCXR) -> None:
    first = chat(model, None, [], "Is the heart enlarged?", image_codes=_codes(), max_new_tokens=8)
    second = chat(
        model,
        None,
        [ChatTurn("Is the heart enlarged?", first.text)],
        "And the lungs?",
        image_codes=_codes(),
        max_new_tokens=8,
    )
    assert second.prompt_tokens > first.prompt_tokens
    with pytest.raises(ModelInputError, match="empty"):
        chat(model, None, [], " ", image_codes=_codes())


def test_summary_per_audience(model: LLMCXR) -> None:
    report = "FINDINGS: Small left pleural effusion. IMPRESSION: Small left effusion."
    deltas: list[str] = []
    out = summarize(
        model,
        report,
        audience="patient",
        max_new_tokens=10,
        on_text=_collect(deltas),
    )
    assert "".join(deltas) == out.text
    assert out.new_tokens <= 10 and out.demo is True
    assert SUMMARY_INSTRUCTIONS["patient"] != SUMMARY_INSTRUCTIONS["clinician"]
    with pytest.raises(ModelInputError, match="audience"):
        summarize(model, report, audience="lawyer")  # type: ignore[arg-type]
    with pytest.raises(ModelInputError, match="empty"):
        summarize(model, " ", audience="clinician")


def test_cancelled_stream_leaves_other_requests_alone(model: LLMCXR) -> None:
    """A streamed request runs on its own: a batch of plain requests is unchanged by it."""
    from models.backends.base import GenerationRequest

    ids = model.tokenizer.encode_with_image("Below is an instruction.", None)
    plain = [GenerationRequest(prompt_ids=ids, max_new_tokens=6) for _ in range(2)]
    alone = model.backend.generate(plain)
    streamed = GenerationRequest(prompt_ids=ids, max_new_tokens=6, on_token=lambda _t: False)
    mixed = model.backend.generate([plain[0], streamed, plain[1]])
    assert [r.token_ids for r in (mixed[0], mixed[2])] == [r.token_ids for r in alone]
    assert mixed[1].stop_reason == "cancelled" and mixed[1].new_tokens == 1
