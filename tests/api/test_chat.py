"""Conversations about a CXR through a running API (#27): history kept, the window notice,
streaming framing, cancel (route and disconnect), roles, audit rows without text, uploads,
summaries, synthetic images, and a worker draft completing while conversations stream.
Real SQLite, uvicorn and the real model host on the demo bundle."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from node.db.models import Conversation, ConversationTurn
from node.runtime.modelhost import ModelHost
from node.runtime.service import NodeContext
from node.runtime.worker import Worker
from node.services.chat import TOKEN_DELAY_ENV
from tests.api.conftest import ApiEnv
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

AUDIT_TEXT_KEYS = {"question", "answer", "report", "text"}


@dataclass
class Event:
    """One Server-Sent Event and when it arrived."""

    name: str
    data: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


def read_events(resp: httpx.Response) -> Iterator[Event]:
    """Parse ``text/event-stream``: ``event:`` + one ``data:`` line, blank line between;
    comment lines (``:``) skipped."""
    name: str | None = None
    data: str | None = None
    for line in resp.iter_lines():
        if line.startswith(":"):
            continue
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
        elif line == "":
            if name is not None and data is not None:
                yield Event(name, json.loads(data))
            name = data = None


def ask(
    client: httpx.Client, conv_id: int, question: str, **body: Any
) -> tuple[list[Event], httpx.Response]:
    """Ask and read the whole stream."""
    with client.stream(
        "POST", f"/api/conversations/{conv_id}/turns", json={"question": question, **body}
    ) as resp:
        if resp.status_code != 200:
            resp.read()
            return [], resp
        assert resp.headers["content-type"].startswith("text/event-stream")
        return list(read_events(resp)), resp


def start(env: ApiEnv, study_uid: str, role: str = "operator") -> dict[str, Any]:
    with env.client(role) as c:
        r = c.post("/api/conversations", json={"study_uid": study_uid})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def turns(env: ApiEnv, conv_id: int) -> list[ConversationTurn]:
    with env.sessions() as s:
        return list(
            s.query(ConversationTurn)
            .filter(ConversationTurn.conversation_id == conv_id)
            .order_by(ConversationTurn.id)
        )


def test_conversation_keeps_history_audits_and_labels(
    env: ApiEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seeded = env.seed("done", draft="FINDINGS: Small left pleural effusion. IMPRESSION: Effusion.")
    conv = start(env, seeded.study_uid)
    assert conv["source"] == "study" and conv["sop_instance_uid"] == seeded.sop_uid
    assert conv["ai_generated"] is True and conv["demo"] is True and conv["turns"] == []
    cid = conv["id"]
    questions = ["Is there a pleural effusion?", "Which side?", "Is the heart enlarged?"]
    prompt_tokens = []
    with env.client("operator") as c:
        for q in questions:
            events, resp = ask(c, cid, q, max_new_tokens=8)
            assert resp.status_code == 200
            names = [e.name for e in events]
            assert names[-1] == "done" and set(names) <= {"delta", "done"}, names
            done = events[-1].data
            assert done["ai_generated"] is True and done["demo"] is True
            assert done["stop_reason"] in ("end", "eos", "max_new_tokens")
            text = "".join(e.data["text"] for e in events if e.name == "delta")
            stored = turns(env, cid)[-1]
            assert stored.id == done["turn_id"] and stored.answer == text
            prompt_tokens.append(done["prompt_tokens"])
        # each turn's prompt holds the earlier turns: it grows
        assert prompt_tokens[0] < prompt_tokens[1] < prompt_tokens[2]
        got = c.get(f"/api/conversations/{cid}").json()
        assert [t["question"] for t in got["turns"]] == questions
        assert all(t["ai_generated"] and t["kind"] == "question" for t in got["turns"])

        # a summary of the study's draft (no report given), streamed the same way
        with c.stream(
            "POST",
            f"/api/conversations/{cid}/summary",
            json={"audience": "patient", "max_new_tokens": 8},
        ) as resp:
            assert resp.status_code == 200
            events = list(read_events(resp))
        assert events[-1].name == "done" and events[-1].data["kind"] == "summary"
        assert turns(env, cid)[-1].question.startswith("FINDINGS: Small left")
        r = c.post(f"/api/conversations/{cid}/summary", json={"audience": "lawyer"})
        assert r.status_code == 422

        # "show me a CXR with ...": a synthetic image turn, its PNG 256x256
        r = c.post(f"/api/conversations/{cid}/image", json={"report": "Right pleural effusion."})
        assert r.status_code == 201, r.text
        turn = r.json()
        assert turn["kind"] == "image" and turn["synthetic"] is True and turn["ai_generated"]
        assert "SYNTHETIC" in turn["answer"]
        png = c.get(turn["image_url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.headers["x-synthetic"] == "true"
        assert Image.open(BytesIO(png.content)).size == (256, 256)
        first = got["turns"][0]["id"]
        assert c.get(f"/api/conversations/{cid}/turns/{first}/image.png").status_code == 404

    # audit: every turn, ids and counts only
    assert len(env.audit("conversation.start")) == 1
    audited = env.audit("conversation.turn")
    assert len(audited) == 3
    assert len(env.audit("conversation.summary")) == 1
    assert len(env.audit("conversation.image")) == 1
    for row in [*audited, *env.audit("conversation.summary"), *env.audit("conversation.image")]:
        assert row.actor == env.actor("operator") and row.target == f"conversation:{cid}"
        assert not AUDIT_TEXT_KEYS & set(row.detail or {})
        assert not any(q in json.dumps(row.detail) for q in questions)
    # no question, answer or report text in any log line
    for t in turns(env, cid):
        for text in (t.question, t.answer):
            if len(text.strip()) >= 8:
                assert text.strip() not in caplog.text


def test_roles_and_errors(env: ApiEnv) -> None:
    seeded = env.seed("queued")
    with env.client("viewer") as c:
        assert c.post("/api/conversations", json={"study_uid": seeded.study_uid}).status_code == 403
    conv = start(env, seeded.study_uid)
    cid = conv["id"]
    with env.client("viewer") as c:
        assert c.get(f"/api/conversations/{cid}").status_code == 403
        assert c.post(f"/api/conversations/{cid}/turns", json={"question": "x"}).status_code == 403
        assert c.post(f"/api/conversations/{cid}/cancel").status_code == 403
    with env.client() as c:
        assert c.get(f"/api/conversations/{cid}").status_code == 401
    with env.client("admin") as c:  # an admin sees anyone's conversation
        assert c.get(f"/api/conversations/{cid}").status_code == 200
    admin_conv = start(env, seeded.study_uid, role="admin")
    with env.client("operator") as c:  # not another person's
        assert c.get(f"/api/conversations/{admin_conv['id']}").status_code == 404
        assert c.get("/api/conversations/999999").status_code == 404
        r = c.post("/api/conversations/999999/turns", json={"question": "x"})
        assert r.status_code == 404
        assert c.post(f"/api/conversations/{cid}/turns", json={"question": ""}).status_code == 422
        r = c.post("/api/conversations", json={"study_uid": "1.2.3.999"})
        assert r.status_code == 404
        r = c.post("/api/conversations", content=b"x", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        assert c.post(f"/api/conversations/{cid}/cancel").json() == {"cancelled": False}
        r = c.post(f"/api/conversations/{cid}/summary", json={"audience": "patient"})
        assert r.status_code == 422  # the study has no draft and no report was given


def test_window_overflow_drops_oldest_turns_with_a_notice(env: ApiEnv) -> None:
    seeded = env.seed("queued")
    cid = start(env, seeded.study_uid)["id"]
    long = "Describe every finding of the lungs, the pleura and the heart in detail. " * 25
    dropped = []
    with env.client("operator") as c:
        for _ in range(6):
            events, resp = ask(c, cid, long, max_new_tokens=64)
            assert resp.status_code == 200
            notices = [e for e in events if e.name == "notice"]
            done = events[-1]
            assert done.name == "done"
            if notices:
                # said before the answer streams, and the same count as the stored turn
                assert events.index(notices[0]) == 0
                assert notices[0].data["dropped_turns"] == done.data["dropped_turns"] > 0
                assert "2,048-token window" in notices[0].data["message"]
            dropped.append(done.data["dropped_turns"])
            assert done.data["prompt_tokens"] + 64 <= 2048
    assert dropped[0] == 0 and max(dropped) > 0
    assert turns(env, cid)[-1].dropped_turns == dropped[-1]


def test_cancel_mid_stream_and_one_turn_at_a_time(
    env: ApiEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_DELAY_ENV, "0.05")
    seeded = env.seed("queued")
    cid = start(env, seeded.study_uid)["id"]
    with env.client("operator") as c, env.client("operator") as other:
        with c.stream(
            "POST",
            f"/api/conversations/{cid}/turns",
            json={"question": "Describe the lungs.", "max_new_tokens": 400},
        ) as resp:
            assert resp.status_code == 200
            events: list[Event] = []
            for ev in read_events(resp):
                events.append(ev)
                if ev.name == "delta" and len(events) == 1:
                    # a second turn of the same conversation waits for none: 409
                    r = other.post(f"/api/conversations/{cid}/turns", json={"question": "x"})
                    assert r.status_code == 409
                    assert other.post(f"/api/conversations/{cid}/cancel").json() == {
                        "cancelled": True
                    }
        done = events[-1]
        assert done.name == "done" and done.data["stop_reason"] == "cancelled"
        deltas = [e for e in events if e.name == "delta"]
        assert 1 <= len(deltas) < 400
        stored = turns(env, cid)[-1]
        assert stored.stop_reason == "cancelled"
        assert stored.answer == "".join(e.data["text"] for e in deltas)
        # the stopped answer is not the next question's context
        monkeypatch.delenv(TOKEN_DELAY_ENV)
        events2, _ = ask(c, cid, "Is there an effusion?", max_new_tokens=4)
        assert events2[-1].data["stop_reason"] != "cancelled"
        fresh_cid = start(env, seeded.study_uid)["id"]
        events3, _ = ask(c, fresh_cid, "Is there an effusion?", max_new_tokens=4)
        assert events2[-1].data["prompt_tokens"] == events3[-1].data["prompt_tokens"]


def test_client_disconnect_cancels_the_answer(env: ApiEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_DELAY_ENV, "0.05")
    seeded = env.seed("queued")
    cid = start(env, seeded.study_uid)["id"]
    with (
        env.client("operator") as c,
        c.stream(
            "POST",
            f"/api/conversations/{cid}/turns",
            json={"question": "Describe the lungs.", "max_new_tokens": 600},
        ) as resp,
    ):
        for ev in read_events(resp):
            if ev.name == "delta":
                break  # leave after the first delta: the connection closes
    wait_for(lambda: bool(turns(env, cid)), timeout=30)
    stored = turns(env, cid)[-1]
    assert stored.stop_reason == "cancelled" and stored.new_tokens < 600
    # the reservation is released: the conversation takes a new turn
    monkeypatch.delenv(TOKEN_DELAY_ENV)
    with env.client("operator") as c:
        events, resp = ask(c, cid, "Again?", max_new_tokens=4)
        assert resp.status_code == 200 and events[-1].name == "done"


def test_upload_conversation_keeps_only_codes(env: ApiEnv) -> None:
    buf = BytesIO()
    Image.fromarray(np.full((64, 64), 128, dtype=np.uint8), mode="L").save(buf, format="PNG")
    with env.client("operator") as c:
        r = c.post("/api/conversations", files={"file": ("x.png", buf.getvalue(), "image/png")})
        assert r.status_code == 201, r.text
        conv = r.json()
        assert conv["source"] == "upload" and conv["study_uid"] is None
        r = c.post(
            "/api/conversations", files={"file": ("x.dcm", env.template, "application/dicom")}
        )
        assert r.status_code == 201 and r.json()["sop_instance_uid"]
        r = c.post("/api/conversations", files={"file": ("x.bin", b"not an image", "text/plain")})
        assert r.status_code == 422
        events, _resp = ask(c, conv["id"], "Is this normal?", max_new_tokens=4)
        assert events[-1].name == "done"
    with env.sessions() as s:
        row = s.get(Conversation, conv["id"])
        assert row is not None and len(row.image_codes) == 256


def test_draft_completes_while_conversations_stream(env: ApiEnv, model_host: ModelHost) -> None:
    """Two people talk back to back, so an interactive request always waits when the
    model is released; the worker's draft still gets its turn (the fairness policy)."""
    seeded = env.seed("queued")
    convs = [start(env, seeded.study_uid)["id"] for _ in range(2)]
    stop = threading.Event()
    asked: list[int] = []
    errors: list[str] = []

    def talk(cid: int) -> None:
        with env.client("operator") as c:
            while not stop.is_set():
                events, resp = ask(c, cid, "Is there an effusion?", max_new_tokens=48)
                if resp.status_code != 200 or events[-1].name != "done":
                    errors.append(f"{resp.status_code} {events[-1:] if events else resp.text}")
                    return
                asked.append(cid)

    talkers = [threading.Thread(target=talk, args=(cid,), daemon=True) for cid in convs]
    for t in talkers:
        t.start()
    wait_for(lambda: len(asked) >= 4, timeout=60)  # both are talking
    model_host.model_lock.grants.clear()  # a diagnostic record (bounded): from here on
    ctx = NodeContext(env.settings, env.engine, env.sessions, "chat-test", threading.Event())
    worker = Worker(ctx, model_host, poll_interval=0.05)
    worker.start()
    try:
        wait_for(lambda: env.job(seeded.job_id).state.value == "done", timeout=120)
        still_talking = not stop.is_set() and all(t.is_alive() for t in talkers)
    finally:
        stop.set()
        worker.stop()
        for t in talkers:
            t.join(timeout=60)
    assert not errors, errors
    assert still_talking  # the draft finished while the conversations went on
    grants = list(model_host.model_lock.grants)
    assert False in grants and grants.count(True) >= 2


