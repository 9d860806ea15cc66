"""``cxr-node status / jobs list / db upgrade / echo`` through typer's CliRunner on a real DB."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.cli import app
from node.db import studies as studies_db
from node.db import study_completion as completion_db
from node.db.engine import make_engine, make_session_factory
from node.db.migrate import head_revision
from node.settings import ChestRule
from tests.node.factories import T0, record, uid

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    import os

    for key in list(os.environ):
        if key.startswith("CXR_NODE_"):
            monkeypatch.delenv(key)
    return {
        "CXR_NODE_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}",
        "CXR_NODE_SPOOL_DIR": str(tmp_path / "spool"),
    }


def _populate(url: str) -> tuple[str, str]:
    engine = make_engine(url)
    factory = make_session_factory(engine)
    chest, hand = uid(), uid()
    with factory() as s:
        studies_db.record_instance(s, record(study=chest, content=b"x" * 100))
        studies_db.record_instance(s, record(study=chest, content=b"y" * 50))
        studies_db.record_instance(
            s, record(study=hand, modality="DX", body_part="HAND", content=b"z" * 10)
        )
        completion_db.complete_quiet_studies(
            s,
            quiet_seconds=5,
            max_wait_seconds=60,
            now=T0 + timedelta(seconds=30),
            rule=ChestRule(),
        )
    engine.dispose()
    return chest, hand


def test_status_requires_schema_then_reports(env: dict[str, str]) -> None:
    res = runner.invoke(app, ["status", "--json"], env=env)
    assert res.exit_code == 1
    assert "db upgrade" in res.output
    res = runner.invoke(app, ["db", "upgrade"], env=env)
    assert res.exit_code == 0, res.output
    assert f"revision {head_revision()}" in res.output
    _populate(env["CXR_NODE_DATABASE_URL"])
    res = runner.invoke(app, ["status", "--json"], env=env)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["instances"] == 3 and data["studies"] == 2
    assert data["spool_bytes"] == 160
    assert data["jobs"] == {
        "received": 0,
        "queued": 1,
        "running": 0,
        "done": 0,
        "failed": 0,
        "cancelled": 1,
    }
    assert data["deliveries"] == {"pending": 0, "sent": 0, "failed": 0, "cancelled": 0}
    assert data["studies_by_state"] == {"receiving": 0, "complete": 1, "skipped": 1}
    human = runner.invoke(app, ["status"], env=env)
    assert human.exit_code == 0 and "queued" in human.stdout and "instances" in human.stdout


def test_jobs_list_json_and_filter(env: dict[str, str]) -> None:
    assert runner.invoke(app, ["db", "upgrade"], env=env).exit_code == 0
    chest, hand = _populate(env["CXR_NODE_DATABASE_URL"])
    res = runner.invoke(app, ["jobs", "list", "--json"], env=env)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert {(r["study_uid"], r["state"]) for r in rows} == {(chest, "queued"), (hand, "cancelled")}
    for r in rows:
        assert {"id", "study_uid", "state", "sr_uid", "attempts"} <= set(r)
    res = runner.invoke(app, ["jobs", "list", "--json", "--state", "queued"], env=env)
    (only,) = json.loads(res.stdout)
    assert only["study_uid"] == chest and only["attempts"] == 0 and only["sr_uid"] is None
    res = runner.invoke(app, ["jobs", "list", "--state", "bogus"], env=env)
    assert res.exit_code != 0
    human = runner.invoke(app, ["jobs", "list"], env=env)
    assert human.exit_code == 0 and "cancelled" in human.stdout


def test_bad_configuration_exits_2_naming_the_setting(env: dict[str, str]) -> None:
    res = runner.invoke(app, ["status"], env={**env, "CXR_NODE_PORT": "99999"})
    assert res.exit_code == 2
    assert "port" in res.output


def test_echo_fails_on_closed_port(env: dict[str, str]) -> None:
    from tests.helpers import free_port

    res = runner.invoke(app, ["echo", f"NOBODY@127.0.0.1:{free_port()}", "--timeout", "2"], env=env)
    assert res.exit_code == 1
    res = runner.invoke(app, ["echo", "not-an-address"], env=env)
    assert res.exit_code == 2


def test_demo_refuses_an_image_that_is_not_dicom_before_building_anything(
    tmp_path: Path,
) -> None:
    """``demo --image`` with a file that is not DICOM is bad usage (exit 2, one message naming
    the file, not its content), found before the demo builds its bundle or starts anything."""
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n", encoding="utf-8")
    work = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--image", str(text), "--workdir", str(work)])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "--image: notes.txt is not a DICOM file" in r.stderr
    assert "not an image" not in r.output
    assert not work.exists(), "nothing is built for a file the demo could not send"
