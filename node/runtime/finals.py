"""Final report intake: the radiologist's report comes back and the draft is scored.

Two ways in, one path after:

- **DICOM** (:class:`ReportSink`, in front of the ingest sink): a Structured Report with
  Verification Flag VERIFIED (PS3.3 C.17.2), or any SR or Encapsulated PDF from an AE title
  in ``report_sources``, is a final report. Every other object, including the node's own
  drafts and unverified SRs from elsewhere, goes on to ingest as before.
- **HL7 v2** (:func:`make_hl7_listener`): a production (MSH-11 ``P``) ORU^R01 with result
  status F (or C) on the MLLP listener (``hl7_listen``), from the hosts in
  ``hl7_allowed_hosts``; ACK AA when stored, AE (AR: not ORU^R01, not production) with the
  reason when not.

:class:`FinalIntake` stores the report (idempotent per source and object UID), matches it
to the study's newest report draft by Study Instance UID or Accession Number, labels both
texts with the rule labeler and stores the pair's concordance (``models.concordance``).
A final that arrives before its draft is matched by :meth:`FinalIntake.match_pending`, a
chore. No report text, patient data or labels reach a log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from integration.encapsulated_pdf import ENCAPSULATED_PDF_STORAGE
from integration.final_report import (
    SR_STORAGE_CLASSES,
    FinalReport,
    FinalReportError,
    final_report_from_dataset,
    final_report_from_oru,
)
from integration.scp import ReceivedMeta, StoreResult
from integration.status import StoreStatus
from node import metrics
from node.db import finals as finals_db
from node.db.models import FinalSource
from node.settings import Settings

if TYPE_CHECKING:
    from integration.mllp_listener import MllpListener
    from node.runtime.ingest import IngestSink
    from node.runtime.service import NodeContext

__all__ = ["FinalIntake", "FinalOutcome", "ReportSink", "make_hl7_listener", "scores_for"]

log = logging.getLogger(__name__)

#: SOP classes that may carry a final report: the SR storage classes and Encapsulated PDF
REPORT_SOP_CLASSES = frozenset({*SR_STORAGE_CLASSES, ENCAPSULATED_PDF_STORAGE})


@dataclass(frozen=True)
class FinalOutcome:
    """What happened to one final report."""

    final_id: int
    new: bool
    matched: bool
    significant: bool = False
    agreement: float | None = None


def scores_for(
    settings: Settings,
    final: finals_db.FinalRow | finals_db.FinalIn,
    match: finals_db.DraftMatch,
) -> finals_db.PairScores:
    """Label the draft and the final with the rule labeler and compare them
    (:func:`models.concordance.compare_reports`; critical findings from
    ``critical_findings``)."""
    from models.concordance import compare_reports
    from models.labeler import Observation

    critical = [Observation(name) for name in settings.critical_findings]
    finalized = final.signed_at
    pair = compare_reports(
        match.text,
        final.full_text,
        drafted_at=match.drafted_at,
        finalized_at=finalized,
        model_version=match.model_version,
        critical=critical,
    )
    return finals_db.PairScores(
        draft_labels={o.value: lab.value for o, lab in pair.draft.items()},
        final_labels={o.value: lab.value for o, lab in pair.final.items()},
        agreement=pair.agreement_rate,
        discrepancies=[
            {
                "observation": d.observation.value,
                "direction": d.direction.value,
                "draft": d.draft.value,
                "final": d.final.value,
            }
            for d in pair.discrepancies
        ],
        bleu4=pair.text.bleu4 if pair.text else None,
        rouge_l=pair.text.rouge_l_f if pair.text else None,
        turnaround_s=pair.turnaround_s,
    )


class FinalIntake:
    """Stores final reports, matches them to drafts and scores the pairs.

    Parameters
    ----------
    settings
        The node's settings (``critical_findings``, the agreement alert).
    session_factory
        Write sessions.
    """

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = session_factory

    def receive(self, report: FinalReport, *, sender: str) -> FinalOutcome:
        """Store ``report`` (from ``sender``: an AE title or a host) and score it if its
        draft exists. Idempotent: the same source and object UID is stored once."""
        final = finals_db.FinalIn(
            source=FinalSource(report.source),
            object_uid=report.object_uid,
            sender=sender[:128],
            study_uid=report.study_uid,
            accession_number=report.accession_number,
            verified=report.verified,
            full_text=report.text,
            findings=report.findings,
            impression=report.impression,
            signed_at=report.signed_at,
        )
        with self.sessions() as session:
            final_id, new = finals_db.record_final(session, final, actor=f"peer:{sender}"[:128])
            match = finals_db.draft_for(session, final.study_uid, final.accession_number)
        metrics.count_final_report(final.source.value)
        log.info(
            "final report %d (%s) from %s: %s, %s",
            final_id,
            final.source.value,
            sender,
            "new" if new else "already stored",
            "draft found" if match else "no draft yet",
        )
        if not new or match is None:
            return FinalOutcome(final_id, new, matched=match is not None)
        return self.score(final_id, final, match, new=new)

    def score(
        self,
        final_id: int,
        final: finals_db.FinalRow | finals_db.FinalIn,
        match: finals_db.DraftMatch,
        *,
        new: bool = True,
    ) -> FinalOutcome:
        """Label both texts, store the pair's scores and the match; check the alert."""
        scores = scores_for(self.settings, final, match)
        with self.sessions() as session:
            finals_db.save_scores(session, final_id, match, scores)
        significant = bool(scores.discrepancies)
        if significant:
            log.warning(
                "job %d: significant discrepancy between draft and final report %d",
                match.job_id,
                final_id,
            )
        self.check_alert()
        return FinalOutcome(final_id, new, True, significant, scores.agreement)

    def match_pending(self) -> int:
        """Match and score the stored finals whose draft now exists; returns how many."""
        with self.sessions() as session:
            pending = finals_db.unmatched_finals(session)
        done = 0
        for f in pending:
            with self.sessions() as session:
                match = finals_db.draft_for(session, f.study_uid, f.accession_number)
            if match is not None:
                self.score(f.id, f, match, new=False)
                done += 1
        return done

    def check_alert(self) -> bool:
        """Whether rolling agreement is below ``agreement_alert_threshold``; logs (figures
        only) when the alert starts or ends (:func:`node.metrics.note_agreement`)."""
        s = self.settings
        with self.sessions() as session:
            rolling, pairs = finals_db.rolling_agreement(session, s.agreement_window)
        return metrics.note_agreement(
            rolling, pairs, s.agreement_alert_threshold, s.agreement_min_pairs
        )


