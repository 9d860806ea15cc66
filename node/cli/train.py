"""``cxr-node train ...``: fine-tune LLM-CXR on a site's data and write a new model bundle.

- ``train run MANIFEST --bundle BASE --out OUT [--stage 1|2] [--config FILE] [--epochs N]
  [--max-steps N] [--lr X] [--batch N] [--general FILE] [--resume] [--model-version V]
  [--work DIR] ...``: one stage of the paper's recipe (:mod:`models.training`);
- ``train mimic-manifest ROOT --reports DIR --out MANIFEST``: the dataset manifest of a
  MIMIC-CXR-JPG tree and the MIMIC-CXR reports.

Images are read as ingest reads them: DICOM through
:func:`node.services.images.gray8_from_file` (the MIMIC-like 8-bit conversion), JPG/PNG
with PIL. Files written here (manifest, codes cache, checkpoints, the bundle) are
created under the node's private umask (0077), as they hold or derive from patient data.
Log lines carry counts and losses only, never report text or patient ids. Exit codes:
0 success, 1 bad input or failed training. See ``docs/training.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from node.cli.admin import fail
from node.filemodes import apply_private_umask
from node.logging_setup import configure_logging

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["app", "node_gray8"]

app = typer.Typer(
    help="Fine-tune the model on a site's data (run) and build dataset manifests.",
    no_args_is_help=True,
)

_DICOM_MAGIC_OFFSET = 128


def node_gray8(path: Path) -> npt.NDArray[np.uint8]:
    """8-bit grey of an image file: DICOM as ingest converts it, else JPG/PNG with PIL.

    Raises
    ------
    ValueError
        The DICOM cannot be converted (the message names no patient data).
    OSError
        The file cannot be read or decoded.
    """
    from integration.errors import IntegrationError
    from models.training.codes_cache import load_gray8_pil
    from node.services.images import gray8_from_file

    with open(path, "rb") as fh:
        head = fh.read(_DICOM_MAGIC_OFFSET + 4)
    if head[_DICOM_MAGIC_OFFSET:] != b"DICM":
        return load_gray8_pil(path)
    try:
        gray8, _ds = gray8_from_file(path)
    except IntegrationError as exc:
        raise ValueError(f"DICOM pixel data cannot be converted ({type(exc).__name__})") from None
    return gray8


@contextmanager
def _clear_errors() -> Iterator[None]:
    """Turn the training's input errors into ``fail(...)`` (message on stderr, exit 1)."""
    from models.bundle import BundleError
    from models.dataset import ManifestError
    from models.layout import TokenLayoutError
    from models.training.codes_cache import CodesCacheError
    from models.training.examples import ExampleError
    from models.training.mimic import MimicError
    from models.training.recipe import ConfigError
    from models.training.trainer import TrainingError

    try:
        yield
    except (
        ManifestError,
        BundleError,
        ConfigError,
        TrainingError,
        CodesCacheError,
        ExampleError,
        MimicError,
        TokenLayoutError,
        OSError,
    ) as exc:
        raise fail(exc) from None


@app.command("run")
def run(
    manifest: Annotated[
        Path, typer.Argument(help="Dataset manifest (JSON Lines, docs/training.md).")
    ],
    bundle: Annotated[Path, typer.Option("--bundle", help="The model bundle to start from.")],
    out: Annotated[Path, typer.Option("--out", help="The new bundle's folder (absent/empty).")],
    stage: Annotated[
        int | None, typer.Option(min=1, max=2, help="Paper stage 1 or 2 (default 1).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Training config (TOML or JSON).")
    ] = None,
    epochs: Annotated[float | None, typer.Option(min=0.01, help="Epochs (paper: 5).")] = None,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many steps (wins over epochs).")
    ] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help="Learning rate (paper: 5e-6).")] = None,
    batch: Annotated[
        int | None, typer.Option(min=1, help="Examples per device and step (paper: 2).")
    ] = None,
    general: Annotated[
        Path | None,
        typer.Option(help="General instruction data (dolly-15k JSONL), mixed in at 20 %."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --work.")
    ] = False,
    model_version: Annotated[
        str | None, typer.Option(help="The new bundle's version (default: derived).")
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(help="Checkpoints, metrics, codes cache (default: OUT.work beside OUT)."),
    ] = None,
    codes_cache: Annotated[
        Path | None, typer.Option(help="The image codes' SQLite file (share between stages).")
    ] = None,
    deepspeed: Annotated[
        Path | None, typer.Option(help="DeepSpeed JSON config (e.g. ZeRO-3; needs deepspeed).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Train one stage on MANIFEST's train split and write the result as bundle --out."""
    apply_private_umask()
    configure_logging("INFO")
    from models.training.recipe import load_config
    from models.training.trainer import run_training

    with _clear_errors():
        if not manifest.is_file():
            raise FileNotFoundError(f"no manifest at {manifest}")
        cfg = load_config(
            config,
            stage=stage,
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            per_device_batch=batch,
            deepspeed=str(deepspeed) if deepspeed is not None else None,
        )
        result = run_training(
            manifest,
            bundle,
            out,
            cfg,
            work=work,
            general=general,
            resume=resume,
            load_gray8=node_gray8,
            codes_cache=codes_cache,
            model_version=model_version,
            overwrite=overwrite,
        )
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(
        f"trained {result.steps} step(s), loss {result.first_loss} -> {result.final_loss}; "
        f"bundle {result.bundle}; metrics {result.metrics_csv}"
    )


@app.command("mimic-manifest")
def mimic_manifest(
    root: Annotated[
        Path, typer.Argument(help="MIMIC-CXR-JPG folder (the CSVs and files/).", file_okay=False)
    ],
    reports: Annotated[
        Path, typer.Option("--reports", help="MIMIC-CXR reports folder (holding files/).")
    ],
    out: Annotated[Path, typer.Option("--out", help="The manifest to write (JSON Lines).")],
    no_check_images: Annotated[
        bool, typer.Option("--no-check-images", help="Do not check that each JPG exists.")
    ] = False,
) -> None:
    """Write the dataset manifest of a MIMIC-CXR-JPG tree (study order from the dates)."""
    apply_private_umask()
    configure_logging("INFO")
    from models.training.mimic import mimic_manifest as build

    with _clear_errors():
        manifest, stats = build(root, reports, out, check_images=not no_check_images)
    typer.echo(
        f"{stats.records} record(s) of {stats.images} image(s) written to {manifest.path} "
        f"(sha256 {manifest.sha256}); left out: {stats.no_split} without split, "
        f"{stats.no_image} without JPG, {stats.no_report} without FINDINGS/IMPRESSION"
    )
