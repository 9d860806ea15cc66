"""The wheel carries what the product needs at run time (no file outside the package)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_a_wheel_carries_the_tokenizer_and_its_licence(tmp_path: Path) -> None:
    """A non-editable install reads GPT-NeoX-20B from its own package data."""
    pip = [sys.executable, "-m", "pip"]
    build = ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")]
    subprocess.run([*pip, *build, str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("llm_cxr_node-*.whl")
    source = REPO / "models" / "assets" / "gpt-neox-20b-tokenizer.json"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "models/assets/LICENSE-gpt-neox-20b-tokenizer.txt" in names
        packed = zf.read("models/assets/gpt-neox-20b-tokenizer.json")
    assert hashlib.sha256(packed).digest() == hashlib.sha256(source.read_bytes()).digest()

    target = tmp_path / "site"
    install = ["install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run([*pip, *install], check=True, capture_output=True)
    probe = (
        "import models, models.text as t; "
        "print(models.__file__); print(len(t.LLMCXRTokenizer(t.build_llmcxr_tokenizer())))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "50281"