class ReportSink:
    """An :class:`~integration.scp.InstanceSink` that takes final reports out of the
    C-STORE stream and passes everything else to ``ingest``.

    Parameters
    ----------
    ingest
        The ingest sink (spool + SQL) for every other instance.
    intake
        Where final reports go.
    report_sources
        AE titles whose SR and PDF objects are final reports whatever their Verification
        Flag (a RIS or reporting system that sends signed reports as DICOM).
    """

    def __init__(
        self, ingest: IngestSink, intake: FinalIntake, report_sources: frozenset[str]
    ) -> None:
        self.ingest = ingest
        self.intake = intake
        self.report_sources = report_sources

    def accept(self, path: Path, meta: ReceivedMeta) -> StoreResult:
        """Record a final report (0x0000, outcome ``final_report``), refuse an unusable one
        (0xC210 with the reason), or hand the instance to ingest.

        The data set is read whole only once ingest's bounded header walk has passed it
        (:meth:`~node.runtime.ingest.IngestSink.inspect`: structure, inflation limits,
        UIDs against the request), so an SR or PDF is refused with the status any
        instance gets (PS3.4 Table B.2-1) and a deflate bomb is never inflated whole.
        """
        trusted = meta.calling_ae in self.report_sources
        if meta.sop_class_uid not in REPORT_SOP_CLASSES or (
            meta.sop_class_uid == ENCAPSULATED_PDF_STORAGE and not trusted
        ):
            # a PDF counts only from a report source (final_report_from_dataset): any other
            # is not read whole, so it costs the memory any instance does (CONFORMANCE.md)
            return self.ingest.accept(path, meta)
        checked = self.ingest.inspect(path, meta)
        if isinstance(checked, StoreResult):
            return checked
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        try:
            ds = dcmread(path)
            report = final_report_from_dataset(ds, trusted_source=trusted)
        except (FinalReportError, InvalidDicomError) as exc:
            log.warning("final report from %r refused: %s", meta.calling_ae, exc)
            return StoreResult(StoreStatus.CANNOT_UNDERSTAND, reason=str(exc))
        if report is None:  # not a final report: an instance, its header already read
            return self.ingest.store_inspected(path, checked, meta)
        try:
            self.intake.receive(report, sender=meta.calling_ae)
        except Exception as exc:
            log.error("final report from %r not stored: %s", meta.calling_ae, type(exc).__name__)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES_DATABASE, reason="database error")
        return StoreResult(StoreStatus.SUCCESS, outcome="final_report")


def make_hl7_listener(ctx: NodeContext) -> MllpListener:
    """The MLLP listener of ``hl7_listen`` (a component of ``serve``): ORU^R01 final reports
    into :class:`FinalIntake`; refused messages get an AE with the reason."""
    from integration.mllp_listener import Hl7Refusal, MllpListener

    settings = ctx.settings
    intake = final_intake(ctx)
    host, port = settings.hl7_listen_address()

    def handle(er7: str, peer: str) -> None:
        try:
            report = final_report_from_oru(er7)
        except FinalReportError as exc:
            raise Hl7Refusal(exc.ack_code, exc.err_code, str(exc)) from None
        intake.receive(report, sender=peer)

    return MllpListener(
        host,
        port,
        handle,
        allowed_hosts=settings.hl7_allowed_hosts or None,
        max_message_bytes=settings.hl7_max_message_kb * 1024,
        application=settings.hl7_sending_application,
        facility=settings.hl7_sending_facility,
    )


def final_intake(ctx: NodeContext) -> FinalIntake:
    """The process's one :class:`FinalIntake` (kept in ``ctx.extras``)."""
    intake = ctx.extras.get("final_intake")
    if not isinstance(intake, FinalIntake):
        intake = FinalIntake(ctx.settings, ctx.session_factory)
        ctx.extras["final_intake"] = intake
    return intake
