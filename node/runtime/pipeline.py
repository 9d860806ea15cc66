"""The per-job work of the worker, as plain functions, each stage timed.

For one claimed job (or a batch of them):

1. **load** the study's instances (SQL rows + spool files) and read their headers with
   pydicom (``stop_before_pixels``);
2. **select** the frontal image (:func:`integration.selection.select_frontal`); none is a
   permanent failure with the reason (no retry);
3. **convert** its pixel data (:func:`integration.pixels.to_gray8` ->
   :func:`models.preprocess.to_model_input`); bad pixel data is a permanent failure;
4. **encode + generate** under the model host's lock (:meth:`models.runtime.LLMCXR.report_batch`
   with ``generation_*`` settings): several jobs' images in one batch;
5. **store** the draft (:func:`node.db.drafts.save_draft`, replacing an earlier draft of
   the same job, under the lease);
6. **build the SR** (:func:`integration.sr.build_draft_sr`; SOP Instance and Series UIDs
   derived from study + model name + version, :mod:`integration.uids`) and write it durably to
   ``<spool>/outputs/<SR SOP Instance UID>.dcm`` (temporary file, fsync, rename, fsync dir);
7. **build the outputs** each destination gets (:func:`node.runtime.outputs.build_outputs`: Basic
   Text SR, Encapsulated PDF, HL7 ORU, FHIR Bundle, as configured) and **enqueue** one
   delivery per (destination, object) (:func:`node.db.deliveries.enqueue_deliveries`,
   idempotent per job, destination and object);
8. **finish** the job (:func:`node.db.jobs.finish_job`).

A re-run of a job that drafts the same text from the same instances produces the same SR UID
and replaces the file; a changed draft gets a new UID and supersedes the earlier SR
(Predecessor Documents Sequence). Delivery rows are not duplicated. When the lease is lost on
the way the job's outputs are abandoned (the new holder writes them). Logs carry job ids,
UIDs and timings only, never report text or patient data.

Test hook: ``CXR_NODE_TEST_STAGE_DELAY="<stage>:<seconds>[,<stage>:<seconds>...]"`` sleeps
before a stage (``load``, ``convert``, ``generate``, ``sr``, ``enqueue``). It exists so that
tests can kill a worker *during* generation deterministically; leave it unset in production
(it is logged as a warning when set).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy.orm import Session, sessionmaker

from integration.errors import IntegrationError, NoFrontalImageError, PixelDataError
from integration.pixels import to_gray8
from integration.selection import select_frontal
from integration.sr import build_draft_sr, requested_procedures_from
from integration.uids import draft_series_number, sr_instance_uid, sr_series_uid
from models.layout import TokenLayoutError
from models.prompts import PromptError
from node import metrics
from node.db import drafts as drafts_db
from node.db import jobs as jobs_db
from node.db.jobs import LeaseLost
from node.runtime.outputs import MANUFACTURER, SOFTWARE, DraftText, build_outputs, write_output
from node.runtime.spool import OUTPUTS_DIR
from node.settings import Settings

if TYPE_CHECKING:
    from models.runtime import LLMCXR, ReportDraft
    from node.runtime.modelhost import ModelHost

__all__ = [
    "MANUFACTURER",
    "OUTPUTS_DIR",
    "PERMANENT_ERRORS",
    "SR_INSTANCE_NUMBER",
    "STAGE_DELAY_ENV",
    "JobFailure",
    "JobOutcome",
    "PipelineDeps",
    "PreparedJob",
    "SelectedImage",
    "StudyHeaders",
    "build_sr",
    "complete_job",
    "convert_image",
    "generate_reports",
    "is_permanent",
    "load_study",
    "prepare_job",
    "previous_srs",
    "retry_delay_seconds",
    "run_batch",
    "select_image",
    "stage_delay",
    "write_sr",
]

log = logging.getLogger(__name__)

SR_INSTANCE_NUMBER = 1
STAGE_DELAY_ENV = "CXR_NODE_TEST_STAGE_DELAY"
_STAGES = ("load", "convert", "generate", "sr", "enqueue")


class JobFailure(Exception):
    """A job attempt failed; ``permanent`` failures are not retried.

    Parameters
    ----------
    message
        The reason recorded as the job's ``last_error`` (UIDs and terms only, no patient data).
    permanent
        ``True`` when a retry would fail the same way (no frontal image, bad pixel data).
    stage
        The stage that failed.
    """

    def __init__(self, message: str, *, permanent: bool, stage: str) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.stage = stage


# --- test hook ----------------------------------------------------------------------------


def _parse_delays(text: str) -> dict[str, float]:
    delays: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        stage, sep, seconds = part.partition(":")
        stage = stage.strip().lower()
        if not sep or stage not in _STAGES:
            raise ValueError(f"{STAGE_DELAY_ENV}: {part!r} is not <stage>:<seconds> ({_STAGES})")
        delays[stage] = float(seconds)
    return delays


def stage_delay(stage: str) -> float:
    """Sleep before ``stage`` as ``CXR_NODE_TEST_STAGE_DELAY`` asks (tests only); return it."""
    text = os.environ.get(STAGE_DELAY_ENV, "")
    if not text:
        return 0.0
    seconds = _parse_delays(text).get(stage, 0.0)
    if seconds > 0:
        log.warning(
            "%s: sleeping %.1f s before stage %s (test hook)", STAGE_DELAY_ENV, seconds, stage
        )
        time.sleep(seconds)
    return seconds


# --- dependencies and records --------------------------------------------------------------


@dataclass(frozen=True)
class PipelineDeps:
    """What the pipeline needs: settings, a write-session factory, the spool root."""

    settings: Settings
    session_factory: sessionmaker[Session]
    spool_root: Path

    @classmethod
    def from_settings(
        cls, settings: Settings, session_factory: sessionmaker[Session]
    ) -> PipelineDeps:
        """Dependencies for ``settings`` (spool root = ``settings.spool_dir``)."""
        return cls(settings, session_factory, Path(settings.spool_dir).absolute())

    @property
    def outputs_dir(self) -> Path:
        """``<spool>/outputs``: where SRs are written before delivery."""
        return self.spool_root / OUTPUTS_DIR


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


@dataclass
class JobOutcome:
    """What became of one job: ``done``, ``failed`` (permanent), ``retry`` or ``abandoned``."""

    job_id: int
    status: str
    sr_uid: str | None = None
    sr_path: Path | None = None
    draft_id: int | None = None
    delivery_ids: list[int] = field(default_factory=list)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class _Timer:
    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings = timings
        self.key = key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.t0


# --- stages -------------------------------------------------------------------------------


def load_study(deps: PipelineDeps, job_id: int) -> StudyHeaders:
    """Read the headers (no pixel data) of the job's study's instances from the spool.

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
        Permanent for undecodable or invalid pixel data (PS3.3 C.7.6.3), naming the attribute.
    """
    from models.preprocess import to_model_input

    stage_delay("convert")
    try:
        ds = pydicom.dcmread(image.path)
        gray = to_gray8(ds)
        return to_model_input(gray)
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


def prepare_job(deps: PipelineDeps, job_id: int) -> PreparedJob:
    """Load, select and convert one job's image (timed: ``load_s``, ``convert_s``)."""
    timings: dict[str, float] = {}
    with _Timer(timings, "load_s"):
        study = load_study(deps, job_id)
        image = select_image(study)
    with _Timer(timings, "convert_s"):
        model_input = convert_image(image)
    return PreparedJob(job_id, study.study_uid, image, model_input, timings, study.headers)


