"""Fixtures of the training tests: a small DEMO bundle and tiny image/report datasets.

The bundle is built once per test session (GPT-NeoX hidden 64, 2 layers, the real
LLM-CXR token layout and ONNX VQ-GAN); tests must copy it before changing it. Images are
synthetic 256x256 grey PNGs of random 16x16 blocks, one seed each, so that the VQ-GAN
gives each a different code sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.bundle import ModelBundle
from models.dataset import Manifest, ManifestRecord, VQAPair, write_manifest

#: Short, distinct impressions the end-to-end test memorises.
REPORTS = (
    "Normal chest.",
    "Left pleural effusion.",
    "Right lower lobe pneumonia.",
    "Cardiomegaly, no edema.",
)


def block_image(seed: int, side: int = 256) -> np.ndarray:
    """A grey image of random 16x16-pixel blocks (reproducible from ``seed``)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (16, 16))
    return np.kron(blocks, np.ones((side // 16, side // 16))).astype(np.uint8)


def write_dataset(
    folder: Path,
    reports: Sequence[str] = REPORTS,
    *,
    vqa: bool = False,
    findings: bool = False,
) -> Manifest:
    """PNGs ``img<i>.png`` and a manifest ``manifest.jsonl`` of frontal first-study train
    records whose impression is ``reports[i]`` (with findings / VQA pairs if asked)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, report in enumerate(reports):
        path = folder / f"img{i}.png"
        Image.fromarray(block_image(i), mode="L").save(path)
        records.append(
            ManifestRecord(
                id=f"r{i}",
                image=path,
                split="train",
                patient_id=f"p{i}",
                study_id=f"s{i}",
                view="PA",
                study_order=0,
                findings=f"Finding number {i}." if findings else None,
                impression=report,
                vqa=(VQAPair("Is there an effusion?", "yes" if i % 2 else "no"),) if vqa else (),
            )
        )
    return write_manifest(folder / "manifest.jsonl", records)


@pytest.fixture(scope="session")
def base_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """A DEMO bundle (hidden 64, 2 layers, 4 heads), built once; read-only."""
    from models.demo import create_demo_bundle

    return create_demo_bundle(tmp_path_factory.mktemp("train-base") / "bundle", seed=0)
