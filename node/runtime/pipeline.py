"""The per-job work of the worker: a batch of claimed jobs through every stage, and what a
failure of a job attempt comes to.

For one claimed job (or a batch of them), :func:`run_batch`:

1. **load** the study's instances (SQL rows + spool files) and read their headers with
   pydicom (``stop_before_pixels``);
2. **select** the frontal image (:func:`integration.selection.select_frontal`); none is a
   permanent failure with the reason (no retry);
3. **convert** its pixel data (:func:`integration.pixels.to_gray8` ->
   :func:`models.preprocess.to_model_input`); bad pixel data is a permanent failure
   (steps 1-3: :func:`node.runtime.prepare.prepare_job`);
4. **encode + generate** under the model host's lock (:meth:`models.runtime.LLMCXR.report_batch`
   with ``generation_*`` settings): several jobs' images in one batch
   (:func:`generate_reports`);
5. **store** the draft, 6. **build and write the SR**, 7. **build the outputs** each
   destination gets and **enqueue** their deliveries, 8. **finish** the job
   (:func:`node.runtime.completion.complete_job`).

A failed attempt is recorded by :func:`is_permanent`: permanent failures fail the job at
once, transient ones queue it again after a back-off (:func:`retry_delay_seconds`). When the
lease is lost on the way the job's outputs are abandoned (the new holder writes them). Logs
carry job ids, UIDs and timings only, never report text or patient data.

Stages share :mod:`node.runtime.stages` (dependencies, timings, the test hook
``CXR_NODE_TEST_STAGE_DELAY``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydicom.errors import InvalidDicomError

from integration.errors import IntegrationError
from models.layout import TokenLayoutError
from models.prompts import PromptError
from node.db import jobs as jobs_db
from node.db.jobs import LeaseLost
from node.runtime.completion import JobOutcome, complete_job
from node.runtime.prepare import PreparedJob, prepare_job
from node.runtime.stages import JobFailure, PipelineDeps, stage_delay
from node.settings import Settings

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from models.results import ReportDraft
    from models.runtime import LLMCXR
    from node.runtime.modelhost import ModelHost

__all__ = [
    "PERMANENT_ERRORS",
    "generate_reports",
    "is_permanent",
    "retry_delay_seconds",
    "run_batch",
]

log = logging.getLogger(__name__)


# --- failure and retry policy -----------------------------------------------------------


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

    Permanent: a :class:`~node.runtime.stages.JobFailure` marked so; an
    :class:`integration.errors.IntegrationError` that is not ``transient`` (no frontal image,
    PS3.3 C.8.11.5; undecodable pixel data, PS3.3 C.7.6.3; SR not buildable);
    :data:`PERMANENT_ERRORS`; and :class:`models.results.ModelInputError`. Everything else is
    transient and retried with back-off while attempts remain: ``OSError`` (``ENOSPC``,
    ``EIO``, timeouts), :class:`sqlalchemy.exc.SQLAlchemyError` (database away),
    :class:`node.runtime.modelhost.ModelNotReady` (model busy or loading), the backends'
    runtime errors, and any error not listed here.
    """
    if isinstance(exc, JobFailure):
        return exc.permanent
    if isinstance(exc, IntegrationError):
        return not exc.transient
    from models.results import ModelInputError

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


def _error_text(exc: BaseException) -> str:
    """The job's ``last_error`` for ``exc``: the stage and reason, or the class and message."""
    if isinstance(exc, JobFailure):
        return f"{exc.stage}: {exc.message}"
    # the model's own errors carry no patient data; keep the class and message short
    return f"{type(exc).__name__}: {str(exc)[:500]}"


def _fail(deps: PipelineDeps, job_id: int, owner: str, exc: BaseException) -> JobOutcome:
    """Record a failed attempt; a lost lease is abandoned silently.

    Permanent failures (:func:`is_permanent`) fail the job at once; transient ones queue it
    again, not claimable before the back-off of :func:`retry_delay_seconds` has passed.
    """
    if isinstance(exc, LeaseLost):
        log.warning("job %s: lease lost, outputs abandoned (%s)", job_id, exc)
        return JobOutcome(job_id, "abandoned", error=str(exc))
    permanent = is_permanent(exc)
    message = _error_text(exc)
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


# --- generation --------------------------------------------------------------------------


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


# --- a batch of jobs --------------------------------------------------------------------


def _prepare_all(
    deps: PipelineDeps,
    job_ids: Sequence[int],
    owner: str,
    lease_lost: Callable[[int], bool] | None,
    outcomes: dict[int, JobOutcome],
) -> list[PreparedJob]:
    """The jobs ready for generation and still held; the others' outcomes go to
    ``outcomes``."""
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
    return live


def _complete(
    deps: PipelineDeps,
    p: PreparedJob,
    result: ReportDraft | BaseException,
    owner: str,
    lease_lost: Callable[[int], bool] | None,
) -> JobOutcome:
    """Complete one generated job (:func:`~node.runtime.completion.complete_job`), or record
    its failure."""
    if isinstance(result, BaseException):
        return _fail(deps, p.job_id, owner, result)
    lost = (lambda j=p.job_id: lease_lost(j)) if lease_lost is not None else None
    try:
        outcome = complete_job(deps, p, result, owner=owner, lease_lost=lost)
    except Exception as exc:
        return _fail(deps, p.job_id, owner, exc)
    log.info(
        "job %s done: study %s, SR %s, %d deliveries queued; timings %s",
        p.job_id,
        p.study_uid,
        outcome.sr_uid,
        len(outcome.delivery_ids),
        _fmt_timings(outcome.timings),
    )
    return outcome


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
    live = _prepare_all(deps, job_ids, owner, lease_lost, outcomes)
    if live:
        t0 = time.perf_counter()
        for p in live:
            log.info("job %s: generating (study %s, batch of %d)", p.job_id, p.study_uid, len(live))
        results = _generate_isolated(model_host, live, deps.settings)
        wall = time.perf_counter() - t0
        for p, res in zip(live, results, strict=True):
            if not isinstance(res, BaseException):
                p.timings["generate_wall_s"] = wall
                p.timings["batch_size"] = float(len(live))
            outcomes[p.job_id] = _complete(deps, p, res, owner, lease_lost)
    return [outcomes[j] for j in job_ids]


def _fmt_timings(timings: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(timings.items())
    )