def test_retention_purges_old_conversations_and_those_of_purged_studies(env: ApiEnv) -> None:
    from datetime import timedelta

    from sqlalchemy import select

    from node.db.models import Study, utcnow
    from node.db.retention import purge_expired_studies

    kept_study = env.seed("queued")  # a queued job: the study is not purged
    old_cid = start(env, kept_study.study_uid)["id"]
    recent_cid = start(env, kept_study.study_uid)["id"]
    done_study = env.seed("done")
    purged_cid = start(env, done_study.study_uid)["id"]
    with env.client("operator") as c:
        for cid in (old_cid, purged_cid):
            events, _ = ask(c, cid, "Is there an effusion?", max_new_tokens=2)
            assert events[-1].name == "done"
    with env.sessions() as s:
        row = s.get(Conversation, old_cid)
        assert row is not None
        row.updated_at = utcnow() - timedelta(days=40)
        study = s.scalars(
            select(Study).where(Study.study_instance_uid == done_study.study_uid)
        ).one()
        study.last_received_at = utcnow() - timedelta(days=40)
        s.commit()
    with env.sessions() as s:
        purge_expired_studies(s, older_than=utcnow() - timedelta(days=30))
    with env.sessions() as s:
        assert s.get(Conversation, old_cid) is None  # not updated for 40 days
        assert s.get(Conversation, purged_cid) is None  # recent, but its study is purged
        assert s.get(Conversation, recent_cid) is not None
        assert (
            s.scalars(select(Study).where(Study.study_instance_uid == done_study.study_uid)).first()
            is None
        )
    assert not turns(env, old_cid) and not turns(env, purged_cid)
    rows = env.audit("retention.conversations")
    assert [r.detail["conversations"] for r in rows if r.detail] == [2]


