"""``cxr-node chat``: questions from stdin, answers streamed to stdout, the window notice,
summaries, and the AI label; on the demo bundle, in process (like ``cxr-node ask``)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from node.cli import app
from tests.helpers import rg1_file
from tests.models.llm_fixtures import demo_bundle_dir


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv("CXR_NODE_CONFIG", raising=False)
    monkeypatch.setenv("CXR_NODE_MODEL_DIR", str(demo_bundle_dir()))
    monkeypatch.setenv("CXR_NODE_BACKEND_DTYPE", "float32")
    return CliRunner()


def test_chat_streams_answers_and_summaries(runner: CliRunner) -> None:
    lines = [
        "Is there a pleural effusion?",
        "",
        "And the heart size?",
        "/summary patient FINDINGS: Small left pleural effusion. IMPRESSION: Small effusion.",
        "/summary lawyer FINDINGS: x",
        "/quit",
        "never asked",
    ]
    r = runner.invoke(
        app,
        ["chat", str(rg1_file()), "--max-new-tokens", "6"],
        input="\n".join(lines) + "\n",
    )
    assert r.exit_code == 0, r.output
    answers = [a for a in r.stdout.split("\n") if a.strip()]
    assert len(answers) == 3  # two answers and one summary; the bad audience is refused
    assert "AI generated and unverified" in r.stderr and "DEMO model" in r.stderr
    assert "not asked: audience must be clinician or patient" in r.stderr


def test_chat_window_notice_and_arguments(runner: CliRunner) -> None:
    long = "Describe every finding of the lungs and the heart in detail. " * 25
    r = runner.invoke(
        app,
        ["chat", str(rg1_file()), "--max-new-tokens", "64"],
        input="\n".join([long] * 6) + "\n",
    )
    assert r.exit_code == 0, r.output
    assert "turn(s) were left out to fit the model's 2,048-token window" in r.stderr
    assert runner.invoke(app, ["chat"]).exit_code == 2  # neither FILE nor --study
