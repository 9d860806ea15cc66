"""Completing a drafted job: store the draft, write the SR and the outputs, queue, finish.

Once the model has drafted a job's report (:mod:`node.runtime.pipeline`),
:func:`complete_job`:

5. **stores** the draft (:func:`node.db.drafts.save_draft`, replacing an earlier draft of
   the same job, under the lease);
6. **builds the SR** (:func:`build_sr`: Comprehensive SR, TID 2000; SOP Instance and Series
   UIDs derived from study + model name + version, :mod:`integration.uids`) and writes it
   durably to ``<spool>/outputs/<SR SOP Instance UID>.dcm`` (:func:`write_sr`);
7. **builds the outputs** each destination gets (:func:`node.runtime.outputs.build_outputs`:
   Basic Text SR, Encapsulated PDF, HL7 ORU, FHIR Bundle, as configured) and **enqueues**
   one delivery per (destination, object) (:func:`node.runtime.delivery.enqueue_deliveries`,
   idempotent per job, destination and object, while the worker holds the job; an earlier
   run's rows not queued again are cancelled);
8. **finishes** the job (:func:`node.db.withdrawals.finish_job`), cancelling in the same
   transaction the study's earlier drafts not yet sent to those destinations
   (superseded); from then on its objects are sent.

A job that finishes only after a later draft of its study, which supersedes it, was
withdrawn as the study's current draft (it had read the study before a late instance came)
queues nothing, and its draft is withdrawn in the transaction that finishes it, as the
withdrawal would have taken it had it been done then (:func:`node.db.withdrawals.finish_job`;
its withdrawals, where it reached a destination, are queued next).

A re-run of a job that drafts the same text from the same instances produces the same SR UID
and replaces the file; a changed draft gets a new UID and supersedes the earlier SR
(Predecessor Documents Sequence, PS3.3 C.17.2), and so does the same draft made again after
the study's SR with its UID was withdrawn (a withdrawn UID is never issued again). As the
job is done, the earlier jobs' rows still waiting to go to a destination this job sends to
are cancelled, so the older draft never arrives after the newer one (an older ORU^R01
would overwrite the newer result in a RIS); a destination this job does not send to keeps
them. Delivery rows are not duplicated. The lease is checked before each file is renamed
into place and in the enqueue: when it is lost on the way the job's outputs are abandoned
(the new holder writes them).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from integration.errors import IntegrationError
from node import metrics
from node.db import deliveries as deliveries_db
from node.db import drafts as drafts_db
from node.db import jobs as jobs_db
from node.db import withdrawals as withdrawals_db
from node.db.jobs import LeaseLost
from node.runtime.draft_objects import (
    DraftText,
    draft_reissue,
    draft_sr,
    impression_text,
)
from node.runtime.output_files import write_output
from node.runtime.outputs import build_outputs
from node.runtime.prepare import PreparedJob, SelectedImage
from node.runtime.stages import JobFailure, PipelineDeps, StageTimer, stage_delay
from node.runtime.withdrawal import queue_withdrawals

if TYPE_CHECKING:
    from models.results import ReportDraft
    from node.settings import Settings

__all__ = [
    "SR_INSTANCE_NUMBER",
    "JobOutcome",
    "build_sr",
    "complete_job",
    "draft_record",
    "previous_srs",
    "write_sr",
]

SR_INSTANCE_NUMBER = 1
#: the model's timings kept with the job's (seconds, or token counts)
_GENERATION_TIMINGS = ("encode_s", "prefill_s", "decode_s", "prompt_tokens", "tokens")

log = logging.getLogger(__name__)


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


def _draft_text(draft: ReportDraft) -> DraftText:
    """The draft as the outputs carry it, dated now (its impression by
    :func:`~node.runtime.draft_objects.impression_text`)."""
    return DraftText(
        findings=draft.findings,
        impression=impression_text(draft.impression, draft.text),
        model_name=draft.model_name,
        model_version=draft.model_version,
        demo=draft.demo,
        created_at=dt.datetime.now(dt.UTC),
    )


def build_sr(
    image: SelectedImage,
    draft: ReportDraft,
    *,
    evidence: Sequence[Dataset] = (),
    previous: Sequence[Dataset] = (),
    reissue: int = 0,
) -> Dataset:
    """The draft report SR (Comprehensive SR, TID 2000; see :mod:`integration.sr`).

    Its SOP Instance UID comes from the study, the model's name and version, the evidence
    instances and the draft text (:func:`integration.uids.draft_instance_uid`): a re-run
    that drafts the same text from the same instances gives the same SR, a changed draft a
    new one that supersedes ``previous`` (Predecessor Documents Sequence). ``evidence`` is
    every instance of the study (default: the image read alone). ``reissue`` is the issue of
    the same draft after withdrawals (:func:`_reissue`; 0: the first).
    """
    study_uid = str(image.header.StudyInstanceUID)
    text = _draft_text(draft)
    evidence = list(evidence) or [image.header]
    inputs = _inputs(evidence)
    ids = text.ids("sr", study_uid, inputs=inputs, reissue=reissue)
    supersedes = [p for p in previous if str(p.SOPInstanceUID) != ids["sop_instance_uid"]]
    return draft_sr(
        text,
        ids,
        evidence=evidence,
        image_read=image.header,
        instance_number=SR_INSTANCE_NUMBER,
        previous_versions=supersedes or None,
    )


def _inputs(evidence: Sequence[Dataset]) -> list[str]:
    """The SOP Instance UIDs a draft was made from (what its object UIDs derive from)."""
    return [str(ds.SOPInstanceUID) for ds in evidence]


def _reissue(deps: PipelineDeps, prepared: PreparedJob, draft: ReportDraft) -> int:
    """The issue of this draft (:func:`~node.runtime.draft_objects.draft_reissue`): past
    the UIDs of the study's withdrawn draft SRs, never issued again."""
    with deps.session_factory() as session:
        withdrawn = drafts_db.withdrawn_sr_uids(session, prepared.study_uid)
    if not withdrawn:
        return 0
    inputs = _inputs(prepared.evidence or [prepared.image.header])
    return draft_reissue(prepared.study_uid, _draft_text(draft), inputs=inputs, withdrawn=withdrawn)