def test_conversations_are_listed_to_their_owner(env: ApiEnv) -> None:
    seeded = env.seed("queued")
    mine = [start(env, seeded.study_uid)["id"] for _ in range(3)]
    theirs = start(env, seeded.study_uid, role="admin")["id"]
    with env.client("operator") as c:
        events, _ = ask(c, mine[0], "Is there an effusion?", max_new_tokens=4)
        assert events[-1].name == "done"
        listed = c.get("/api/conversations").json()
        assert listed["total"] == 3
        # most recently updated first: the one just asked comes first
        assert [i["id"] for i in listed["items"]] == [mine[0], mine[2], mine[1]]
        first = listed["items"][0]
        assert first["turn_count"] == 1 and first["source"] == "study"
        assert first["study_uid"] == seeded.study_uid and first["demo"] is True
        assert first["url"] == f"/chat?conversation={mine[0]}"
        assert first["actor"] == env.actor("operator")
        assert "question" not in json.dumps(listed)  # no turn text in a list
        page = c.get("/api/conversations", params={"limit": 1, "offset": 1}).json()
        assert [i["id"] for i in page["items"]] == [mine[2]] and page["total"] == 3
        assert c.get("/api/conversations", params={"all": "true"}).status_code == 403
    with env.client("admin") as c:
        own = c.get("/api/conversations").json()
        assert [i["id"] for i in own["items"]] == [theirs]
        everyone = c.get("/api/conversations", params={"all": "true"}).json()
        assert everyone["total"] == 4 and theirs in [i["id"] for i in everyone["items"]]
    with env.client("viewer") as c:
        assert c.get("/api/conversations").status_code == 403


