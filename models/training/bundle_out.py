"""A trained LLM written as a new model bundle (``models.bundle`` layout).

The bundle holds the fine-tuned ``llm/`` (the Trainer's ``save_pretrained`` output: config
and weights, plus the base bundle's tokenizer), the base bundle's VQ-GAN files (hard-linked
where possible, else copied), and a manifest whose ``source`` records the provenance: the
training config, the base bundle's name and version, the dataset manifest's path and
sha256, the stage, steps and final loss. A model trained from a DEMO bundle stays DEMO
(its starting weights were random: its output is still not for clinical use). The bundle
is assembled in a hidden sibling folder and moved into place at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.bundle import LLM_DIR, MANIFEST, ModelBundle, copy_tree, write_manifest
from models.text import LLMCXRTokenizer, save_tokenizer_dir

__all__ = ["derive_version", "write_trained_bundle"]

#: files of a ``save_pretrained`` folder that belong in the bundle's ``llm/``
_MODEL_FILES = ("config.json", "generation_config.json")
_MODEL_SUFFIXES = (".safetensors", ".safetensors.index.json")
_MODEL_PREFIXES = ("pytorch_model",)


def derive_version(base: ModelBundle, stage: int, dataset_sha256: str) -> str:
    """``<base version>+s<stage>-<first 8 hex of the dataset sha256>``."""
    return f"{base.model_version}+s{stage}-{dataset_sha256[:8]}"


def _model_files(model_dir: Path) -> list[Path]:
    files = [
        p
        for p in sorted(model_dir.iterdir())
        if p.is_file()
        and (
            p.name in _MODEL_FILES
            or p.name.endswith(_MODEL_SUFFIXES)
            or p.name.startswith(_MODEL_PREFIXES)
        )
    ]
    if not any(p.name.endswith((".safetensors", ".bin")) for p in files):
        raise FileNotFoundError(f"no model weights in {model_dir}")
    return files


def _staging(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use overwrite)")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / LLM_DIR).mkdir(parents=True)
    return staging


def _replace(staging: Path, out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(staging, out)


def write_trained_bundle(
    out: Path | str,
    *,
    base: ModelBundle,
    model_dir: Path | str,
    source: Mapping[str, Any],
    model_version: str,
    model_name: str | None = None,
    overwrite: bool = False,
) -> ModelBundle:
    """Assemble the bundle of a trained model at ``out``.

    Parameters
    ----------
    out
        Destination folder: absent or empty unless ``overwrite``.
    base
        The bundle training started from (tokenizer, VQ-GAN, demo flag, generation
        defaults and LLM description are taken from it).
    model_dir
        The trained model's ``save_pretrained`` folder.
    source
        Provenance stored as the manifest's ``source`` (see the module docstring).
    model_version, model_name
        The new bundle's version, and its name (default: the base's).
    overwrite
        Replace a non-empty ``out``.

    Returns
    -------
    ModelBundle
        The opened new bundle (``demo`` as the base's).

    Raises
    ------
    FileExistsError
        ``out`` is not empty and ``overwrite`` is false.
    FileNotFoundError
        ``model_dir`` holds no weights.
    """
    out, model_dir = Path(out), Path(model_dir)
    files = _model_files(model_dir)
    staging = _staging(out, overwrite)
    try:
        for p in files:
            shutil.copy2(p, staging / LLM_DIR / p.name)
        save_tokenizer_dir(LLMCXRTokenizer.from_dir(base.llm_dir).raw, staging / LLM_DIR)
        copy_tree(base.root, staging, link=True, skip=(LLM_DIR, MANIFEST))
        llm = {k: v for k, v in base.llm_info.items() if k != "dir"}
        vqgan = {k: v for k, v in base.vqgan_info.items() if k not in ("encoder", "decoder")}
        write_manifest(
            staging,
            model_name=model_name or base.model_name,
            model_version=model_version,
            demo=base.demo,
            llm={**llm, "fine_tuned": True},
            vqgan=vqgan,
            generation=base.generation,
            source=source,
            created_by="cxr-node train",
        )
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ModelBundle.open(out)
