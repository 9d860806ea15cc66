"""From a claimed job to the model's input: load the study, select the image, convert it.

The first stages of the worker pipeline (:mod:`node.runtime.pipeline`), each timed:

1. **load** the study's instances (SQL rows + spool files) and read their headers with
   pydicom (``stop_before_pixels``), :func:`load_study`;
2. **select** the frontal image (:func:`integration.selection.select_frontal`, PS3.3
   C.8.11.5 View Position and fall-backs), :func:`select_image`; none is a permanent
   failure with the reason (no retry);
3. **convert** its pixel data (:func:`integration.pixels.to_gray8` ->
   :func:`models.preprocess.to_model_input`), :func:`convert_image`; bad pixel data
   (PS3.3 C.7.6.3) is a permanent failure.

Logs carry job ids and UIDs only, never patient data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from integration.errors import NoFrontalImageError, PixelDataError
from integration.pixels import to_gray8
from integration.selection import select_frontal
from node.db import drafts as drafts_db
from node.runtime.stages import JobFailure, PipelineDeps, StageTimer, stage_delay

__all__ = [
    "PreparedJob",
    "SelectedImage",
    "StudyHeaders",
    "convert_image",
    "load_study",
    "prepare_job",
    "select_image",
]

# the pipeline's stages log under one name, whichever module they live in
log = logging.getLogger("node.runtime.pipeline")


@dataclass
class StudyHeaders:
    """A job's study: its UID and the headers of its readable instances."""

    job_id: int
    study_uid: str
    headers: list[Dataset]
    paths: list[Path]
    unreadable: int = 0


@dataclass(frozen=True)
class SelectedImage:
    """The frontal image chosen for a job: header, file and the selection reason."""

    header: Dataset
    path: Path
    sop_instance_uid: str
    reason: str


@dataclass
class PreparedJob:
    """A job ready for generation: its selected image as model input, and stage timings."""

    job_id: int
    study_uid: str
    image: SelectedImage
    model_input: npt.NDArray[np.float32]
    timings: dict[str, float] = field(default_factory=dict)
    #: headers of every readable instance of the study (the SR's evidence)
    evidence: list[Dataset] = field(default_factory=list)


def load_study(deps: PipelineDeps, job_id: int) -> StudyHeaders:
    """Read the headers (no pixel data) of the job's study's instances from the spool.

    An instance whose file cannot be read as DICOM (PS3.10) is counted in ``unreadable``
    and logged by its SOP Instance UID.

    Raises
    ------
    JobFailure
        Permanent when the study has no readable instance.
    """
    stage_delay("load")
    with deps.session_factory() as session:
        info = drafts_db.job_study(session, job_id)
    headers: list[Dataset] = []
    paths: list[Path] = []
    unreadable = 0
    for inst in info.instances:
        path = deps.spool_root / inst.spool_path
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
            paths.append(path)
        except (OSError, InvalidDicomError, ValueError) as exc:
            unreadable += 1
            log.warning(
                "job %s: SOP instance %s unreadable in the spool (%s)",
                job_id,
                inst.sop_instance_uid,
                type(exc).__name__,
            )
    if not headers:
        raise JobFailure(
            f"study {info.study_uid}: none of its {len(info.instances)} instances is readable "
            "in the spool",
            permanent=True,
            stage="load",
        )
    return StudyHeaders(job_id, info.study_uid, headers, paths, unreadable)


def select_image(study: StudyHeaders) -> SelectedImage:
    """Choose the frontal image (PS3.3 C.8.11.5 View Position and fall-backs).

    Raises
    ------
    JobFailure
        Permanent, with the selection's reason, when no instance is frontal.
    """
    try:
        sel = select_frontal(study.headers)
    except NoFrontalImageError as exc:
        raise JobFailure(str(exc.message), permanent=True, stage="select") from exc
    return SelectedImage(
        header=sel.dataset,
        path=study.paths[sel.index],
        sop_instance_uid=str(sel.dataset.SOPInstanceUID),
        reason=sel.reason,
    )


def convert_image(image: SelectedImage) -> npt.NDArray[np.float32]:
    """Decode the image's pixel data to the model input ``float32[3, 256, 256]`` in [-1, 1].

    Raises
    ------
    JobFailure
        Permanent for undecodable or invalid pixel data (PS3.3 C.7.6.3), naming the attribute,
        and for Rows x Columns (0028,0010/0011) no radiograph has (an aspect ratio beyond
        :data:`models.preprocess.MAX_ASPECT_RATIO`), naming the shape.
    """
    from models.preprocess import to_model_input

    stage_delay("convert")
    try:
        ds = pydicom.dcmread(image.path)
        gray = to_gray8(ds)
    except PixelDataError as exc:
        raise JobFailure(
            f"SOP instance {image.sop_instance_uid}: {exc.message}", permanent=True, stage="convert"
        ) from exc
    except (InvalidDicomError, ValueError, TypeError, NotImplementedError) as exc:
        raise JobFailure(
            f"SOP instance {image.sop_instance_uid}: pixel data cannot be converted "
            f"({type(exc).__name__})",
            permanent=True,
            stage="convert",
        ) from exc
    try:
        return to_model_input(gray)
    except ValueError as exc:  # its messages name the image's shape only, no patient data
        raise JobFailure(
            f"SOP instance {image.sop_instance_uid}: {exc}", permanent=True, stage="convert"
        ) from exc


def prepare_job(deps: PipelineDeps, job_id: int) -> PreparedJob:
    """Load, select and convert one job's image (timed: ``load_s``, ``convert_s``).

    Raises
    ------
    JobFailure
        From :func:`load_study`, :func:`select_image` or :func:`convert_image`.
    """
    timings: dict[str, float] = {}
    with StageTimer(timings, "load_s"):
        study = load_study(deps, job_id)
        image = select_image(study)
    with StageTimer(timings, "convert_s"):
        model_input = convert_image(image)
    return PreparedJob(job_id, study.study_uid, image, model_input, timings, study.headers)