def generate_reports(
    runtime: LLMCXR, inputs: Sequence[npt.NDArray[np.float32]], settings: Settings
) -> list[ReportDraft]:
    """Encode and generate reports for several model inputs in one batch.

    Uses ``generation_greedy``, ``generation_seed`` and ``generation_max_new_tokens``.
    """
    stage_delay("generate")
    return runtime.report_batch(
        list(inputs),
        greedy=settings.generation_greedy,
        seed=settings.generation_seed,
        max_new_tokens=settings.generation_max_new_tokens,
    )


def build_sr(
    image: SelectedImage,
    draft: ReportDraft,
    *,
    evidence: Sequence[Dataset] = (),
    previous: Sequence[Dataset] = (),
) -> Dataset:
    """The draft report SR (Comprehensive SR, TID 2000; see :mod:`integration.sr`).

    Its SOP Instance UID comes from the study, the model's name and version, the evidence
    instances and the draft text (:func:`integration.uids.draft_instance_uid`): a re-run
    that drafts the same text from the same instances gives the same SR, a changed draft a
    new one that supersedes ``previous`` (Predecessor Documents Sequence). ``evidence`` is
    every instance of the study (default: the image read alone).
    """
    study_uid = str(image.header.StudyInstanceUID)
    impression = draft.impression.strip() or draft.text.strip() or "(no text generated)"
    findings = draft.findings
    evidence = list(evidence) or [image.header]
    sop_uid = sr_instance_uid(
        study_uid,
        draft.model_name,
        draft.model_version,
        inputs=[str(ds.SOPInstanceUID) for ds in evidence],
        findings=findings,
        impression=impression,
    )
    return build_draft_sr(
        evidence=evidence,
        image_read=image.header,
        findings=findings,
        impression=impression,
        algorithm_name=draft.model_name,
        algorithm_version=draft.model_version,
        manufacturer=MANUFACTURER,
        software_version=SOFTWARE,
        demo=draft.demo,
        sop_instance_uid=sop_uid,
        series_instance_uid=sr_series_uid(study_uid, draft.model_name, draft.model_version),
        series_number=draft_series_number("sr", draft.model_name, draft.model_version),
        instance_number=SR_INSTANCE_NUMBER,
        previous_versions=[p for p in previous if str(p.SOPInstanceUID) != sop_uid] or None,
        requested_procedures=requested_procedures_from(image.header) or None,
    )


