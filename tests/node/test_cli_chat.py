"""``cxr-node chat``: questions from stdin, answers streamed to stdout, the window notice,
summaries, and the AI label; on the demo bundle, in process (like ``cxr-node ask``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
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


def test_chat_draws_a_synthetic_image(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "synthetic-1.png").write_bytes(b"kept")  # an earlier file is not overwritten
    r = runner.invoke(
        app,
        ["chat", str(rg1_file()), "--image-dir", str(tmp_path), "--max-new-tokens", "4"],
        input="/image Large right pleural effusion.\n/image\nIs it large?\n",
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "synthetic-2.png"
    assert f"SYNTHETIC image, AI generated from the report, not a patient: {out}" in r.stdout
    assert (tmp_path / "synthetic-1.png").read_bytes() == b"kept"
    with Image.open(out) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape == (256, 256) and pixels.std() > 0
    assert "not asked: say /image REPORT" in r.stderr
    assert not (tmp_path / "synthetic-3.png").exists()
