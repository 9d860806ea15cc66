"""The model's pass over the selected records: reports, VQA answers, FID features.

Used by :func:`models.evaluation.run.evaluate`. Images are read by the caller's loader;
one that fails stops the run with :class:`~models.evaluation.common.EvaluationError`
naming the record's number in the selection (not its id or path: patient data). A failed
generation is kept as its exception's type: a report batch that fails is retried image by
image, a VQA answer becomes ``<failed: Type>`` (a wrong answer), a report -> CXR image is
counted and left out of FID. Everything is greedy, with the bundle's other defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from models.dataset import ManifestRecord
from models.evaluation.common import EvaluationError, Skipped
from models.evaluation.fid import FeatureExtractor, fid, image_features
from models.evaluation.scoring import StudyOutput, VQAItem
from models.results import InferenceError

if TYPE_CHECKING:
    from models.runtime import LLMCXR

__all__ = ["Gray8Loader", "ModelRun", "Progress", "fid_of_run"]

Gray8Loader = Callable[[Path], npt.NDArray[np.uint8]]
"""Opens a record's image as 8-bit grey ``[rows, columns]``."""
Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: told after each batch (no patient data)."""
_GENERATION_ERRORS = (InferenceError, ValueError)


def _load(load_gray8: Gray8Loader, record: ManifestRecord, number: int) -> npt.NDArray[np.uint8]:
    try:
        gray = load_gray8(record.image)
    except Exception as exc:  # the caller's loader: any failure is bad input
        raise EvaluationError(
            f"selected record {number}: image cannot be read ({type(exc).__name__})"
        ) from None
    if not isinstance(gray, np.ndarray) or gray.dtype != np.uint8 or gray.ndim != 2:
        raise EvaluationError(f"selected record {number}: the loader must give uint8 [rows, cols]")
    return gray


def _reports(
    runtime: LLMCXR, inputs: Sequence[npt.NDArray[np.float32]]
) -> list[tuple[str | None, str | None]]:
    """(text, error type) per input; a failed batch is retried one by one."""
    try:
        return [(d.text, None) for d in runtime.report_batch(inputs, greedy=True)]
    except _GENERATION_ERRORS:
        pass
    out: list[tuple[str | None, str | None]] = []
    for x in inputs:
        try:
            out.append((runtime.report(x, greedy=True).text, None))
        except _GENERATION_ERRORS as exc:
            out.append((None, type(exc).__name__))
    return out


def _answers(runtime: LLMCXR, x: npt.NDArray[np.float32], record: ManifestRecord) -> list[VQAItem]:
    items = []
    for pair in record.vqa:
        try:
            answer = runtime.vqa(x, pair.question, greedy=True).text
        except _GENERATION_ERRORS as exc:
            answer = f"<failed: {type(exc).__name__}>"
        items.append(VQAItem(pair.question, pair.answer, answer))
    return items


class ModelRun:
    """The model's pass over the selected records, batch by batch.

    ``outputs`` gets one :class:`~models.evaluation.scoring.StudyOutput` per record, in
    order; ``real`` the FID features of the real images of the records with a reference
    report (when an extractor is given).
    """

    def __init__(self, runtime: LLMCXR, tasks: Sequence[str], sections: Sequence[str]) -> None:
        self.runtime, self.tasks, self.sections = runtime, tasks, sections
        self.outputs: list[StudyOutput] = []
        self.real: list[npt.NDArray[np.float64]] = []

    def batch(
        self,
        chunk: Sequence[ManifestRecord],
        first: int,
        load_gray8: Gray8Loader,
        extractor: FeatureExtractor | None,
    ) -> None:
        """Load, report (one backend batch), answer and extract features for ``chunk``.

        Parameters
        ----------
        chunk
            Consecutive selected records.
        first
            The selection number (1-based) of ``chunk[0]``, for error messages.
        load_gray8
            Opens an image.
        extractor
            FID feature extractor for the real images, or ``None``.
        """
        from models.preprocess import to_model_input

        grays = [_load(load_gray8, r, first + k) for k, r in enumerate(chunk)]
        inputs = [to_model_input(g) for g in grays]
        refs = [r.report(self.sections) for r in chunk]
        with_ref = [k for k, ref in enumerate(refs) if ref is not None]
        texts: dict[int, tuple[str | None, str | None]] = {}
        if "report" in self.tasks and with_ref:
            done = _reports(self.runtime, [inputs[k] for k in with_ref])
            texts = dict(zip(with_ref, done, strict=True))
        if extractor is not None and with_ref:
            self.real.append(image_features(extractor, [grays[k] for k in with_ref]))
        for k, r in enumerate(chunk):
            text, error = texts.get(k, (None, None))
            vqa = _answers(self.runtime, inputs[k], r) if "vqa" in self.tasks else []
            self.outputs.append(StudyOutput(r.id, r.view, refs[k], text, error, tuple(vqa)))


def _generated_features(
    runtime: LLMCXR, refs: Sequence[str], extractor: FeatureExtractor, progress: Progress | None
) -> tuple[npt.NDArray[np.float64], int]:
    """Features of the images generated from ``refs`` and the number of failures."""
    feats: list[npt.NDArray[np.float64]] = []
    images: list[npt.NDArray[np.uint8]] = []
    failed = 0
    for k, text in enumerate(refs, start=1):
        try:
            images.append(runtime.generate_image(text, greedy=True).image)
        except _GENERATION_ERRORS:
            failed += 1
        if len(images) >= 16 or k == len(refs):
            if images:
                feats.append(image_features(extractor, images))
            images = []
            if progress is not None:
                progress("image", k, len(refs))
    return (np.concatenate(feats) if feats else np.zeros((0, 0))), failed


def fid_of_run(
    runtime: LLMCXR,
    run: ModelRun,
    extractor: FeatureExtractor | None,
    progress: Progress | None,
) -> tuple[float | Skipped, str | None]:
    """Generate an image from each reference report of ``run`` and compute FID against the
    real images' features; with a note (counts, extractor) for ``results.md``."""
    if "image" not in run.tasks:
        return Skipped("the image task was not requested"), None
    if extractor is None:
        why = "no feature extractor given (--fid-extractor FILE; docs/evaluation.md)"
        return Skipped(why), None
    refs = [o.reference for o in run.outputs if o.reference is not None]
    real = np.concatenate(run.real) if run.real else np.zeros((0, 0))
    generated, failed = _generated_features(runtime, refs, extractor, progress)
    note = (
        f"{len(real)} real and {len(generated)} generated images ({failed} failed), features "
        f"of {extractor.name} ({extractor.input_size}x{extractor.input_size}, "
        f"{extractor.channels} channel(s))"
    )
    if len(real) < 2 or len(generated) < 2:
        return Skipped("FID needs at least two real and two generated images"), note
    return fid(real, generated), note
