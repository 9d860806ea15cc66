"""The training config (paper presets, TOML/JSON files, overrides) and the paraphrases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.dataset import ManifestRecord
from models.prompts import IMAGE_INSTRUCTION, REPORT_INSTRUCTION
from models.training.paraphrases import IMAGE_PARAPHRASES, REPORT_PARAPHRASES, pick
from models.training.recipe import ConfigError, TrainConfig, load_config, paper_stage, report_text


def test_paper_defaults() -> None:
    cfg = load_config()
    assert cfg == paper_stage(1) == TrainConfig()
    assert (cfg.epochs, cfg.lr, cfg.warmup_steps, cfg.per_device_batch) == (5.0, 5e-6, 50, 2)
    assert (cfg.max_length, cfg.bf16, cfg.general_mix) == (2048, True, 0.2)
    assert cfg.report_sections == ("findings", "impression") and cfg.section_headings
    assert cfg.tasks == ("report", "image") and not cfg.first_frontal_only
    two = paper_stage(2)
    assert two.stage == 2 and two.first_frontal_only
    assert two.report_sections == ("impression",) and not two.section_headings
    assert two.tasks == ("report", "image", "vqa")
    assert (two.epochs, two.lr) == (cfg.epochs, cfg.lr)
    with pytest.raises(ConfigError, match="stage"):
        paper_stage(3)


def test_toml_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text(
        'stage = 2\nepochs = 3\nlr = 1e-5\nreport_to = ["csv"]\ndeepspeed = "ds.json"\n',
        encoding="utf-8",
    )
    cfg = load_config(path, lr=2e-5, max_steps=None)
    assert cfg.stage == 2 and cfg.first_frontal_only  # the stage-2 preset under the file
    assert cfg.epochs == 3.0 and isinstance(cfg.epochs, float)
    assert cfg.lr == 2e-5  # the command line wins
    assert cfg.max_steps == -1  # None overrides nothing
    assert cfg.report_to == ("csv",) and cfg.deepspeed == "ds.json"
    assert load_config(path, stage=1).stage == 1  # an explicit stage wins over the file
    assert not load_config(path, stage=1).first_frontal_only


def test_json_file_with_train_table(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"train": {"per_device_batch": 4, "tasks": ["report"]}}))
    cfg = load_config(path)
    assert cfg.per_device_batch == 4 and cfg.tasks == ("report",)
    assert cfg.to_dict()["tasks"] == ["report"]
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs = 0\n", "epochs must be > 0"),
        ("learning_rate = 1.0\n", "unknown training setting.*learning_rate"),
        ('lr = "fast"\n', "lr has the wrong type"),
        ("bf16 = 1\n", "bf16 has the wrong type"),
        ('tasks = ["report", "caption"]\n', "tasks must be"),
        ("general_mix = 1.0\n", "general_mix"),
        ("stage = 3\n", "stage must be 1 or 2"),
        ("epochs = [\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_report_text_per_stage(tmp_path: Path) -> None:
    record = ManifestRecord(
        id="a", image=tmp_path / "a.png", split="train", findings="Clear.", impression="Normal."
    )
    assert report_text(record, paper_stage(1)) == "FINDINGS: Clear. IMPRESSION: Normal."
    assert report_text(record, paper_stage(2)) == "Normal."
    only_findings = ManifestRecord(id="b", image=tmp_path / "b.png", split="train", findings="X.")
    assert report_text(only_findings, paper_stage(2)) is None


def test_ten_paraphrases_each_first_is_the_inference_one() -> None:
    import random

    for paraphrases, first in (
        (REPORT_PARAPHRASES, REPORT_INSTRUCTION),
        (IMAGE_PARAPHRASES, IMAGE_INSTRUCTION),
    ):
        assert len(paraphrases) == 10 and len(set(paraphrases)) == 10
        assert paraphrases[0] == first
        assert all(p.strip() == p and p.endswith(".") and "<image>" not in p for p in paraphrases)
        assert pick(paraphrases, None) == first
        rng = random.Random(0)
        assert {pick(paraphrases, rng) for _ in range(300)} == set(paraphrases)
    assert not set(REPORT_PARAPHRASES) & set(IMAGE_PARAPHRASES)
