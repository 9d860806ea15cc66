"""``cxr-node evaluate MANIFEST --out DIR``: LLM-CXR's evaluation on a dataset manifest.

Runs the configured model bundle (``model_dir`` / ``CXR_NODE_MODEL_DIR``, in this process,
as ``cxr-node ask`` does) on the manifest's test split, frontal views only by default:
CXR -> report, CXR-VQA and report -> CXR (FID with ``--fid-extractor``); or, with
``--predictions FILE``, scores another system's reports without the model. Writes
``results.json``, ``results.md`` and ``per_study.csv`` (patient data: mode 0600) into
``--out``. Definitions, policies and what is skipped: ``docs/evaluation.md``.

Images are read as ingest reads them: JPG/PNG with Pillow, anything else as DICOM
(:func:`node.services.images.gray8_from_file`). Nothing about a study (ids, report text) is
printed; progress goes to standard error as counts. Exit codes: 0 done, 1 bad manifest,
predictions or images, 2 bad options or no model configured.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from node.cli.admin import _runtime, _settings, fail
from node.filemodes import PRIVATE_UMASK

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from models.concordance import UncertainPolicy
    from models.evaluation import EvaluationResult

__all__ = ["evaluate"]


class Uncertain(enum.StrEnum):
    """``--uncertain``: how an uncertain CheXpert label counts."""

    positive = "positive"
    negative = "negative"
    ignore = "ignore"


def _gray8(path: Path) -> npt.NDArray[np.uint8]:
    """JPG/PNG with Pillow (models.evaluation's loader), anything else as DICOM, converted
    as ingest converts it (no upload size limit: these are the site's own files)."""
    from models.evaluation import load_gray8_pil

    if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
        return load_gray8_pil(path)
    from node.services.images import gray8_from_bytes

    data = path.read_bytes()
    return gray8_from_bytes(data, max_bytes=len(data))[0]


def _tasks(text: str) -> tuple[str, ...]:
    from models.evaluation import TASKS

    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks or any(t not in TASKS for t in tasks):
        raise typer.BadParameter(
            f"give some of {', '.join(TASKS)}, comma-separated", param_hint="--tasks"
        )
    return tasks


def _sections(text: str) -> tuple[str, ...]:
    sections = tuple(s.strip() for s in text.split(",") if s.strip())
    if not sections or any(s not in ("findings", "impression") for s in sections):
        raise typer.BadParameter(
            "give findings and/or impression", param_hint="--reference-sections"
        )
    return sections


def _progress(task: str, done: int, total: int) -> None:
    typer.echo(f"{task}: {done}/{total}", err=True)


def _report(result: EvaluationResult, out: Path) -> None:
    from models.evaluation.outputs import format_value
    from models.evaluation.scoring import PAPER_COLUMNS

    summary = result.summary()
    if result.meta.get("demo"):
        typer.echo("DEMO model: its outputs are meaningless; the numbers test the pipeline only")
    typer.echo(
        f"{result.meta['n_selected']} records selected, {result.n_reports} reports scored, "
        f"{result.n_failed} generation failures"
    )
    for key, title in PAPER_COLUMNS:
        typer.echo(f"  {title}: {format_value(key, summary[key])}")
    typer.echo(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'per_study.csv'}")


def evaluate(
    manifest: Annotated[
        Path, typer.Argument(help="Dataset manifest (JSON Lines).", exists=True, dir_okay=False)
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the results.", file_okay=False)],
    split: Annotated[str, typer.Option(help="Manifest split: train, validate or test.")] = "test",
    all_views: Annotated[
        bool, typer.Option("--all-views", help="Also lateral and unknown views.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Only the first N selected records.")
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option(
            help="Score these reports (JSONL: id, report[, vqa]) instead of running the model.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated: report, vqa, image.")] = (
        "report,vqa,image"
    ),
    fid_extractor: Annotated[
        Path | None,
        typer.Option(help="TorchScript feature extractor for FID.", exists=True, dir_okay=False),
    ] = None,
    uncertain: Annotated[
        Uncertain, typer.Option(help="An uncertain label counts as positive, negative or not.")
    ] = Uncertain.positive,
    no_meteor: Annotated[
        bool, typer.Option("--no-meteor", help="Skip METEOR (it starts a Java process).")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=256, help="Images per batch.")] = 8,
    reference_sections: Annotated[
        str, typer.Option(help="Report sections of the reference: findings,impression.")
    ] = "findings,impression",
    chexbert: Annotated[
        Path | None,
        typer.Option(help="Folder with f1chexbert's chexbert.pth (CheXbert-F1).", file_okay=False),
    ] = None,
    radgraph: Annotated[
        Path | None,
        typer.Option(help="Folder with radgraph's unpacked model (RadGraph-F1).", file_okay=False),
    ] = None,
) -> None:
    """Evaluate the model (or --predictions) on a manifest: CheXpert F1/AUROC, BLEU, VQA, FID."""
    from models.concordance import UncertainPolicy
    from models.dataset import SPLITS
    from models.evaluation import EvaluationError

    if split not in SPLITS:
        raise typer.BadParameter(f"give one of {', '.join(SPLITS)}", param_hint="--split")
    chosen, sections = _tasks(tasks), _sections(reference_sections)
    policy = {
        Uncertain.positive: UncertainPolicy.U_ONES,
        Uncertain.negative: UncertainPolicy.U_ZEROS,
        Uncertain.ignore: UncertainPolicy.U_IGNORE,
    }[uncertain]
    opts = _Options(
        split, not all_views, limit, policy, not no_meteor, sections, chexbert, radgraph
    )
    previous = os.umask(PRIVATE_UMASK)  # the results folder holds patient data (0700)
    try:
        if predictions is not None:
            if fid_extractor is not None:
                typer.echo("with --predictions there is no report -> CXR: FID is skipped", err=True)
            result = _score_predictions(manifest, predictions, out, opts)
        else:
            result = _run_model(manifest, out, opts, chosen, fid_extractor, batch_size)
    except (EvaluationError, ValueError, OSError) as exc:
        raise fail(exc) from None
    finally:
        os.umask(previous)
    _report(result, out)


@dataclass(frozen=True)
class _Options:
    """The options both ways of evaluating share."""

    split: str
    frontal_only: bool
    limit: int | None
    uncertain: UncertainPolicy
    with_meteor: bool
    reference_sections: tuple[str, ...]
    chexbert_dir: Path | None
    radgraph_dir: Path | None


def _score_predictions(
    manifest: Path, predictions: Path, out: Path, opts: _Options
) -> EvaluationResult:
    from models.evaluation import evaluate_predictions

    return evaluate_predictions(
        predictions,
        manifest,
        out_dir=out,
        split=opts.split,
        frontal_only=opts.frontal_only,
        limit=opts.limit,
        uncertain=opts.uncertain,
        with_meteor=opts.with_meteor,
        reference_sections=opts.reference_sections,
        chexbert_dir=opts.chexbert_dir,
        radgraph_dir=opts.radgraph_dir,
    )


def _run_model(
    manifest: Path,
    out: Path,
    opts: _Options,
    tasks: tuple[str, ...],
    fid_extractor: Path | None,
    batch_size: int,
) -> EvaluationResult:
    from models.dataset import read_manifest
    from models.evaluation import evaluate as run_evaluation

    data = read_manifest(manifest)  # before the model loads: a bad manifest fails fast
    settings = _settings()
    runtime = _runtime(settings)
    return run_evaluation(
        runtime,
        data,
        out_dir=out,
        split=opts.split,
        frontal_only=opts.frontal_only,
        load_gray8=_gray8,
        limit=opts.limit,
        tasks=tasks,
        fid_extractor=fid_extractor,
        uncertain=opts.uncertain,
        with_meteor=opts.with_meteor,
        batch_size=batch_size,
        reference_sections=opts.reference_sections,
        chexbert_dir=opts.chexbert_dir,
        radgraph_dir=opts.radgraph_dir,
        device=settings.backend_device,
        progress=_progress,
    )
