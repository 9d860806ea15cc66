"""Run an evaluation: select the test records, generate (or read predictions), score, write.

:func:`evaluate` runs the node's model on a manifest's test split (frontal views by
default): CXR -> report for every record with a reference report, CXR-VQA for every VQA
pair, and report -> CXR from each reference report for FID when a feature extractor is
given; all greedy, with the bundle's generation defaults. :func:`evaluate_predictions`
scores a predictions file (:mod:`models.evaluation.predictions`) against the same
selection, without the model. Both write ``results.json``, ``results.md`` and
``per_study.csv`` (:mod:`models.evaluation.outputs`) and return the result.

Images are opened by the caller's ``load_gray8(path) -> uint8[rows, columns]``; the default
reads JPG/PNG with Pillow (``models`` never imports pydicom; the node's CLI passes a loader
that converts DICOM as ingest does). A record whose image cannot be read stops the run
(:class:`~models.evaluation.common.EvaluationError`); a generation that fails is recorded
for its study (the exception's type), left out of the metrics and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from models.concordance import UncertainPolicy
from models.dataset import Manifest, ManifestRecord, read_manifest
from models.evaluation.common import EvaluationError, Skipped
from models.evaluation.fid import FeatureExtractor, load_extractor
from models.evaluation.generation import Gray8Loader, ModelRun, Progress, fid_of_run
from models.evaluation.outputs import write_results
from models.evaluation.predictions import Predictions, read_predictions
from models.evaluation.scoring import EvaluationResult, ScoreOptions, StudyOutput, VQAItem, score
from models.labeler import ReportLabeler, default_labeler

if TYPE_CHECKING:
    from models.runtime import LLMCXR

__all__ = [
    "TASKS",
    "Progress",
    "evaluate",
    "evaluate_predictions",
    "load_gray8_pil",
    "select_records",
]

TASKS = ("report", "vqa", "image")


def load_gray8_pil(path: Path) -> npt.NDArray[np.uint8]:
    """A JPG/PNG as 8-bit grey; 16-bit and float images are scaled min..max to 0..255."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
            return np.rint(scaled).astype(np.uint8)
        return np.asarray(im.convert("L"), dtype=np.uint8)


def select_records(
    manifest: Manifest, *, split: str = "test", frontal_only: bool = True, limit: int | None = None
) -> list[ManifestRecord]:
    """The records of ``split`` (frontal views only unless told), the first ``limit``."""
    records = [r for r in manifest.split(split) if r.frontal or not frontal_only]
    if limit is not None:
        if limit < 1:
            raise EvaluationError(f"limit must be at least 1, got {limit}")
        records = records[:limit]
    if not records:
        views = " frontal (PA/AP)" if frontal_only else ""
        raise EvaluationError(f"the manifest has no{views} record in split {split!r}")
    return records


def _manifest(manifest: Manifest | Path | str) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else read_manifest(manifest)


def _base_meta(
    m: Manifest, records: Sequence[ManifestRecord], sel: dict[str, Any], sections: Sequence[str]
) -> dict[str, Any]:
    return {
        "tool": "cxr-node evaluate",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "manifest_file": m.path.name,
        "manifest_sha256": m.sha256,
        **sel,
        "n_selected": len(records),
        "reference_sections": list(sections),
    }


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvaluationError(f"tasks must be some of {', '.join(TASKS)}, got {list(tasks)}")
    return tuple(t for t in TASKS if t in tasks)


