"""``cxr-node train run`` / ``train mimic-manifest`` through typer's CliRunner."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from models.bundle import ModelBundle
from node.cli import app
from node.cli.train import node_gray8
from tests.helpers import require_nih_pngs, rg1_file
from tests.training.conftest import write_dataset
from tests.training.test_mimic import fake_mimic

runner = CliRunner()


@pytest.fixture(autouse=True)
def _keep_process_state() -> Iterator[None]:
    """The commands set the private umask and the log level: restore both after each test."""
    umask = os.umask(0o022)
    os.umask(umask)
    level = logging.getLogger().level
    yield
    os.umask(umask)
    logging.getLogger().setLevel(level)


def _run(*args: str | Path) -> tuple[int, str]:
    """Exit code and output, whitespace collapsed (rich wraps long error lines)."""
    res = runner.invoke(app, ["train", *[str(a) for a in args]])
    return res.exit_code, " ".join(res.output.split())


def test_bad_manifest_line_is_a_clear_error(tmp_path: Path, base_bundle: ModelBundle) -> None:
    manifest = tmp_path / "manifest.jsonl"
    good = {"id": "a", "image": "a.png", "split": "train", "impression": "Normal."}
    manifest.write_text(json.dumps(good) + "\n{not json\n", encoding="utf-8")
    code, output = _run("run", manifest, "--bundle", base_bundle.root, "--out", tmp_path / "o")
    assert code == 1
    assert "ManifestError" in output and "manifest.jsonl:2: not JSON" in output
    assert "Traceback" not in output
    manifest.write_text(json.dumps({**good, "split": "dev"}) + "\n", encoding="utf-8")
    code, output = _run("run", manifest, "--bundle", base_bundle.root, "--out", tmp_path / "o")
    assert code == 1 and "manifest.jsonl:1: 'split' must be one of" in output
    assert not (tmp_path / "o").exists()


def test_missing_inputs(tmp_path: Path, base_bundle: ModelBundle) -> None:
    manifest = write_dataset(tmp_path / "data").path
    code, output = _run(
        "run", tmp_path / "absent.jsonl", "--bundle", base_bundle.root, "--out", tmp_path / "o"
    )
    assert code == 1 and "no manifest at" in output
    code, output = _run("run", manifest, "--bundle", tmp_path / "nobundle", "--out", tmp_path / "o")
    assert code == 1 and "BundleError" in output and "is not a directory" in output
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 1\n", encoding="utf-8")
    code, output = _run(
        "run", manifest, "--bundle", base_bundle.root, "--out", tmp_path / "o", "--config", bad
    )
    assert code == 1 and "unknown training setting(s): learning_rate" in output
    code, output = _run(
        "run", manifest, "--bundle", base_bundle.root, "--out", tmp_path / "o", "--stage", "3"
    )
    assert code == 2  # typer refuses the option


def test_run_then_resume(tmp_path: Path, base_bundle: ModelBundle) -> None:
    manifest = write_dataset(tmp_path / "data", vqa=True).path
    config = tmp_path / "train.toml"
    config.write_text(
        'save_steps = 2\nlogging_steps = 1\nwarmup_steps = 0\nlr_scheduler = "constant"\n'
        "gradient_checkpointing = false\n",
        encoding="utf-8",
    )
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--bundle", base_bundle.root, "--config", config, "--lr", "3e-3", "--stage", "2"]
    code, output = _run("run", manifest, "--out", out, "--work", work, "--max-steps", "2", *common)
    assert code == 0, output
    assert "trained 2 step(s)" in output
    assert ModelBundle.open(out).manifest["source"]["steps"] == 2
    assert (work / "checkpoints" / "checkpoint-2").is_dir()
    # a second run in the same work folder must resume (or go elsewhere)
    code, output = _run(
        "run", manifest, "--out", tmp_path / "o2", "--work", work, "--max-steps", "4", *common
    )
    assert code == 1 and "--resume" in output
    code, output = _run(
        "run", manifest, "--out", out, "--work", work, "--overwrite", "--max-steps", "4",
        "--resume", "--model-version", "site-1", *common,
    )  # fmt: skip
    assert code == 0, output
    resumed = ModelBundle.open(out)
    assert resumed.manifest["source"]["steps"] == 4
    assert resumed.manifest["source"]["resumed_from"] == "checkpoint-2"
    assert resumed.model_version == "site-1"
    rows = (work / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss") and [r.split(",")[0] for r in rows[1:]] == [
        "1", "2", "3", "4"
    ]  # fmt: skip
    # the resumed run ends where an uninterrupted one does, output head included
    # (transformers' own reload of a checkpoint misses GPT-NeoX's renamed embed_out)
    straight = tmp_path / "straight"
    code, output = _run(
        "run", manifest, "--out", straight, "--work", tmp_path / "w2", "--max-steps", "4", *common
    )
    assert code == 0, output
    a = load_file(resumed.llm_dir / "model.safetensors")
    b = load_file(straight / "llm" / "model.safetensors")
    assert a.keys() == b.keys() and "embed_out.weight" in a
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    code, output = _run("run", manifest, "--out", out, "--work", work, "--max-steps", "1", *common)
    assert code == 1 and "exists and is not empty" in output


def test_mimic_manifest_command(tmp_path: Path) -> None:
    root, reports = fake_mimic(tmp_path)
    out = tmp_path / "mimic.jsonl"
    code, output = _run("mimic-manifest", root, "--reports", reports, "--out", out)
    assert code == 0, output
    assert "5 record(s) of 7 image(s)" in output and len(out.read_text().splitlines()) == 5
    assert "No acute" not in output and "10000032" not in output  # counts only
    code, output = _run("mimic-manifest", tmp_path, "--reports", reports, "--out", out)
    assert code == 1 and "MimicError" in output


def test_node_loader_reads_dicom_and_png() -> None:
    gray = node_gray8(rg1_file("RG1_UNCR.dcm"))
    assert gray.dtype == np.uint8 and gray.ndim == 2 and gray.std() > 10
    png = node_gray8(require_nih_pngs()[0])
    assert png.dtype == np.uint8 and png.shape == (512, 512)