def previous_srs(deps: PipelineDeps, study_uid: str) -> list[Dataset]:
    """Headers of the study's earlier draft SRs still in ``outputs/`` (what a new one
    supersedes); an SR whose file is gone (purged) is left out."""
    with deps.session_factory() as session:
        uids = drafts_db.study_sr_uids(session, study_uid)
    found: list[Dataset] = []
    for uid in dict.fromkeys(uids):
        path = deps.outputs_dir / f"{uid}.dcm"
        try:
            found.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (OSError, InvalidDicomError):
            continue
    return found


def write_sr(
    sr: Dataset, outputs_dir: Path, *, before_rename: Callable[[], None] | None = None
) -> Path:
    """Write ``sr`` durably to ``<outputs_dir>/<SOP Instance UID>.dcm`` (replacing).

    See :func:`node.runtime.outputs.write_output` (fsync, ``before_rename()``, atomic rename; 0600).
    """
    return write_output(sr, outputs_dir, f"{sr.SOPInstanceUID}.dcm", before_rename=before_rename)


def _draft_record(draft: ReportDraft, timings: dict[str, float]) -> drafts_db.DraftRecord:
    return drafts_db.DraftRecord(
        task="report",
        full_text=draft.text,
        findings=draft.findings,
        impression=draft.impression,
        model_name=draft.model_name,
        model_version=draft.model_version,
        demo=draft.demo,
        prompt=draft.prompt,
        generation_settings=dict(draft.settings),
        timings=dict(timings),
    )


def _draft_text(draft: ReportDraft) -> DraftText:
    return DraftText(
        findings=draft.findings,
        impression=draft.impression.strip() or draft.text.strip() or "(no text generated)",
        model_name=draft.model_name,
        model_version=draft.model_version,
        demo=draft.demo,
        created_at=dt.datetime.now(dt.UTC),
    )


def _check_lease(deps: PipelineDeps, job_id: int, owner: str) -> None:
    with deps.session_factory() as session:
        if not drafts_db.lease_held(session, job_id, owner):
            raise LeaseLost(f"job {job_id}: lease of {owner} lost")