def evaluate(
    runtime: LLMCXR,
    manifest: Manifest | Path | str,
    *,
    out_dir: Path | str,
    split: str = "test",
    frontal_only: bool = True,
    load_gray8: Gray8Loader = load_gray8_pil,
    labeler: ReportLabeler | None = None,
    limit: int | None = None,
    tasks: Sequence[str] = TASKS,
    fid_extractor: FeatureExtractor | Path | str | None = None,
    uncertain: UncertainPolicy = UncertainPolicy.U_ONES,
    with_meteor: bool = True,
    batch_size: int = 8,
    reference_sections: Sequence[str] = ("findings", "impression"),
    chexbert_dir: Path | None = None,
    radgraph_dir: Path | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> EvaluationResult:
    """Evaluate the model on a manifest's split and write the three result files.

    Parameters
    ----------
    runtime
        The loaded model (:class:`models.runtime.LLMCXR`).
    manifest
        A read manifest or its path.
    out_dir
        Where ``results.json``, ``results.md`` and ``per_study.csv`` go (created).
    split, frontal_only, limit
        The selection: records of ``split``, PA/AP only unless ``frontal_only`` is false,
        the first ``limit`` of them in manifest order.
    load_gray8
        Opens a record's image as 8-bit grey (default: JPG/PNG with Pillow).
    labeler
        Labels reports for the CheXpert metrics (default: the rule labeler).
    tasks
        Some of ``report``, ``vqa``, ``image``.
    fid_extractor
        The FID feature extractor (a TorchScript file or a loaded one); FID is skipped
        without it.
    uncertain
        How an uncertain label counts (:mod:`models.evaluation.classification`).
    with_meteor
        Compute METEOR (a Java process) when it is available.
    batch_size
        Images per report batch.
    reference_sections
        Manifest sections that make the reference report.
    chexbert_dir, radgraph_dir, device
        Optional metrics' local weights (:mod:`models.evaluation.optional`) and the device
        for them and the FID extractor.
    progress
        Told ``(task, done, total)`` after each batch.

    Raises
    ------
    EvaluationError
        Bad selection, tasks or images; ``ManifestError`` for a bad manifest.
    """
    m, chosen = _manifest(manifest), _check_tasks(tasks)
    records = select_records(m, split=split, frontal_only=frontal_only, limit=limit)
    extractor = fid_extractor
    if "image" in chosen and isinstance(fid_extractor, (Path, str)):
        extractor = load_extractor(fid_extractor, device=device)
    ex = extractor if "image" in chosen and isinstance(extractor, FeatureExtractor) else None
    run = ModelRun(runtime, chosen, reference_sections)
    for start in range(0, len(records), max(1, batch_size)):
        run.batch(records[start : start + max(1, batch_size)], start + 1, load_gray8, ex)
        if progress is not None:
            progress("report/vqa", len(run.outputs), len(records))
    fid_value, fid_note = fid_of_run(runtime, run, ex, progress)
    sel = {"split": split, "frontal_only": frontal_only, "limit": limit, "tasks": list(chosen)}
    meta = {
        **_base_meta(m, records, sel, reference_sections),
        "source": "model",
        "model_name": runtime.model_name,
        "model_version": runtime.model_version,
        "demo": bool(runtime.bundle.demo),
        "generation": {**runtime.defaults, "greedy": True},
        "fid": fid_note,
    }
    opts = _score_options(labeler, uncertain, with_meteor, chexbert_dir, radgraph_dir, device)
    result = score(
        run.outputs,
        opts,
        meta=meta,
        fid=fid_value,
        report_skipped=None if "report" in chosen else Skipped("the report task was not requested"),
        vqa_skipped=None if "vqa" in chosen else Skipped("the vqa task was not requested"),
    )
    write_results(result, out_dir)
    return result


def _score_options(
    labeler: ReportLabeler | None,
    uncertain: UncertainPolicy,
    with_meteor: bool,
    chexbert_dir: Path | None,
    radgraph_dir: Path | None,
    device: str,
) -> ScoreOptions:
    """The scoring options of :func:`evaluate` and :func:`evaluate_predictions` (the
    default labeler when none is given)."""
    return ScoreOptions(
        labeler or default_labeler(),
        uncertain,
        with_meteor=with_meteor,
        chexbert_dir=chexbert_dir,
        radgraph_dir=radgraph_dir,
        device=device,
    )


def _prediction_outputs(
    preds: Predictions, records: Sequence[ManifestRecord], sections: Sequence[str]
) -> list[StudyOutput]:
    with_answers = any(p.answers for p in preds.by_id.values())
    outputs = []
    for r in records:
        p, ref = preds.by_id.get(r.id), r.report(sections)
        vqa: tuple[VQAItem, ...] = ()
        if with_answers:  # an unanswered question counts as a wrong answer
            answers = p.answers if p is not None else {}
            vqa = tuple(VQAItem(q.question, q.answer, answers.get(q.question, "")) for q in r.vqa)
        generated = p.report if p is not None and ref is not None else None
        outputs.append(StudyOutput(r.id, r.view, ref, generated, None, vqa))
    return outputs


def evaluate_predictions(
    predictions: Predictions | Path | str,
    manifest: Manifest | Path | str,
    *,
    out_dir: Path | str,
    split: str = "test",
    frontal_only: bool = True,
    labeler: ReportLabeler | None = None,
    limit: int | None = None,
    uncertain: UncertainPolicy = UncertainPolicy.U_ONES,
    with_meteor: bool = True,
    reference_sections: Sequence[str] = ("findings", "impression"),
    chexbert_dir: Path | None = None,
    radgraph_dir: Path | None = None,
    device: str = "cpu",
) -> EvaluationResult:
    """Score precomputed predictions against a manifest's selection and write the files.

    Every selected record with a reference report needs a prediction; a prediction whose
    id is not in the manifest is an error; predictions of records outside the selection are
    not used (counted in ``meta.predictions_unused``). VQA is scored when the predictions
    carry answers; FID needs the model and is skipped. Parameters as :func:`evaluate`.

    Raises
    ------
    EvaluationError
        Bad predictions file, unknown ids, missing predictions, empty selection.
    """
    m = _manifest(manifest)
    preds = predictions if isinstance(predictions, Predictions) else read_predictions(predictions)
    known = {r.id for r in m.records}
    unknown = sorted(p.line for p in preds.by_id.values() if p.id not in known)
    if unknown:
        raise EvaluationError(
            f"{preds.path}:{unknown[0]}: id not in the manifest ({len(unknown)} such line(s))"
        )
    records = select_records(m, split=split, frontal_only=frontal_only, limit=limit)
    missing = [
        k
        for k, r in enumerate(records, start=1)
        if r.report(reference_sections) is not None and r.id not in preds.by_id
    ]
    if missing:
        raise EvaluationError(
            f"{len(missing)} selected record(s) with a reference report have no prediction "
            f"(the first: selected record {missing[0]})"
        )
    outputs = _prediction_outputs(preds, records, reference_sections)
    selected = {r.id for r in records}
    sel = {"split": split, "frontal_only": frontal_only, "limit": limit, "tasks": ["report", "vqa"]}
    meta = {
        **_base_meta(m, records, sel, reference_sections),
        "source": "predictions",
        "predictions_file": preds.path.name,
        "predictions_sha256": preds.sha256,
        "predictions_unused": sum(1 for i in preds.by_id if i not in selected),
        "demo": None,
    }
    opts = _score_options(labeler, uncertain, with_meteor, chexbert_dir, radgraph_dir, device)
    has_answers = any(p.answers for p in preds.by_id.values())
    result = score(
        outputs,
        opts,
        meta=meta,
        fid=Skipped("the predictions give reports only: report -> CXR needs the model"),
        vqa_skipped=None if has_answers else Skipped("the predictions give no VQA answers"),
    )
    write_results(result, out_dir)
    return result