def previous_srs(deps: PipelineDeps, study_uid: str, job_id: int) -> list[Dataset]:
    """Headers of the draft SRs of the study's jobs before ``job_id`` still in ``outputs/``
    (what its SR supersedes); an SR whose file is gone (purged) is left out."""
    with deps.session_factory() as session:
        uids = drafts_db.study_sr_uids(session, study_uid, before_job=job_id)
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

    See :func:`node.runtime.output_files.write_output` (fsync, ``before_rename()``, atomic
    rename; 0600).
    """
    return write_output(sr, outputs_dir, f"{sr.SOPInstanceUID}.dcm", before_rename=before_rename)


def draft_record(draft: ReportDraft, timings: dict[str, float]) -> drafts_db.DraftRecord:
    """The row of a generated report draft (task ``report``) with the job's stage timings."""
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


def _lease_check(
    deps: PipelineDeps, job_id: int, owner: str, lease_lost: Callable[[], bool] | None
) -> Callable[[], None]:
    """A check raising :class:`~node.db.jobs.LeaseLost` once ``owner`` no longer holds the
    job: as its heartbeat reports (``lease_lost``), else as the database says."""

    def check() -> None:
        if lease_lost is not None and lease_lost():
            raise LeaseLost(f"job {job_id}: heartbeat reported the lease of {owner} lost")
        with deps.session_factory() as session:
            if not drafts_db.lease_held(session, job_id, owner):
                raise LeaseLost(f"job {job_id}: lease of {owner} lost")

    return check


def _write_draft_sr(
    deps: PipelineDeps,
    prepared: PreparedJob,
    draft: ReportDraft,
    check: Callable[[], None],
    reissue: int,
) -> tuple[Dataset, Path, str | None]:
    """Build the SR (superseding the study's earlier ones) and write it; stage ``sr``. Also
    the UID of the newest earlier SR it supersedes (whose FHIR report the new one replaces),
    or ``None``."""
    previous = previous_srs(deps, prepared.study_uid, prepared.job_id)
    try:
        sr = build_sr(
            prepared.image, draft, evidence=prepared.evidence, previous=previous, reissue=reissue
        )
    except IntegrationError as exc:
        raise JobFailure(f"SR not built: {exc}", permanent=True, stage="sr") from exc
    replaced = [str(p.SOPInstanceUID) for p in previous if p.SOPInstanceUID != sr.SOPInstanceUID]
    return (
        sr,
        write_sr(sr, deps.outputs_dir, before_rename=check),
        replaced[-1] if replaced else None,
    )


def _routed_settings(deps: PipelineDeps, job_id: int) -> Settings:
    """The settings with the destinations the job's routing rule chose (``jobs.destinations``;
    ``None``: every configured destination)."""
    with deps.session_factory() as session:
        chosen = jobs_db.job_destinations(session, job_id)
    if chosen is None:
        return deps.settings
    wanted = set(chosen)
    targets = [d for d in deps.settings.destinations if str(d) in wanted]
    return deps.settings.model_copy(update={"destinations": targets})


