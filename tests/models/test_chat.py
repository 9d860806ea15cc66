"""Conversation about a CXR on the demo bundle (CPU): the multi-turn prompt and its window,
streamed text deltas and cancellation on both backends (transformers: ``generate`` and the
own loop; llama.cpp on the bundle's F32 GGUF), summaries."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pytest

from models.backends.base import GenerationBackend
from models.backends.transformers_backend import TransformersBackend
from models.chat import (
    CONTEXT_TOKENS,
    SUMMARY_INSTRUCTIONS,
    ChatAnswer,
    ChatTurn,
    build_chat_prompt,
    chat,
    summarize,
)
from models.layout import CODES_PER_IMAGE, IMAGE_TOKEN_OFFSET
from models.prompts import PromptError
from models.results import ModelInputError
from models.runtime import LLMCXR
from models.text import LLMCXRTokenizer
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


def _cancel_after_two(runtime: LLMCXR, question: str) -> tuple[ChatAnswer, list[str]]:
    """Ask ``question`` about :func:`_codes` (up to 24 new tokens), cancelling from the
    ``on_text`` callback at the second delta.

    Returns
    -------
    tuple[ChatAnswer, list[str]]
        The answer and the deltas seen before the cancel.
    """
    seen: list[str] = []

    def stop_after_two(delta: str) -> bool:
        seen.append(delta)
        return len(seen) < 2

    cut = chat(
        runtime,
        None,
        [],
        question,
        image_codes=_codes(),
        max_new_tokens=24,
        on_text=stop_after_two,
    )
    return cut, seen


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
    cut, seen = _cancel_after_two(model, "Describe the image.")
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
    """A request cancelled at its first id leaves the plain requests of its batch as they
    are without it."""
    from models.backends.base import GenerationRequest

    ids = model.tokenizer.encode_with_image("Below is an instruction.", None)
    plain = [GenerationRequest(prompt_ids=ids, max_new_tokens=6) for _ in range(2)]
    alone = model.backend.generate(plain)
    streamed = GenerationRequest(prompt_ids=ids, max_new_tokens=6, on_token=lambda _t: False)
    mixed = model.backend.generate([plain[0], streamed, plain[1]])
    assert [r.token_ids for r in (mixed[0], mixed[2])] == [r.token_ids for r in alone]
    assert mixed[1].stop_reason == "cancelled" and mixed[1].new_tokens == 1


# -- prompt building, more ------------------------------------------------------------------


def test_window_drops_the_fewest_turns_and_refuses_the_image_placeholder(model: LLMCXR) -> None:
    """The estimate that skips re-tokenizing never drops more turns than needed: the same
    count as trying every count from none, on histories of uneven turns."""
    tok = model.tokenizer
    words = ["effusion", "consolidation", "heart", "size", "mediastinum", "é", "🫁"]
    history = [
        ChatTurn(" ".join(words[: 1 + k % 7] * (1 + 2 * k)), " ".join(words[k % 5 :] * (1 + k)))
        for k in range(9)
    ]
    counts = set()
    for room in range(16, 1700, 83):
        for codes in (_codes(), None):
            got = build_chat_prompt(tok, codes, history, "Why?", max_new_tokens=room)
            fits = [
                d
                for d in range(len(history) + 1)
                if len(_brute(tok, codes, history[d:], "Why?")) + room <= CONTEXT_TOKENS
            ]
            assert got.dropped_turns == fits[0]
            assert got.ids == tok.encode_with_image(got.text, list(codes) if codes else None)
            counts.add(got.dropped_turns)
    assert len(counts) >= 4 and 0 in counts
    with pytest.raises(PromptError, match="must not contain"):
        build_chat_prompt(tok, _codes(), [], "What is in <image>?", max_new_tokens=8)
    with pytest.raises(PromptError, match="256 codes"):
        build_chat_prompt(tok, _codes()[:10], [], "Why?", max_new_tokens=8)
    # an earlier answer that typed the placeholder does not break the conversation
    odd = build_chat_prompt(
        tok, _codes(), [ChatTurn("Q?", "see <image> here")], "Why?", max_new_tokens=8
    )
    assert odd.text.count("<image>") == 1 and len(_image_ids(odd.ids)) == CODES_PER_IMAGE


def _brute(
    tok: LLMCXRTokenizer, codes: Sequence[int] | None, kept: list[ChatTurn], question: str
) -> list[int]:
    """The prompt ids of ``kept`` + ``question`` built directly from the template."""
    from models.prompts import format_prompt

    image = codes is not None
    text = "".join(
        f"{format_prompt(t.question, '<image>' if image and k == 0 else None)}"
        f"{t.answer.strip()}\n\n### End\n\n"
        for k, t in enumerate(kept)
    )
    text += format_prompt(question, "<image>" if image and not kept else None)
    return tok.encode_with_image(text, list(codes) if codes else None)


def test_chat_uses_the_backends_window(model: LLMCXR) -> None:
    """A smaller window (llama.cpp's ``n_ctx``) drops turns where 2,048 would not."""
    from models.chat import context_window

    assert context_window(model) == CONTEXT_TOKENS  # transformers: the model's 2,048
    long = "Describe the lungs in detail, please. " * 30
    history = [ChatTurn(long, "Clear.") for _ in range(3)]
    wide = chat(model, None, history, "And now?", image_codes=_codes(), max_new_tokens=4)
    narrow = chat(
        model,
        None,
        history,
        "And now?",
        image_codes=_codes(),
        max_new_tokens=4,
        context_tokens=700,
    )
    assert wide.dropped_turns == 0 < narrow.dropped_turns
    assert narrow.prompt_tokens + 4 <= 700
    with pytest.raises(ModelInputError, match="max_new_tokens"):
        chat(model, None, [], "Why?", image_codes=_codes(), max_new_tokens=0)


# -- streaming: the text deltas -------------------------------------------------------------


def test_streamer_holds_back_the_end_marker_and_half_characters(model: LLMCXR) -> None:
    """Ids that spell ``### End`` as plain text, and a character split over byte tokens:
    no delta shows a part of the marker or a replacement character."""
    from models.text_stream import TextStream

    tok = model.tokenizer
    ids = [*tok.encode("Lungs 🫁 clear #1."), *tok.encode(" ###"), *tok.encode(" End more")]
    assert len(tok.encode("🫁")) > 1  # split over byte tokens
    deltas: list[str] = []
    streamer = TextStream(tok, _collect(deltas))
    for t in ids:
        assert streamer(t)
    assert "".join(deltas) == "Lungs 🫁 clear #1."
    assert not any("\ufffd" in d or ("#" in d and "#1" not in d) for d in deltas)
    assert streamer.finish("Lungs 🫁 clear #1.") == "Lungs 🫁 clear #1."


def test_stream_of_a_summary_and_the_audience_instruction(model: LLMCXR) -> None:
    from models.chat import summary_prompt

    report = "FINDINGS: Small left pleural effusion. IMPRESSION: Small left effusion."
    audiences: tuple[Literal["clinician", "patient"], ...] = ("patient", "clinician")
    for audience in audiences:
        prompt = summary_prompt(report, audience)
        assert SUMMARY_INSTRUCTIONS[audience] in prompt and report in prompt
        assert prompt.index(SUMMARY_INSTRUCTIONS[audience]) < prompt.index(report)
        deltas: list[str] = []
        out = summarize(
            model, report, audience=audience, max_new_tokens=12, on_text=_collect(deltas)
        )
        assert out.prompt_tokens == len(model.tokenizer.encode(prompt))
        assert "".join(deltas) == out.text and out.dropped_turns == 0
        assert out.settings["backend"] == "transformers"
    assert "jargon" in SUMMARY_INSTRUCTIONS["patient"]
    assert "clinician" in SUMMARY_INSTRUCTIONS["clinician"]


def test_an_on_text_exception_stops_and_is_raised(model: LLMCXR) -> None:
    class Gone(Exception):
        pass

    seen: list[str] = []

    def broken(delta: str) -> bool:
        seen.append(delta)
        raise Gone

    with pytest.raises(Gone):
        chat(model, None, [], "Describe.", image_codes=_codes(), max_new_tokens=24, on_text=broken)
    assert len(seen) == 1
    # the model is still usable
    assert (
        chat(model, None, [], "Describe.", image_codes=_codes(), max_new_tokens=4).text is not None
    )


# -- the backends: on_token in batches ------------------------------------------------------


def _prompt_set(tok: LLMCXRTokenizer) -> list[list[int]]:
    """A VQA prompt with the test image, and a text prompt (different lengths: padding)."""
    from models.prompts import vqa_prompt

    return [
        tok.encode_with_image(vqa_prompt("Is there an effusion?"), list(_codes())),
        tok.encode("### Instruction:\nSay something\n\n### Response:\n"),
    ]


def _check_batch_cancel(
    backend: GenerationBackend, tok: LLMCXRTokenizer, *, max_new: int = 20
) -> None:
    """Row 0 streams and cancels after 3 ids, row 1 streams without cancelling, row 2 has no
    callback: rows 1 and 2 are what they are in the batch without any callback; row 0 is the
    first 3 of its ids; every callback saw its row's ids in order."""
    from models.backends.base import GenerationRequest

    prompts = [*_prompt_set(tok), _prompt_set(tok)[0]]
    plain = [GenerationRequest(prompt_ids=p, max_new_tokens=max_new) for p in prompts]
    ref = backend.generate(plain)
    assert all(r.error is None for r in ref)
    got: list[list[int]] = [[], []]

    def cancel_after_3(t: int) -> bool:
        got[0].append(t)
        return len(got[0]) < 3

    def keep(t: int) -> bool:
        got[1].append(t)
        return True

    reqs = [
        GenerationRequest(prompt_ids=prompts[0], max_new_tokens=max_new, on_token=cancel_after_3),
        GenerationRequest(prompt_ids=prompts[1], max_new_tokens=max_new, on_token=keep),
        plain[2],
    ]
    out = backend.generate(reqs)
    assert out[0].stop_reason == "cancelled"
    assert out[0].token_ids == ref[0].token_ids[:3] == got[0] and out[0].new_tokens == 3
    assert out[0].text == tok.decode(got[0], skip_special_tokens=True).strip()
    for k in (1, 2):
        assert out[k].token_ids == ref[k].token_ids and out[k].stop_reason == ref[k].stop_reason
        assert out[k].text == ref[k].text
    # the streamed row saw its ids in order, the stop id (if any) last, nothing after
    assert got[1][: len(ref[1].token_ids)] == ref[1].token_ids
    assert len(got[1]) == len(ref[1].token_ids) + (ref[1].stop_reason in ("end", "eos"))


def _check_raising_callback(backend: GenerationBackend, tok: LLMCXRTokenizer) -> None:
    """A callback that raises fails its own request only."""
    from models.backends.base import GenerationRequest

    def boom(_t: int) -> bool:
        raise RuntimeError("client gone")

    prompts = _prompt_set(tok)
    plain = GenerationRequest(prompt_ids=prompts[1], max_new_tokens=8)
    ref = backend.generate([plain])[0]
    out = backend.generate(
        [GenerationRequest(prompt_ids=prompts[0], max_new_tokens=8, on_token=boom), plain]
    )
    assert out[0].stop_reason == "error" and "RuntimeError" in (out[0].error or "")
    assert out[1].token_ids == ref.token_ids


def test_transformers_generate_cancels_one_row_of_a_batch(model: LLMCXR) -> None:
    _check_batch_cancel(model.backend, model.tokenizer)
    _check_raising_callback(model.backend, model.tokenizer)


@functools.cache
def _graph_backend() -> TransformersBackend:
    from models.bundle import ModelBundle

    backend = TransformersBackend(
        ModelBundle.open(demo_bundle_dir()).llm_dir,
        dtype="float32",
        cache="static",
        decode_loop="graph",
    )
    backend.load()
    return backend


def test_graph_loop_streams_and_cancels_one_row_of_a_batch(model: LLMCXR) -> None:
    """The own loop (CUDA's greedy path, run on CPU): rows stream at every step; a cancelled
    row leaves the others unchanged; 40 ids span more than one stop-check interval."""
    graph = _graph_backend()
    assert graph.decode_loop == "graph"
    _check_batch_cancel(graph, model.tokenizer, max_new=40)
    _check_raising_callback(graph, model.tokenizer)
    # the same streamed chat answer as the generate path
    runtime = LLMCXR(model.bundle, graph, model.image_tokenizer, tokenizer=model.tokenizer)
    deltas: list[str] = []
    a = chat(
        runtime,
        None,
        [],
        "Describe.",
        image_codes=_codes(),
        max_new_tokens=20,
        on_text=_collect(deltas),
    )
    b = chat(model, None, [], "Describe.", image_codes=_codes(), max_new_tokens=20)
    assert a.text == b.text == "".join(deltas)


# -- llama.cpp ------------------------------------------------------------------------------


@functools.cache
def _llama_model() -> LLMCXR:
    """The demo bundle (a copy) with its F32 GGUF, on the llama.cpp backend."""
    import shutil
    import tempfile
    from pathlib import Path

    from models.gguf_convert import convert_bundle

    root = Path(tempfile.mkdtemp(prefix="chat-gguf-")) / "bundle"
    shutil.copytree(demo_bundle_dir(), root)
    convert_bundle(root, quant="f32", threads=1)
    return LLMCXR.from_bundle(
        root,
        backend="llamacpp",
        backend_options={"quant": "f32", "kv_type": "f32", "threads": 1, "max_batch": 4},
    )


@pytest.fixture
def llama_model() -> LLMCXR:
    from tests.engine.conftest import require_engine

    require_engine()
    return _llama_model()


def test_llamacpp_streams_the_answer_and_cancels(llama_model: LLMCXR, model: LLMCXR) -> None:
    question = "Is there a pleural effusion?"
    full = chat(llama_model, None, [], question, image_codes=_codes(), max_new_tokens=24)
    assert full.settings["backend"] == "llamacpp"
    deltas: list[str] = []
    streamed = chat(
        llama_model,
        None,
        [],
        question,
        image_codes=_codes(),
        max_new_tokens=24,
        on_text=_collect(deltas),
    )
    assert streamed.text == full.text == "".join(deltas) and len(deltas) >= 2
    # F32 file, F32 KV cache: the transformers fp32 answer
    assert (
        full.text == chat(model, None, [], question, image_codes=_codes(), max_new_tokens=24).text
    )
    cut, seen = _cancel_after_two(llama_model, question)
    assert cut.stop_reason == "cancelled" and cut.text == "".join(seen) and len(seen) == 2
    assert full.text.startswith(cut.text) and cut.new_tokens < full.new_tokens


def test_llamacpp_cancels_one_sequence_of_a_batch(llama_model: LLMCXR) -> None:
    _check_batch_cancel(llama_model.backend, llama_model.tokenizer)
    _check_raising_callback(llama_model.backend, llama_model.tokenizer)


def test_a_stop_id_is_handed_over_last_and_is_no_cancel(tmp_path: Path) -> None:
    """A model that always says ``### End``: each backend hands the stop id over once, and a
    callback returning ``False`` for it does not turn the end into a cancel."""
    from models.backends.base import GenerationRequest
    from models.layout import END_ID
    from tests.engine.conftest import engine_available
    from tests.llamacpp.conftest import make_tiny_llm

    llm = make_tiny_llm(tmp_path / "llm", always_end=True)
    backends: list[Any] = [
        TransformersBackend(llm, dtype="float32"),
        TransformersBackend(llm, dtype="float32", cache="static", decode_loop="graph"),
    ]
    if engine_available() is None:
        from models.backends.llamacpp import LlamaCppBackend
        from models.gguf_convert import convert_bundle_llm

        gguf = convert_bundle_llm(llm, tmp_path / "end.gguf", quant="f32")
        backends.append(LlamaCppBackend(gguf.path, threads=1, max_batch=2))
    for backend in backends:
        seen: list[int] = []

        def refuse(t: int, seen: list[int] = seen) -> bool:
            seen.append(t)
            return False

        req = GenerationRequest(prompt_ids=[10, 11, 12], max_new_tokens=8, on_token=refuse)
        out = backend.generate([req, replace(req, on_token=None)])
        assert [r.stop_reason for r in out] == ["end", "end"], backend
        assert out[0].token_ids == [] and seen == [END_ID]
        image = replace(req, mode="image")  # image mode does not stream
        seen.clear()
        got = backend.generate([image])[0]
        assert got.image_codes is not None and seen == []
        if hasattr(backend, "close"):
            backend.close()
