"""Issue #28's acceptance test on CPU: a tiny model in the real layout learns its
training reports, and the result is a bundle the node serves: train -> bundle -> serve ->
SR, the node's worker drafting a DICOM study of a training image with the memorised report.

Memorisation settings (200 steps of one example, lr 5e-3 with 10 warm-up steps and linear
decay) were checked to reproduce all four reports with 1 and 2 threads and seeds 1-3 and
42; a constant lr of 1e-2 for 100 steps did not (its last steps oscillate).

The memorisation run trains the CXR -> report task only (``tasks = ["report"]``): with a
model this small, the report -> CXR examples' 258-token responses dominate the updates and
delay the image-conditioned reports past 300 steps (a minute and more on 2 cores). A second
short run trains the paper's full alternation with VQA and general data mixed in.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import DECODER_FILE, ENCODER_FILE, ModelBundle
from models.preprocess import to_model_input
from models.runtime import LLMCXR
from models.training.codes_cache import load_gray8_pil
from models.training.recipe import load_config
from models.training.trainer import run_training
from tests.training.conftest import REPORTS, write_dataset


def _losses(path: Path) -> list[float]:
    with path.open(encoding="utf-8", newline="") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_tiny_model_memorises_its_reports(tmp_path: Path, base_bundle: ModelBundle) -> None:
    manifest = write_dataset(tmp_path / "data")
    cfg = load_config(
        stage=2,
        tasks=("report",),
        max_steps=200,
        lr=5e-3,
        warmup_steps=10,
        per_device_batch=1,
        logging_steps=20,
        save_steps=1000,
        gradient_checkpointing=False,
    )
    out = tmp_path / "trained"
    result = run_training(manifest.path, base_bundle.root, out, cfg, progress=False)

    losses = _losses(result.metrics_csv)
    assert len(losses) == 11  # step 1, then every 20 steps
    assert losses[0] > 9.0 and losses[-1] < 0.5, losses
    assert result.first_loss == losses[0] and result.final_loss == losses[-1]
    assert (result.steps, result.codes_encoded, result.codes_cached) == (200, 4, 0)
    assert result.examples == {"report": 4, "image": 0, "vqa": 0, "general": 0}

    bundle = ModelBundle.open(out)
    report = bundle.verify()  # checksums, layout, ONNX, text and image smoke generation
    assert report.ok, report.failures()
    assert bundle.demo and bundle.model_name == base_bundle.model_name  # DEMO stays DEMO
    source = bundle.manifest["source"]
    assert source["dataset"] == {
        "path": str(manifest.path.resolve()),
        "sha256": manifest.sha256,
        "records": 4,
    }
    assert source["stage"] == 2 and source["steps"] == 200
    assert source["base"]["model_version"] == base_bundle.model_version
    assert source["final_loss"] == losses[-1] and source["train_config"]["lr"] == 5e-3
    assert bundle.model_version == f"{base_bundle.model_version}+s2-{manifest.sha256[:8]}"
    for rel in (ENCODER_FILE, DECODER_FILE):  # the base's VQ-GAN, unchanged
        assert bundle.files[rel]["sha256"] == base_bundle.files[rel]["sha256"]
    assert json.loads((out / "llm" / "config.json").read_text())["vocab_size"] == 51305
    assert not (out / "llm" / "training_args.bin").exists()

    runtime = LLMCXR.from_bundle(out)
    for record, expected in zip(manifest.records, REPORTS, strict=True):
        draft = runtime.report(to_model_input(load_gray8_pil(record.image)), max_new_tokens=24)
        assert draft.text == expected and draft.demo
        assert draft.impression == expected and draft.stop_reason == "end"
    codes, image = runtime.report_to_image(REPORTS[1])
    assert codes.shape == (256,) and codes.min() >= 0 and codes.max() < 1024
    assert image.shape == (256, 256) and image.dtype == np.uint8
    _serve_to_sr(tmp_path, out, bundle, load_gray8_pil(manifest.records[2].image))


def _texts(item: Any) -> list[str]:
    """Every TextValue (0040,A160) of an SR content tree."""
    out = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        out += _texts(child)
    return out


def _serve_to_sr(tmp: Path, trained: Path, bundle: ModelBundle, pixels: np.ndarray) -> None:
    """train -> bundle -> serve -> SR: the node's worker drafts a DICOM study of a training
    image with the trained bundle and writes its SR."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from node.db.models import JobState
    from node.runtime.modelhost import ModelHost
    from node.runtime.worker import Worker
    from tests.helpers import wait_for
    from tests.worker.conftest import make_env

    (tmp / "node").mkdir()
    env = make_env(f"sqlite:///{tmp / 'node.sqlite3'}", tmp / "node", trained)
    try:
        host = ModelHost(env.settings)
        host.start()
        env.add_study(view="PA", pixels=pixels, study_uid=generate_uid())
        [job_id] = env.queue_all()
        worker = Worker(env.context(), host, poll_interval=0.1)
        worker.start()
        try:
            wait_for(lambda: env.job(job_id).state is JobState.done, timeout=120, interval=0.2)
        finally:
            worker.stop()
            host.stop()
        [draft] = env.drafts(job_id)
        assert draft.model_version == bundle.model_version and draft.demo
        assert draft.full_text == REPORTS[2]  # the memorised report, through DICOM ingest
        sr = dcmread(
            env.settings.spool_dir / "outputs" / f"{env.job(job_id).sr_sop_instance_uid}.dcm"
        )
        assert sr.Modality == "SR" and sr.CompletionFlag == "PARTIAL"
        assert REPORTS[2] in _texts(sr)
    finally:
        env.engine.dispose()


def test_full_recipe_with_vqa_and_general_data(tmp_path: Path, base_bundle: ModelBundle) -> None:
    manifest = write_dataset(tmp_path / "data", vqa=True, findings=True)
    general = tmp_path / "dolly.jsonl"
    items = [{"instruction": f"Repeat the word {w}.", "response": w} for w in ("red", "blue")]
    general.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    cfg = load_config(
        stage=2,
        max_steps=12,
        lr=3e-3,
        warmup_steps=2,
        logging_steps=1,
        save_steps=1000,
        report_to=("csv",),
    )
    result = run_training(
        manifest.path, base_bundle.root, tmp_path / "out", cfg, general=general, progress=False
    )
    # 4 x (CXR -> report, report -> CXR, VQA) and 12 * 0.2 / 0.8 = 3 general slots
    assert result.examples == {"report": 4, "image": 4, "vqa": 4, "general": 3}
    assert result.notes == []  # report_to without tensorboard: nothing to say
    losses = _losses(result.metrics_csv)
    assert len(losses) == 12 and losses[0] > 10.0, losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.8, losses  # ~10.6 -> ~9.1 seen
    with result.metrics_csv.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    rates = [float(r["learning_rate"]) for r in rows]
    assert rates[0] < rates[2] == max(rates) == 3e-3 and rates[-1] < 1e-3  # warm-up, decay
    source = ModelBundle.open(tmp_path / "out").manifest["source"]
    assert source["general"]["sha256"] and source["examples"]["general"] == 3
    assert source["train_config"]["tasks"] == ["report", "image", "vqa"]
    assert source["train_config"]["gradient_checkpointing"] is True