def complete_job(
    deps: PipelineDeps,
    prepared: PreparedJob,
    draft: ReportDraft,
    *,
    owner: str,
    lease_lost: Callable[[], bool] | None = None,
) -> JobOutcome:
    """Store the draft, write the SR, enqueue deliveries and finish the job.

    Raises
    ------
    LeaseLost
        When ``owner`` lost the job's lease on the way (outputs abandoned).
    JobFailure
        Permanent when the SR cannot be built from the draft (SR build error).
    """
    job_id = prepared.job_id
    timings = prepared.timings
    for key in ("encode_s", "prefill_s", "decode_s", "prompt_tokens", "tokens"):
        if key in draft.timings:
            timings[key] = float(draft.timings[key])

    def check() -> None:
        if lease_lost is not None and lease_lost():
            raise LeaseLost(f"job {job_id}: heartbeat reported the lease of {owner} lost")
        _check_lease(deps, job_id, owner)

    check()
    with deps.session_factory() as session:
        draft_id = drafts_db.save_draft(
            session, job_id, owner=owner, draft=_draft_record(draft, timings)
        )
    stage_delay("sr")
    with _Timer(timings, "sr_s"):
        try:
            sr = build_sr(
                prepared.image,
                draft,
                evidence=prepared.evidence,
                previous=previous_srs(deps, prepared.study_uid),
            )
        except IntegrationError as exc:
            raise JobFailure(f"SR not built: {exc}", permanent=True, stage="sr") from exc
        path = write_sr(sr, deps.outputs_dir, before_rename=check)
    sr_uid = str(sr.SOPInstanceUID)
    delivery_ids: list[int] = []
    if deps.settings.destinations:
        with _Timer(timings, "outputs_s"):
            try:
                items = build_outputs(
                    deps.settings,
                    deps.outputs_dir,
                    sr=sr,
                    sr_path=path,
                    image_read=prepared.image.header,
                    evidence=prepared.evidence,
                    text=_draft_text(draft),
                    before_rename=check,
                )
            except IntegrationError as exc:
                raise JobFailure(
                    f"output objects not built: {exc}", permanent=True, stage="outputs"
                ) from exc
        stage_delay("enqueue")
        from node.runtime.delivery import enqueue_deliveries  # also wakes this process's senders

        check()
        with _Timer(timings, "enqueue_s"), deps.session_factory() as session:
            delivery_ids = enqueue_deliveries(session, job_id=job_id, items=items)
    with deps.session_factory() as session:
        drafts_db.update_draft_timings(session, draft_id, timings)
        jobs_db.finish_job(
            session,
            job_id,
            owner=owner,
            sr_sop_instance_uid=sr_uid,
            selected_sop_instance_uid=prepared.image.sop_instance_uid,
        )
    for key, value in timings.items():
        if key.endswith("_s"):
            metrics.observe_stage(key.removesuffix("_s"), value)
    if timings.get("decode_s"):
        metrics.observe_generation("report", timings.get("tokens", 0.0), timings["decode_s"])
    return JobOutcome(
        job_id=job_id,
        status="done",
        sr_uid=sr_uid,
        sr_path=path,
        draft_id=draft_id,
        delivery_ids=delivery_ids,
        timings=dict(timings),
    )


# --- a batch of jobs --------------------------------------------------------------------


#: Errors that a retry of the same job cannot cure: the data set or the model bundle is at
#: fault, not the node's surroundings (see :func:`is_permanent`).
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    InvalidDicomError,  # not a DICOM data set (PS3.10 §7.1)
    NotImplementedError,  # pydicom: an unknown Value Representation (PS3.5 §6.2), an encoding
    TokenLayoutError,  # the bundle or a sequence does not follow the LLM-CXR token layout
    PromptError,  # a prompt cannot be built from the study's parts
)


def is_permanent(exc: BaseException) -> bool:
    """Whether a failed job attempt must not be retried, by the exception's type.

    Permanent: a :class:`JobFailure` marked so; an :class:`integration.errors.IntegrationError`
    that is not ``transient`` (no frontal image, PS3.3 C.8.11.5; undecodable pixel data,
    PS3.3 C.7.6.3; SR not buildable); :data:`PERMANENT_ERRORS`; and
    :class:`models.runtime.ModelInputError`. Everything else is transient and retried with
    back-off while attempts remain: ``OSError`` (``ENOSPC``, ``EIO``, timeouts),
    :class:`sqlalchemy.exc.SQLAlchemyError` (database away),
    :class:`node.runtime.modelhost.ModelNotReady` (model busy or loading), the backends'
    runtime errors, and any error not listed here.
    """
    if isinstance(exc, JobFailure):
        return exc.permanent
    if isinstance(exc, IntegrationError):
        return not exc.transient
    from models.runtime import ModelInputError

    return isinstance(exc, (*PERMANENT_ERRORS, ModelInputError))


def retry_delay_seconds(settings: Settings, attempts: int) -> float:
    """Back-off before a job's next attempt after ``attempts`` failed ones.

    ``job_backoff_seconds * 2**(attempts - 1)``, at most ``job_max_backoff_seconds``, with
    up to 10 % jitter (:func:`node.runtime.delivery.backoff_seconds`).
    """
    from node.runtime.delivery import backoff_seconds

    return backoff_seconds(
        attempts, base=settings.job_backoff_seconds, cap=settings.job_max_backoff_seconds
    )


