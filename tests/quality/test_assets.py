"""The phrase lists ship as package data, with their licence, and nothing downloads."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from models.labeler.observations import FINDINGS
from models.labeler.phrases import load_phrase_lists
from tests.helpers import REPO

ASSETS = REPO / "models" / "assets"


def test_every_phrase_list_is_in_the_wheels_package_data() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["models.assets"]
    packed = {p for pattern in patterns for p in ASSETS.glob(pattern)}
    shipped = {p for p in (ASSETS / "chexpert").rglob("*") if p.is_file()}
    assert len(shipped) == 18  # 14 mention lists, 3 unmention lists, the licence
    assert shipped <= packed


def test_the_licence_names_the_copyright_holder() -> None:
    text = (ASSETS / "chexpert" / "LICENSE-chexpert-labeler.txt").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2018 Stanford Machine Learning Group" in text


def test_the_lists_load_for_every_finding() -> None:
    lists = load_phrase_lists()
    for obs in FINDINGS:
        assert lists.mentions[obs], obs
        assert lists.sizes[f"mention/{obs.value}"] >= 1
    # 53 other findings in CheXpert's no_finding.txt
    assert len(lists.other_findings) == lists.sizes["mention/no_finding"] == 53


def test_labeling_and_scoring_need_no_network(tmp_path: Path) -> None:
    """A fresh interpreter with sockets and nltk.download disabled labels and scores."""
    probe = """
import socket
def refuse(*args, **kwargs):
    raise RuntimeError("network use")
socket.socket.connect = refuse
socket.create_connection = refuse
import nltk
nltk.download = refuse
from models.concordance import compare_reports
pair = compare_reports("No pneumothorax. Small effusions.", "Small effusion, no pneumothorax.")
print(pair.text.rouge_l_f, pair.agreement_rate)
"""
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NLTK_DATA": str(tmp_path)},
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # LCS "no pneumothorax" (or "small effusion"): 2 of 4 stemmed words each side
    assert out.stdout.split() == ["0.5", "1.0"]
    assert out.stderr == ""
