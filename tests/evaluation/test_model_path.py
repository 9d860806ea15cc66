"""The model path of ``cxr-node evaluate`` on the demo bundle and two real CXRs.

DEMO outputs are meaningless, so these tests check structure: what was generated, how
many, the columns, the DEMO flag, and report -> CXR images of 256 codes feeding FID.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from models.backends.base import GenerationRequest, GenerationResult
from models.evaluation import Skipped, evaluate
from models.evaluation.fid import save_extractor
from models.evaluation.scoring import PAPER_COLUMNS
from models.layout import CODES_PER_IMAGE
from models.runtime import LLMCXR
from node.cli import app
from tests.helpers import require_nih_pngs, rg1_file
from tests.models.llm_fixtures import demo_bundle_dir


class ResultSpy:
    """Delegates to the real backend and keeps what it returned (a spy, not a mock)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.seen: list[tuple[GenerationRequest, GenerationResult]] = []

    def load(self) -> None:
        self.inner.load()

    def health(self) -> dict[str, Any]:
        return dict(self.inner.health())

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results = list(self.inner.generate(requests))
        self.seen.extend(zip(requests, results, strict=True))
        return results


class HalfMeans(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean(dim=(1, 2, 3)), x[..., w:].mean(dim=(1, 2, 3))], 1)


@functools.cache
def _model() -> LLMCXR:
    m = LLMCXR.from_bundle(demo_bundle_dir(), backend_options={"dtype": "float32"})
    model = LLMCXR(m.bundle, ResultSpy(m.backend), m.image_tokenizer)  # type: ignore[arg-type]
    # shorter texts than the bundle's 128/64 tokens keep the test quick on 2 cores; an
    # image is always 256 codes
    model.defaults.update(report_max_new_tokens=24, vqa_max_new_tokens=8)
    return model


def _manifest(tmp_path: Path) -> Path:
    a, b = require_nih_pngs()[:2]
    rows = [
        {
            "id": "t1",
            "image": str(a),
            "split": "test",
            "view": "PA",
            "findings": "Heart size is normal. Lungs are clear.",
            "impression": "No acute cardiopulmonary process.",
            "vqa": [{"question": "Is there a pleural effusion?", "answer": "no"}],
        },
        {
            "id": "t2",
            "image": str(b),
            "split": "test",
            "view": "AP",
            "impression": "Small right pleural effusion.",
            "vqa": [{"question": "Is there a pneumothorax?", "answer": "no"}],
        },
        {"id": "t3", "image": str(b), "split": "test", "view": "LL", "impression": "Clear."},
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_evaluate_on_the_demo_bundle(tmp_path: Path) -> None:
    model = _model()
    spy = model.backend
    assert isinstance(spy, ResultSpy)
    spy.seen.clear()
    extractor = save_extractor(HalfMeans(), tmp_path / "fid.pt", input_size=32)
    progress: list[tuple[str, int, int]] = []
    result = evaluate(
        model,
        _manifest(tmp_path),
        out_dir=tmp_path / "out",
        fid_extractor=extractor,
        with_meteor=False,
        batch_size=2,
        progress=lambda *a: progress.append(a),
    )
    # two frontal records: 2 reports (one batch), 2 VQA answers, 2 report -> CXR images
    modes = [req.mode for req, _ in spy.seen]
    assert modes.count("text") == 4 and modes.count("image") == 2
    assert all(req.greedy for req, _ in spy.seen)
    images = [res for req, res in spy.seen if req.mode == "image"]
    assert all(len(res.image_codes or []) == CODES_PER_IMAGE for res in images)
    assert isinstance(result.fid, float) and result.fid >= 0.0
    assert result.meta["fid"].startswith("2 real and 2 generated images (0 failed)")
    assert ("report/vqa", 2, 2) in progress and ("image", 2, 2) in progress

    assert result.meta["demo"] is True and result.meta["source"] == "model"
    assert result.meta["n_selected"] == 2 and result.n_reports == 2 and result.n_failed == 0
    assert result.meta["generation"]["greedy"] is True
    assert result.meta["generation"]["report_max_new_tokens"] == 24
    texts = [res for req, res in spy.seen if req.mode == "text"]
    assert [len(res.token_ids) <= 24 for res in texts] == [True] * 4
    assert list(result.summary()) == [key for key, _ in PAPER_COLUMNS]
    assert not isinstance(result.vqa, Skipped) and result.vqa.n == 2

    out = tmp_path / "out"
    md = (out / "results.md").read_text()
    assert md.startswith(f"# Evaluation: {result.meta['model_name']}") and "(DEMO)" in md
    assert "**DEMO model**" in md and "| DEMO | yes |" in md
    for _key, title in PAPER_COLUMNS:
        assert f"| {title} |" in md
    assert json.loads((out / "results.json").read_text())["meta"]["demo"] is True
    with (out / "per_study.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == ["t1", "t2"]
    assert all(r["vqa_n"] == "1" and r["bleu4"] != "" for r in rows)


@pytest.mark.slow
def test_cli_runs_the_configured_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_NODE_MODEL_DIR", str(demo_bundle_dir()))
    monkeypatch.setenv("CXR_NODE_DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    out = tmp_path / "out"
    manifest = tmp_path / "dicom.jsonl"  # a real CR as DICOM: read as ingest reads it
    record = {"id": "d1", "image": str(rg1_file()), "split": "test", "view": "PA"}
    manifest.write_text(json.dumps({**record, "impression": "No acute process."}) + "\n")
    r = CliRunner().invoke(
        app,
        [
            *("evaluate", str(manifest), "--out", str(out)),
            *("--tasks", "report", "--limit", "1", "--no-meteor"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "DEMO model" in r.stdout and "1 records selected, 1 reports scored" in r.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["tasks"] == ["report"] and data["summary"]["vqa_accuracy"].startswith(
        "skipped: the vqa task was not requested"
    )
    assert data["summary"]["fid"].startswith("skipped: the image task was not requested")
