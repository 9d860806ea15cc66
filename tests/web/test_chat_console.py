"""The Conversation page (``/chat``, #27) in real headless Chromium against a real node:
a three-turn conversation whose answers are seen growing before they are complete (the
SSE body read by a ``ReadableStream`` reader), a Stop in mid-answer, a summary for the
patient, "show me a CXR with ..." as an inline SYNTHETIC image, and the AI-generated and
DEMO labels on every answer."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import select

from node.db.models import AuditLog, ConversationTurn
from node.services.chat import TOKEN_DELAY_ENV
from tests.web.conftest import ConsoleNode, browser_context, login

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAST = "document.querySelector('#chat-transcript .turn:last-child')"


def _last_state(page: Any) -> str:
    return str(page.evaluate(f"() => {LAST}.dataset.state"))


def _wait_streaming_text(page: Any) -> int:
    """Wait until the last answer shows text while it is still streaming; its length."""
    page.wait_for_function(
        f"() => {{ const t = {LAST}; return t && t.dataset.state === 'streaming'"
        " && t.querySelector('.answer').textContent.length > 0; }",
        timeout=60_000,
    )
    return int(page.evaluate(f"() => {LAST}.querySelector('.answer').textContent.length"))


def _wait_finished(page: Any, state: str = "done") -> str:
    page.wait_for_function(f"() => {LAST}.dataset.state === '{state}'", timeout=120_000)
    return str(page.evaluate(f"() => {LAST}.querySelector('.answer').textContent"))


def test_conversation_streams_stops_summarizes_and_draws(
    console_node: ConsoleNode,
    browser: Any,
    done_study: tuple[str, int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    node = console_node
    uid, _job_id = done_study
    # the demo model answers in milliseconds: slow each delta so the text is seen growing
    monkeypatch.setenv(TOKEN_DELAY_ENV, "0.05")
    with browser_context(browser) as ctx:
        page = login(ctx, node, "operator")
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.click("#nav-chat")
        page.wait_for_url(f"{node.base_url}/chat")
        page.select_option("#chat-study", uid)
        page.click("#chat-study-form button[type=submit]")
        page.locator("#chat-session").wait_for(state="visible", timeout=60_000)
        conv_id = int(page.get_attribute("#chat-session", "data-conversation-id") or 0)
        assert conv_id > 0

        questions = ["Is there a pleural effusion?", "Which side?", "Is the heart enlarged?"]
        for n, q in enumerate(questions, start=1):
            page.fill("#chat-question", q)
            page.click("#chat-send")
            partial = _wait_streaming_text(page)
            assert page.is_enabled("#chat-stop")
            answer = _wait_finished(page)
            assert len(answer) > partial  # deltas arrived before the answer was complete
            assert page.locator("#chat-transcript .turn").count() == n
        labels = page.locator("#chat-transcript .ai-label").all_inner_texts()
        assert labels == ["AI-generated · DEMO"] * 3

        # Stop in mid-answer: the stream ends with "cancelled" and the text so far
        page.fill("#chat-question", "Describe the lungs in detail.")
        page.click("#chat-send")
        _wait_streaming_text(page)
        page.click("#chat-stop")
        stopped = _wait_finished(page, "cancelled")
        assert page.evaluate(f"() => {LAST}.dataset.stopReason") == "cancelled"
        assert "(stopped)" in page.inner_text("#chat-transcript .turn:last-child")
        assert not page.is_enabled("#chat-stop") and page.is_enabled("#chat-send")

        # a plain-language summary of the study's draft, streamed the same way
        page.click("#chat-summary-patient")
        _wait_streaming_text(page)
        _wait_finished(page)
        assert page.evaluate(f"() => {LAST}.dataset.kind") == "summary"

        # "show me a CXR with ...": the synthetic image inline, labelled SYNTHETIC
        page.fill("#chat-question", "show me a CXR with a right pleural effusion")
        page.click("#chat-send")
        _wait_finished(page)
        page.wait_for_function(
            f"() => {{ const i = {LAST}.querySelector('img');"
            " return i && i.complete && i.naturalWidth > 0; }",
            timeout=60_000,
        )
        size = page.evaluate(
            f"() => {{ const i = {LAST}.querySelector('img');"
            " return [i.naturalWidth, i.naturalHeight]; }"
        )
        assert size == [256, 256]
        last_text = page.inner_text("#chat-transcript .turn:last-child")
        assert "SYNTHETIC" in last_text and "AI-generated · DEMO" in last_text
        assert page.locator("#chat-transcript .ai-label").count() == 6
        assert not errors, errors

    with node.sessions() as s:
        stored = list(
            s.scalars(
                select(ConversationTurn)
                .where(ConversationTurn.conversation_id == conv_id)
                .order_by(ConversationTurn.id)
            )
        )
        assert [t.kind for t in stored] == ["question"] * 4 + ["summary", "image"]
        assert [t.stop_reason for t in stored][3] == "cancelled"
        assert stored[3].answer == stopped
        assert stored[5].image_png is not None
        actions = list(
            s.scalars(select(AuditLog.action).where(AuditLog.target == f"conversation:{conv_id}"))
        )
    assert actions.count("conversation.turn") == 4
    assert {"conversation.start", "conversation.summary", "conversation.image"} <= set(actions)
    for t in stored[:4]:
        assert t.question not in caplog.text
        if len(t.answer.strip()) >= 8:
            assert t.answer.strip() not in caplog.text


def test_viewer_cannot_start_a_conversation(console_node: ConsoleNode, browser: Any) -> None:
    with browser_context(browser) as ctx:
        page = login(ctx, console_node, "viewer")
        page.goto(f"{console_node.base_url}/chat")
        assert page.locator("#viewer-note").is_visible()
        assert not page.is_enabled("#chat-study-form button[type=submit]")


def test_recent_conversations_are_listed_and_reopen(
    console_node: ConsoleNode, browser: Any, done_study: tuple[str, int]
) -> None:
    node = console_node
    uid, _job_id = done_study
    with browser_context(browser) as ctx:
        page = login(ctx, node, "operator")
        page.goto(f"{node.base_url}/chat")
        page.select_option("#chat-study", uid)
        page.click("#chat-study-form button[type=submit]")
        page.locator("#chat-session").wait_for(state="visible", timeout=60_000)
        conv_id = int(page.get_attribute("#chat-session", "data-conversation-id") or 0)
        page.fill("#chat-question", "Is there a pneumothorax?")
        page.click("#chat-send")
        first = _wait_finished(page)
        page.fill("#chat-question", "show me a CXR with cardiomegaly")
        page.click("#chat-send")
        _wait_finished(page)

        # a new visit lists the conversation; its link reopens the transcript to go on
        page.goto(f"{node.base_url}/chat")
        row = page.locator(f"#chat-recent tr[data-conversation-id='{conv_id}']")
        assert "2" in row.locator("td").nth(2).inner_text()  # two turns
        row.locator("a").click()
        page.wait_for_url(f"{node.base_url}/chat?conversation={conv_id}")
        page.locator("#chat-session").wait_for(state="visible", timeout=30_000)
        page.wait_for_function(
            "() => document.querySelectorAll('#chat-transcript .turn').length === 2"
        )
        assert page.get_attribute("#chat-session", "data-conversation-id") == str(conv_id)
        turns = page.locator("#chat-transcript .turn")
        assert turns.nth(0).locator(".answer").inner_text() == first
        assert "SYNTHETIC" in turns.nth(1).inner_text()
        page.wait_for_function(
            "() => { const i = document.querySelector('#chat-transcript .turn:last-child img');"
            " return i && i.complete && i.naturalWidth === 256; }",
            timeout=30_000,
        )
        page.fill("#chat-question", "And the heart?")
        page.click("#chat-send")
        _wait_finished(page)
        assert turns.count() == 3

    # another person's list does not show it (an admin sees it through the API's ?all=true)
    with browser_context(browser) as ctx:
        other = login(ctx, node, "admin")
        other.goto(f"{node.base_url}/chat")
        assert other.locator(f"#chat-recent tr[data-conversation-id='{conv_id}']").count() == 0