def test_cli_summary_of_the_study_draft(env: ApiEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from node.cli import app
    from tests.models.llm_fixtures import demo_bundle_dir

    with_draft = env.seed("done", draft="FINDINGS: Small left effusion. IMPRESSION: Effusion.")
    without = env.seed("queued")
    monkeypatch.delenv("CXR_NODE_CONFIG", raising=False)
    monkeypatch.setenv("CXR_NODE_DATABASE_URL", env.settings.database_url)
    monkeypatch.setenv("CXR_NODE_SPOOL_DIR", str(env.settings.spool_dir))
    monkeypatch.setenv("CXR_NODE_MODEL_DIR", str(demo_bundle_dir()))
    monkeypatch.setenv("CXR_NODE_BACKEND_DTYPE", "float32")
    runner = CliRunner()
    args = ["chat", "--study", with_draft.study_uid, "--max-new-tokens", "5"]
    r = runner.invoke(app, args, input="/summary clinician\n/summary patient\n")
    assert r.exit_code == 0, r.output
    assert len([a for a in r.stdout.split("\n") if a.strip()]) == 2  # both from the draft
    assert "not asked" not in r.stderr
    r = runner.invoke(
        app,
        ["chat", "--study", without.study_uid, "--max-new-tokens", "5"],
        input="/summary patient\n/summary patient FINDINGS: Clear lungs.\n",
    )
    assert r.exit_code == 0, r.output
    assert f"study {without.study_uid} has no report draft yet" in r.stderr
    assert len([a for a in r.stdout.split("\n") if a.strip()]) == 1  # the pasted report's
