"""``cxr-node`` admin commands (jobs, tokens, ask, generate-image) on a real database."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid as new_uid
from sqlalchemy import select
from typer.testing import CliRunner

from node.cli import app
from node.db.models import Delivery, DeliveryKind, DeliveryObject, DeliveryState, JobState, utcnow
from node.settings import Hl7Destination
from tests.api.conftest import EnvFactory
from tests.helpers import require_nih_pngs, rg1_file
from tests.node.factories import add_redraft

pytestmark = pytest.mark.integration


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv("CXR_NODE_CONFIG", raising=False)
    return CliRunner()


def _env(monkeypatch: pytest.MonkeyPatch, env_settings: object, **extra: str) -> None:
    monkeypatch.setenv("CXR_NODE_DATABASE_URL", env_settings.database_url)  # type: ignore[attr-defined]
    monkeypatch.setenv("CXR_NODE_SPOOL_DIR", str(env_settings.spool_dir))  # type: ignore[attr-defined]
    for k, v in extra.items():
        monkeypatch.setenv(k, v)


def test_tokens_and_jobs(
    make_env: EnvFactory, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(model=False)
    _env(monkeypatch, env.settings)
    r = runner.invoke(app, ["tokens", "create", "--role", "operator", "--name", "cli-op"])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("cxr_")
    with httpx.Client(base_url=env.base, headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.get("/api/session").json()["name"] == "cli-op"
    listed = json.loads(runner.invoke(app, ["tokens", "list", "--json"]).stdout)
    tid = next(t["id"] for t in listed if t["name"] == "cli-op")
    assert all("T" in t["created_at"] for t in listed)
    assert runner.invoke(app, ["tokens", "create", "--role", "root"]).exit_code == 2
    r = runner.invoke(app, ["tokens", "revoke", str(tid)])
    assert r.exit_code == 0 and "revoked" in r.stdout
    with httpx.Client(base_url=env.base, headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.get("/api/session").status_code == 401
    assert runner.invoke(app, ["tokens", "revoke", "99999"]).exit_code == 1

    failed = env.seed("failed")
    done = env.seed("done", draft="Normal heart size.", destination="PACS@h:104")
    r = runner.invoke(app, ["jobs", "show", str(done.job_id), "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert shown["job"]["state"] == "done" and shown["drafts"][0]["text"] == "Normal heart size."
    # times in ISO 8601 as in `jobs list --json` and the API (not Python's str())
    created = shown["job"]["created_at"]
    assert "T" in created and datetime.fromisoformat(created).tzinfo is not None
    r = runner.invoke(app, ["jobs", "show", str(done.job_id)])
    assert "Normal heart size." in r.stdout and "PACS@h:104" in r.stdout
    assert runner.invoke(app, ["jobs", "show", "99999"]).exit_code == 1
    r = runner.invoke(app, ["jobs", "retry", str(failed.job_id)])
    assert r.exit_code == 0 and "queued" in r.stdout
    assert env.job(failed.job_id).state is JobState.queued
    assert runner.invoke(app, ["jobs", "retry", str(failed.job_id)]).exit_code == 1
    r = runner.invoke(app, ["jobs", "priority", str(failed.job_id), "9"])
    assert r.exit_code == 0 and env.job(failed.job_id).priority == 9
    r = runner.invoke(app, ["jobs", "cancel", str(failed.job_id), "--reason", "wrong patient"])
    assert r.exit_code == 0 and env.job(failed.job_id).state is JobState.cancelled
    assert runner.invoke(app, ["jobs", "cancel", str(done.job_id)]).exit_code == 1
    r = runner.invoke(app, ["jobs", "resend", str(done.job_id)])
    assert r.exit_code == 0, r.output
    assert "1 deliveries" in r.stdout
    for action in ("job.requeue", "job.cancel", "job.priority", "token.create", "token.revoke"):
        rows = env.audit(action)
        assert rows and rows[-1].actor.startswith("cli:"), action


def test_jobs_priority_takes_what_the_api_takes(
    make_env: EnvFactory, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``jobs priority`` and ``POST /api/jobs/{id}/priority`` set a priority within
    -1000..1000 (the range of the routing and priority rules); both refuse one outside it
    and leave the job (and the audit log) as it was."""
    env = make_env(model=False)
    _env(monkeypatch, env.settings)
    queued = env.seed("queued")
    with env.client("operator") as c:
        for priority in (1001, -1001, 10**6):
            r = c.post(f"/api/jobs/{queued.job_id}/priority", json={"priority": priority})
            assert r.status_code == 422, priority
    for priority in ("1001", "-1001", "1000000", "3000000000"):
        r = runner.invoke(app, ["jobs", "priority", str(queued.job_id), "--", priority])
        assert r.exit_code != 0, (priority, r.output)
        assert env.job(queued.job_id).priority == 0, priority
    assert env.audit("job.priority") == []
    for priority in ("1000", "-1000"):
        r = runner.invoke(app, ["jobs", "priority", str(queued.job_id), "--", priority])
        assert r.exit_code == 0, r.output
        assert env.job(queued.job_id).priority == int(priority)


