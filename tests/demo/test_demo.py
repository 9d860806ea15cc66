"""The README's main job (``cxr-node demo``) end to end, run twice on one work directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from rich.console import Console

from node.demo import run_demo, sr_text_items

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_returns_a_draft_sr_on_every_run(tmp_path: Path) -> None:
    for run in (1, 2):  # the second run re-sends the same study to a kept work directory
        out = Console(record=True, width=200)
        assert run_demo(workdir=tmp_path, timeout=300, console=out) == 0, f"run {run}"
        text = out.export_text()
        assert "DEMO MODEL" in text
        inbox = sorted((tmp_path / "pacs-inbox").glob("*.dcm"))
        assert len(inbox) == 1, f"run {run}: {inbox}"
        sr = dcmread(inbox[0])
        assert sr.Modality == "SR"
        assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
            "PARTIAL",
            "UNVERIFIED",
            "PRELIMINARY",
        )
        items = dict(sr_text_items(sr))
        assert "Impression" in items and items["Impression"].strip()
        assert any("DEMO MODEL" in v for v in items.values())