def _queue_outputs(
    deps: PipelineDeps,
    settings: Settings,
    prepared: PreparedJob,
    draft: ReportDraft,
    sr: Dataset,
    sr_path: Path,
    check: Callable[[], None],
    reissue: int,
    replaces: str | None,
    owner: str,
) -> list[int]:
    """Build and write each destination's objects (the FHIR report naming ``replaces``'s as
    the one it replaces), then queue them while ``owner`` holds the job; they are sent, and
    supersede the study's earlier drafts not yet sent there, once the job is done (timed:
    ``outputs_s``, ``enqueue_s``); returns the delivery ids."""
    timings = prepared.timings
    with StageTimer(timings, "outputs_s"):
        try:
            items = build_outputs(
                settings,
                deps.outputs_dir,
                sr=sr,
                sr_path=sr_path,
                image_read=prepared.image.header,
                evidence=prepared.evidence,
                text=_draft_text(draft),
                reissue=reissue,
                replaces=replaces,
                before_rename=check,
            )
        except IntegrationError as exc:
            raise JobFailure(
                f"output objects not built: {exc}", permanent=True, stage="outputs"
            ) from exc
    stage_delay("enqueue")
    from node.runtime.delivery import enqueue_deliveries

    check()
    with StageTimer(timings, "enqueue_s"), deps.session_factory() as session:
        return enqueue_deliveries(
            session, job_id=prepared.job_id, items=items, supersede=True, owner=owner
        )


def _observe(timings: dict[str, float]) -> None:
    """Stage durations (``*_s``) and the decode rate to :mod:`node.metrics`."""
    for key, value in timings.items():
        if key.endswith("_s"):
            metrics.observe_stage(key.removesuffix("_s"), value)
    if timings.get("decode_s"):
        metrics.observe_generation("report", timings.get("tokens", 0.0), timings["decode_s"])


def _queue_withdrawals(deps: PipelineDeps, withdrawn: withdrawals_db.Withdrawal) -> None:
    """Queue the withdrawals of the job's draft, withdrawn as it finished because the
    study's later draft was withdrawn first (:func:`node.db.withdrawals.finish_job`). The
    job is done and withdrawn whatever happens here: a failure is logged."""
    try:
        queue_withdrawals(deps.settings, deps.session_factory, withdrawn, actor="system")
    except Exception as exc:  # name the class, not the content
        log.error(
            "job %s: withdrawn as it finished, but its withdrawals were not queued (%s): "
            "see cxr-node jobs show %s for the destinations it reached",
            withdrawn.job_id,
            type(exc).__name__,
            withdrawn.job_id,
        )


def complete_job(
    deps: PipelineDeps,
    prepared: PreparedJob,
    draft: ReportDraft,
    *,
    owner: str,
    lease_lost: Callable[[], bool] | None = None,
) -> JobOutcome:
    """Store the draft, write the SR, enqueue deliveries and finish the job.

    Timed: ``sr_s``, and with destinations ``outputs_s`` and ``enqueue_s``; the model's
    timings (encode, prefill, decode, token counts) are kept with the job's.

    Raises
    ------
    LeaseLost
        When ``owner`` lost the job's lease on the way (outputs abandoned).
    JobFailure
        Permanent when the SR or an output object cannot be built from the draft.
    """
    job_id = prepared.job_id
    timings = prepared.timings
    timings.update({k: float(draft.timings[k]) for k in _GENERATION_TIMINGS if k in draft.timings})
    check = _lease_check(deps, job_id, owner, lease_lost)
    check()
    with deps.session_factory() as session:
        draft_id = drafts_db.save_draft(
            session, job_id, owner=owner, draft=draft_record(draft, timings)
        )
    stage_delay("sr")
    with StageTimer(timings, "sr_s"):
        reissue = _reissue(deps, prepared, draft)
        sr, path, replaces = _write_draft_sr(deps, prepared, draft, check, reissue)
    sr_uid = str(sr.SOPInstanceUID)
    delivery_ids: list[int] = []
    settings = _routed_settings(deps, job_id)
    if settings.destinations:
        delivery_ids = _queue_outputs(
            deps, settings, prepared, draft, sr, path, check, reissue, replaces, owner
        )
    else:  # none this run: an earlier run's rows, if any, must not go out with its files
        with deps.session_factory() as session:
            deliveries_db.enqueue_deliveries(session, job_id=job_id, supersede=True, owner=owner)
    with deps.session_factory() as session:
        drafts_db.update_draft_timings(session, draft_id, timings)
        withdrawn = withdrawals_db.finish_job(
            session,
            job_id,
            owner=owner,
            sr_sop_instance_uid=sr_uid,
            selected_sop_instance_uid=prepared.image.sop_instance_uid,
            stages=timings,
        )
    _observe(timings)
    if withdrawn is not None:
        _queue_withdrawals(deps, withdrawn)
    elif delivery_ids:
        from node.runtime.delivery import wake_senders

        wake_senders()  # the job is done: its objects may go now
    return JobOutcome(
        job_id=job_id,
        status="done",
        sr_uid=sr_uid,
        sr_path=path,
        draft_id=draft_id,
        delivery_ids=delivery_ids,
        timings=dict(timings),
    )