def test_cancel_and_withdraw_reasons_take_what_the_api_takes(
    make_env: EnvFactory, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation's reason is at most 500 characters through ``POST
    /api/jobs/{id}/cancel`` (422) and ``jobs cancel --reason`` (bad usage, exit 2) alike: a
    longer one leaves the job and the audit log as they were (the CLI took any length
    before). A withdrawal's reason likewise: empty or over 256 characters is bad usage, as
    the API answers 422 (it was exit 1, after the database was opened)."""
    env = make_env(model=False)
    _env(monkeypatch, env.settings)
    queued = env.seed("queued")
    with env.client("operator") as c:
        r = c.post(f"/api/jobs/{queued.job_id}/cancel", json={"reason": "r" * 501})
        assert r.status_code == 422, r.text
    r = runner.invoke(app, ["jobs", "cancel", str(queued.job_id), "--reason", "r" * 501])
    assert r.exit_code == 2 and "at most 500 characters" in r.stderr, r.output
    assert env.job(queued.job_id).state is JobState.queued and env.audit("job.cancel") == []
    r = runner.invoke(app, ["jobs", "cancel", str(queued.job_id), "--reason", "r" * 500])
    assert r.exit_code == 0, r.output
    assert env.job(queued.job_id).state is JobState.cancelled
    assert env.audit("job.cancel")[0].detail["reason"] == "r" * 500

    done = env.seed("done", draft="Normal heart size.", destination="PACS@h:104")
    for reason, why in (("   ", "say why"), ("w" * 257, "at most 256 characters")):
        with env.client("operator") as c:
            r = c.post(f"/api/jobs/{done.job_id}/withdraw", json={"reason": reason})
            assert r.status_code == 422, r.text
        r = runner.invoke(app, ["jobs", "withdraw", str(done.job_id), "--reason", reason])
        assert r.exit_code == 2 and why in r.stderr, r.output
    assert env.job(done.job_id).withdrawn_at is None and env.audit("job.withdraw") == []


def test_withdraw_names_an_hl7_withdrawal_a_later_result_holds_back(
    make_env: EnvFactory, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job 1's result reached the RIS; job 2, a later draft of the study, is done and its
    result still to be sent there. ``jobs withdraw`` builds job 1's withdrawal and queues
    it held back, and says so (the JSON answer's ``held``), rather than "no withdrawal"."""
    ris = Hl7Destination(host="127.0.0.1", port=2575)
    env = make_env(model=False)
    _env(
        monkeypatch,
        env.settings,
        CXR_NODE_DESTINATIONS=json.dumps([{"kind": "hl7", "host": ris.host, "port": ris.port}]),
    )
    one = env.seed("done", draft="Normal heart size.")
    with env.sessions() as s:
        two = add_redraft(
            s, one.job_id, "IMPRESSION: latest.", at=utcnow(), sr_sop_instance_uid=new_uid()
        )
        for job_id, state in ((one.job_id, DeliveryState.sent), (two.id, DeliveryState.pending)):
            s.add(
                Delivery(
                    job_id=job_id,
                    destination=str(ris),
                    kind=DeliveryKind.hl7,
                    object=DeliveryObject.report,
                    state=state,
                    attempts=1 if state is DeliveryState.sent else 0,
                    created_at=utcnow(),
                )
            )
        s.commit()
        later = two.id
    r = runner.invoke(app, ["jobs", "withdraw", str(one.job_id), "--reason", "wrong side"])
    assert r.exit_code == 0, r.output
    assert "0 withdrawal(s) queued" in r.stdout and "no withdrawal" not in r.stderr
    assert (
        f"withdrawal of job {one.job_id}'s draft for {ris} held back: job {later}'s result "
        "replaces the order's there"
    ) in r.stdout
    with env.sessions() as s:
        [row] = s.scalars(
            select(Delivery).where(
                Delivery.job_id == one.job_id, Delivery.object == DeliveryObject.withdrawal
            )
        )
    assert row.state is DeliveryState.cancelled and row.sr_path


@pytest.mark.slow
def test_ask_and_generate_image(
    demo_bundle: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CXR_NODE_MODEL_DIR", str(demo_bundle))
    monkeypatch.setenv("CXR_NODE_DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    r = runner.invoke(app, ["ask", str(rg1_file()), "--question", "Is there effusion?", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["demo"] is True and isinstance(out["answer"], str)
    r = runner.invoke(app, ["ask", str(require_nih_pngs()[0]), "-q", "Heart size?"])
    assert r.exit_code == 0, r.output
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"garbage")
    assert runner.invoke(app, ["ask", str(bad), "-q", "Heart?"]).exit_code == 1
    png, dcm = tmp_path / "cxr.png", tmp_path / "cxr.dcm"
    r = runner.invoke(
        app, ["generate-image", "--report", "Normal chest.", "--out", str(png), "--dicom", str(dcm)]
    )
    assert r.exit_code == 0, r.output
    assert "256 codes" in r.stdout
    assert Image.open(png).size == (256, 256)
    assert dcmread(dcm).ConversionType == "SYN"
    monkeypatch.delenv("CXR_NODE_MODEL_DIR")
    assert runner.invoke(app, ["generate-image", "--report", "x", "--out", str(png)]).exit_code == 2


@pytest.fixture
def db_env(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A migrated SQLite database of the CLI's own (``cxr-node db upgrade``)."""
    db = tmp_path / "node.sqlite3"
    monkeypatch.setenv("CXR_NODE_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("CXR_NODE_SPOOL_DIR", str(tmp_path / "spool"))
    r = runner.invoke(app, ["db", "upgrade"])
    assert r.exit_code == 0, r.output
    return db


def test_ids_beyond_the_database_are_bad_usage(db_env: Path, runner: CliRunner) -> None:
    """A job, token or delivery id the database cannot hold (as the API's ``le=2**31 - 1``)
    is refused as bad usage (exit 2, one message), not an ``OverflowError`` traceback."""
    huge = "99999999999999999999"
    for args in (
        ["jobs", "show", huge],
        ["jobs", "retry", huge],
        ["jobs", "cancel", huge],
        ["jobs", "resend", huge],
        ["jobs", "priority", huge, "1"],
        ["jobs", "withdraw", huge, "--reason", "wrong study"],
        ["tokens", "revoke", huge],
        ["deliveries", "resend", huge],
        ["jobs", "show", str(2**31)],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (args, r.output)
        assert "Traceback" not in r.output and "OverflowError" not in r.output, args
    r = runner.invoke(app, ["jobs", "show", str(2**31 - 1)])
    assert r.exit_code == 1 and "does not exist" in r.stderr, r.output


def test_a_database_that_does_not_answer_is_one_line(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A database URL nothing answers at: every command on the database exits 1 with one
    line naming the URL without its password, not a SQLAlchemy traceback; ``--json`` writes
    nothing on stdout."""
    monkeypatch.setenv(
        "CXR_NODE_DATABASE_URL", "postgresql+psycopg://nobody:s3cret-pw@127.0.0.1:1/x"
    )
    monkeypatch.setenv("CXR_NODE_SPOOL_DIR", str(tmp_path / "spool"))
    for args in (
        ["db", "upgrade"],
        ["status", "--json"],
        ["jobs", "list", "--json"],
        ["jobs", "show", "1"],
        ["tokens", "list", "--json"],
        ["deliveries", "failed", "--json"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (args, r.output)
        assert r.stdout == "", args
        assert r.stderr.count("\n") == 1 and "does not answer" in r.stderr, (args, r.stderr)
        assert "nobody:***@127.0.0.1:1/x" in r.stderr and "s3cret-pw" not in r.stderr, args


def test_echo_refuses_a_bad_calling_ae_as_bad_usage(runner: CliRunner) -> None:
    """``echo --calling-ae`` not an AE title (too long, empty, a backslash) is bad usage:
    exit 2 and one message naming the option, not a ``ValueError`` traceback."""
    for calling in ("TOOLONGAETITLE12345", "", "A\\B"):
        r = runner.invoke(
            app, ["echo", "PACS@127.0.0.1:1", "--calling-ae", calling, "--timeout", "1"]
        )
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (calling, r.output)
        assert "--calling-ae" in r.stderr and "not a valid AE title" in r.stderr, r.stderr


def test_tokens_create_refuses_the_names_the_api_refuses(db_env: Path, runner: CliRunner) -> None:
    """``tokens create --name`` takes what ``POST /api/tokens`` takes: a name with a line
    break or a control character (which would forge a line of ``tokens list``), an empty one
    one of spaces only, or one over 128 characters (cut short before) is bad usage, exit 2,
    and no token is made and nothing audited."""
    for name in ("ops\n2\tadmin\tforged\tactive", "ops\x1b[2J", "", "a" * 129, "ops\n", "  "):
        r = runner.invoke(app, ["tokens", "create", "--role", "viewer", "--name", name])
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (name, r.output)
        assert "--name" in r.stderr and "cxr_" not in r.stdout, name
    assert json.loads(runner.invoke(app, ["tokens", "list", "--json"]).stdout) == []
    r = runner.invoke(app, ["tokens", "create", "--role", "viewer", "--name", "a" * 128])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["tokens", "create", "--role", "viewer", "--name", "ops-1 x@y:z"])
    assert r.exit_code == 0, r.output
    names = [t["name"] for t in json.loads(runner.invoke(app, ["tokens", "list", "--json"]).stdout)]
    assert names == ["a" * 128, "ops-1 x@y:z"]
