"""``cxr-node evaluate --predictions``: another system's reports scored end to end."""

from __future__ import annotations

import csv
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from models.concordance import bleu4, rouge_l_f
from models.evaluation.optional import chexbert_f1, radgraph_f1
from models.evaluation.text_metrics import corpus_bleu
from node.cli import app

runner = CliRunner()

# Reference and generated reports, and what the rule labeler reads in them:
#   s1 ref effusion P               | gen effusion P
#   s2 ref no finding P             | gen pneumonia P
#   s3 ref edema P                  | gen edema uncertain ("possible") -> P under U-ones
#   s4 ref pneumothorax P           | gen "No pneumothorax." -> no finding P, pneumothorax N
#   s5 lateral (not selected), s6 train (not selected)
MANIFEST: list[dict[str, Any]] = [
    {
        "id": "s1",
        "image": "s1.png",
        "split": "test",
        "view": "PA",
        "findings": "There is a small left pleural effusion.",
        "impression": "Left pleural effusion.",
        "vqa": [{"question": "Is there a pleural effusion?", "answer": "yes"}],
    },
    {
        "id": "s2",
        "image": "s2.png",
        "split": "test",
        "view": "AP",
        "impression": "No acute cardiopulmonary process.",
        "vqa": [{"question": "Is there a pneumothorax?", "answer": "no"}],
    },
    {
        "id": "s3",
        "image": "s3.png",
        "split": "test",
        "view": "PA",
        "findings": "Mild pulmonary edema.",
        "impression": "Edema.",
    },
    {
        "id": "s4",
        "image": "s4.png",
        "split": "test",
        "view": "PA",
        "impression": "Right apical pneumothorax.",
    },
    {"id": "s5", "image": "s5.png", "split": "test", "view": "LATERAL", "impression": "Normal."},
    {"id": "s6", "image": "s6.png", "split": "train", "view": "PA", "impression": "Normal."},
]
PREDICTIONS: list[dict[str, Any]] = [
    {
        "id": "s1",
        "report": "FINDINGS: Small left pleural effusion. IMPRESSION: Pleural effusion.",
        "vqa": [{"question": "Is there a pleural effusion?", "answer": "Yes, on the left."}],
    },
    {
        "id": "s2",
        "report": "IMPRESSION: Right lower lobe pneumonia.",
        "vqa": [{"question": "Is there a pneumothorax?", "answer": "yes"}],
    },
    {"id": "s3", "report": "FINDINGS: Possible mild pulmonary edema."},
    {"id": "s4", "report": "IMPRESSION: No pneumothorax."},
    {"id": "s5", "report": "Normal."},
]
REFERENCES = [
    "FINDINGS: There is a small left pleural effusion. IMPRESSION: Left pleural effusion.",
    "IMPRESSION: No acute cardiopulmonary process.",
    "FINDINGS: Mild pulmonary edema. IMPRESSION: Edema.",
    "IMPRESSION: Right apical pneumothorax.",
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return (
        write_jsonl(tmp_path / "manifest.jsonl", MANIFEST),
        write_jsonl(tmp_path / "predictions.jsonl", PREDICTIONS),
    )


def test_predictions_end_to_end(files: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, predictions = files
    out = tmp_path / "out"
    args = ["evaluate", str(manifest), "--out", str(out), "--predictions", str(predictions)]
    r = runner.invoke(app, [*args, "--no-meteor"])
    assert r.exit_code == 0, r.output
    assert "4 records selected, 4 reports scored" in r.stdout
    printed = r.output.lower()  # no report text and no record id is printed
    assert "effusion" not in printed and "pneumonia" not in printed
    assert not any(f" s{k}" in printed or f"s{k}," in printed for k in range(1, 7))
    data = json.loads((out / "results.json").read_text())
    s = data["summary"]
    # per class, gen / ref over s1..s4 -> tp fp fn tn:
    #   No Finding 0001/0100 -> 0 1 1 2: F1 0, AUROC (0 + 2/3) / 2 = 1/3
    #   Pneumothorax 0000/0001 -> 0 0 1 3: F1 0, AUROC 1/2
    #   Edema 0010/0010, Effusion 1000/1000 -> F1 1, AUROC 1
    #   Cons/Pneumonia 0100/0000 -> 0 1 0 3: F1 0, AUROC undefined (no positive)
    #   Lung Lesion 0000/0000: F1 and AUROC undefined
    # micro: tp 2, fp 2, fn 2, tn 18 -> F1 4/8; AUROC (2/4 + 18/20) / 2 = 0.7
    # macro F1 (0+0+1+1+0)/5; macro AUROC (1/3 + 1/2 + 1 + 1)/4
    # weighted (supports 1, 1, 1, 1, 0): F1 2/4, AUROC as macro
    assert s["f1_micro"] == pytest.approx(0.5, abs=1e-6)
    assert s["auroc_micro"] == pytest.approx(0.7, abs=1e-6)
    assert s["f1_macro"] == pytest.approx(0.4, abs=1e-6)
    assert s["auroc_macro"] == pytest.approx((1 / 3 + 0.5 + 2) / 4, abs=1e-6)
    assert s["f1_weighted"] == pytest.approx(0.5, abs=1e-6)
    assert s["auroc_weighted"] == pytest.approx((1 / 3 + 0.5 + 2) / 4, abs=1e-6)
    hyps = [str(p["report"]) for p in PREDICTIONS[:4]]
    bleu = corpus_bleu(hyps, REFERENCES)
    for n in (1, 2, 3, 4):
        assert s[f"bleu{n}"] == pytest.approx(bleu[n], abs=1e-12)
    rouge = sum(rouge_l_f(h, ref) for h, ref in zip(hyps, REFERENCES, strict=True)) / 4
    assert s["rouge_l"] == pytest.approx(rouge, abs=1e-12)
    assert s["meteor"].startswith("skipped: METEOR not requested")
    assert s["vqa_accuracy"] == pytest.approx(0.5)  # "Yes, on the left." right; "yes" wrong
    assert s["fid"].startswith("skipped:") and s["chexbert_f1"].startswith("skipped:")
    meta = data["meta"]
    assert (meta["source"], meta["n_selected"], meta["predictions_unused"]) == ("predictions", 4, 1)
    assert meta["uncertain_policy"] == "u_ones" and meta["demo"] is None
    assert len(meta["manifest_sha256"]) == 64 and "s1" not in json.dumps(data)

    md = (out / "results.md").read_text()
    for column in ("AUROC micro", "F1 weighted", "BLEU-4", "ROUGE-L", "METEOR", "VQA accuracy"):
        assert f"| {column} |" in md
    assert "| FID | skipped: the predictions give reports only" in md
    assert "| F1 micro | 0.500 |" in md and "| AUROC micro | 0.700 |" in md
    assert "| Consolidation/Pneumonia | 4 | 0 | 1 |" in md

    csv_path = out / "per_study.csv"
    assert stat.S_IMODE(csv_path.stat().st_mode) == 0o600
    with csv_path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["id"] for row in rows] == ["s1", "s2", "s3", "s4"]
    s3 = rows[2]
    assert s3["generated_edema"] == "1" and s3["reference_edema"] == "1"
    assert s3["generated_report"] == hyps[2] and s3["reference_report"] == REFERENCES[2]
    assert float(s3["bleu4"]) == pytest.approx(bleu4(hyps[2], REFERENCES[2]), abs=1e-6)
    assert (rows[0]["vqa_n"], rows[0]["vqa_correct"], rows[1]["vqa_correct"]) == ("1", "1", "0")
    assert rows[1]["generated_consolidation_pneumonia"] == "1"


def test_uncertain_negative_and_all_views(files: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, predictions = files
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        [
            *("evaluate", str(manifest), "--out", str(out), "--predictions", str(predictions)),
            *("--no-meteor", "--uncertain", "negative", "--all-views", "--limit", "5"),
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["n_selected"] == 5 and data["meta"]["uncertain_policy"] == "u_zeros"
    edema = next(c for c in data["classification"]["classes"] if c["key"] == "edema")
    assert (edema["tp"], edema["fn"]) == (0, 1)  # "possible edema" no longer counts


@pytest.mark.parametrize(
    ("manifest_rows", "prediction_rows", "message"),
    [
        (None, [{"id": "s1"}], "'report' must be a string"),
        (None, [*PREDICTIONS, {"id": "zz", "report": "x"}], "id not in the manifest"),
        (None, PREDICTIONS[:3], "1 selected record(s) with a reference report have no"),
        ([{"id": "x", "image": "x.png", "split": "test"}], PREDICTIONS, "needs 'findings'"),
    ],
)
def test_bad_inputs_exit_1(
    tmp_path: Path,
    manifest_rows: list[dict[str, Any]] | None,
    prediction_rows: list[dict[str, Any]],
    message: str,
) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", manifest_rows or MANIFEST)
    predictions = write_jsonl(tmp_path / "p.jsonl", prediction_rows)
    r = runner.invoke(
        app,
        [
            "evaluate",
            str(manifest),
            "--out",
            str(tmp_path / "o"),
            "--predictions",
            str(predictions),
        ],
    )
    assert r.exit_code == 1, r.output
    assert message in " ".join(r.output.split())  # the console wraps long lines
    assert not (tmp_path / "o" / "results.json").exists()


def test_bad_options_exit_2(files: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, predictions = files
    base = ["evaluate", str(manifest), "--out", str(tmp_path / "o")]
    assert runner.invoke(app, [*base, "--tasks", "report,xray"]).exit_code == 2
    assert runner.invoke(app, [*base, "--uncertain", "maybe"]).exit_code == 2
    assert runner.invoke(app, [*base, "--split", "dev"]).exit_code == 2
    assert runner.invoke(app, [*base, "--predictions", str(tmp_path / "none.jsonl")]).exit_code == 2
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "s1", "image": "a.png", "split": "test"\n')
    r = runner.invoke(
        app,
        ["evaluate", str(broken), "--out", str(tmp_path / "o"), "--predictions", str(predictions)],
    )
    assert r.exit_code == 1 and "broken.jsonl:1: not JSON" in " ".join(r.output.split())


def test_optional_metrics_say_why_they_are_skipped(tmp_path: Path) -> None:
    hyps, refs = ["no effusion"], ["small effusion"]
    for got, what in (
        (chexbert_f1(hyps, refs, None), "no CheXbert weights given"),
        (radgraph_f1(hyps, refs, None), "no RadGraph model given"),
        (chexbert_f1(hyps, refs, tmp_path), "f1chexbert"),
        (radgraph_f1(hyps, refs, tmp_path), "radgraph"),
    ):
        assert not isinstance(got, float) and what in got.reason


def test_optional_metric_child_reports_its_failure(tmp_path: Path) -> None:
    """The child process runs offline and answers with the error instead of raising."""
    from models.evaluation.optional import _run

    got = _run({"metric": "chexbert", "dir": str(tmp_path), "device": "cpu"}, ["a"], ["b"], 120)
    assert not isinstance(got, float)
    assert got.reason.startswith("chexbert failed offline: ModuleNotFoundError")
    assert not list(tmp_path.iterdir())  # nothing left behind where the weights would be
