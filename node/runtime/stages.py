"""What every stage of the worker pipeline shares: its dependencies, timing and failure.

The stages (:mod:`node.runtime.prepare`, :mod:`node.runtime.completion`,
:mod:`node.runtime.pipeline`) take a :class:`PipelineDeps`, time themselves into a job's
``timings`` with :class:`StageTimer` and raise :class:`JobFailure` for a failure they can
name.

Test hook: ``CXR_NODE_TEST_STAGE_DELAY="<stage>:<seconds>[,<stage>:<seconds>...]"`` sleeps
before a stage (``load``, ``convert``, ``generate``, ``sr``, ``enqueue``;
:func:`stage_delay`). It exists so that tests can kill a worker *during* generation
deterministically; leave it unset in production (it is logged as a warning when set).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from node.runtime.spool import OUTPUTS_DIR
from node.settings import Settings

__all__ = [
    "STAGE_DELAY_ENV",
    "JobFailure",
    "PipelineDeps",
    "StageTimer",
    "stage_delay",
]

# the pipeline's stages log under one name, whichever module they live in
log = logging.getLogger("node.runtime.pipeline")

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


class StageTimer:
    """Context manager adding the wall time of its block to ``timings[key]`` (seconds).

    Parameters
    ----------
    timings
        A job's stage timings; ``key`` is created at 0 when missing.
    key
        The timing's name, by convention ``<stage>_s``.
    """

    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings = timings
        self.key = key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.t0


def _parse_delays(text: str) -> dict[str, float]:
    """``<stage>:<seconds>`` pairs of :data:`STAGE_DELAY_ENV`; raises ``ValueError``."""
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