def _fail(deps: PipelineDeps, job_id: int, owner: str, exc: BaseException) -> JobOutcome:
    """Record a failed attempt; a lost lease is abandoned silently.

    Permanent failures (:func:`is_permanent`) fail the job at once; transient ones queue it
    again, not claimable before the back-off of :func:`retry_delay_seconds` has passed.
    """
    if isinstance(exc, LeaseLost):
        log.warning("job %s: lease lost, outputs abandoned (%s)", job_id, exc)
        return JobOutcome(job_id, "abandoned", error=str(exc))
    permanent = is_permanent(exc)
    if isinstance(exc, JobFailure):
        message = f"{exc.stage}: {exc.message}"
    else:
        # the model's own errors carry no patient data; keep the class and message short
        message = f"{type(exc).__name__}: {str(exc)[:500]}"
    try:
        with deps.session_factory() as session:
            job = jobs_db.fail_job(
                session,
                job_id,
                owner=owner,
                error=message,
                retry=not permanent,
                retry_delay=lambda attempts: retry_delay_seconds(deps.settings, attempts),
            )
        status = "retry" if job.state.value == "queued" else "failed"
    except LeaseLost:
        log.warning("job %s: lease lost before the failure could be recorded", job_id)
        return JobOutcome(job_id, "abandoned", error=message)
    log.log(
        logging.WARNING if status == "retry" else logging.ERROR,
        "job %s %s: %s",
        job_id,
        "will be retried" if status == "retry" else "failed",
        job.last_error or message,
    )
    return JobOutcome(job_id, status, error=message)


def _generate_isolated(
    model_host: ModelHost, prepared: Sequence[PreparedJob], settings: Settings
) -> list[ReportDraft | BaseException]:
    """Generate for the batch; if the batch fails, run each job alone to isolate the culprit."""
    with model_host.use() as runtime:
        try:
            return list(generate_reports(runtime, [p.model_input for p in prepared], settings))
        except Exception as exc:
            if len(prepared) == 1:
                return [exc]
            log.warning("batch of %d failed (%s); running its jobs one by one", len(prepared), exc)
        out: list[ReportDraft | BaseException] = []
        for p in prepared:
            try:
                out.append(generate_reports(runtime, [p.model_input], settings)[0])
            except Exception as exc:
                out.append(exc)
        return out


def run_batch(
    deps: PipelineDeps,
    job_ids: Sequence[int],
    model_host: ModelHost,
    *,
    owner: str,
    lease_lost: Callable[[int], bool] | None = None,
) -> list[JobOutcome]:
    """Run claimed jobs (held by ``owner``) through the whole pipeline; never raises for a job.

    Jobs whose load/select/convert fails are failed alone and dropped from the batch; the
    others are generated together and completed one by one. Returns one outcome per job,
    in the order of ``job_ids``.
    """
    outcomes: dict[int, JobOutcome] = {}
    prepared: list[PreparedJob] = []
    for job_id in job_ids:
        try:
            prepared.append(prepare_job(deps, job_id))
        except Exception as exc:
            outcomes[job_id] = _fail(deps, job_id, owner, exc)
    live: list[PreparedJob] = []
    for p in prepared:
        if lease_lost is not None and lease_lost(p.job_id):
            outcomes[p.job_id] = _fail(deps, p.job_id, owner, LeaseLost("lost before generation"))
        else:
            live.append(p)
    if live:
        t0 = time.perf_counter()
        for p in live:
            log.info("job %s: generating (study %s, batch of %d)", p.job_id, p.study_uid, len(live))
        results = _generate_isolated(model_host, live, deps.settings)
        wall = time.perf_counter() - t0
        for p, res in zip(live, results, strict=True):
            if isinstance(res, BaseException):
                outcomes[p.job_id] = _fail(deps, p.job_id, owner, res)
                continue
            p.timings["generate_wall_s"] = wall
            p.timings["batch_size"] = float(len(live))
            lost = (lambda j=p.job_id: lease_lost(j)) if lease_lost is not None else None
            try:
                outcome = complete_job(deps, p, res, owner=owner, lease_lost=lost)
            except Exception as exc:
                outcomes[p.job_id] = _fail(deps, p.job_id, owner, exc)
                continue
            outcomes[p.job_id] = outcome
            log.info(
                "job %s done: study %s, SR %s, %d deliveries queued; timings %s",
                p.job_id,
                p.study_uid,
                outcome.sr_uid,
                len(outcome.delivery_ids),
                _fmt_timings(outcome.timings),
            )
    return [outcomes[j] for j in job_ids]


def _fmt_timings(timings: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(timings.items())
    )
