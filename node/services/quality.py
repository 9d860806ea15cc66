"""How good the drafts are against the radiologists' final reports, for the API, the
console and a registry export.

Per pair the stored labels and scores (:mod:`node.db.finals`); over pairs, per model
version and time window, :func:`models.concordance.summarize` (agreement, Cohen's kappa,
F1, BLEU-4, ROUGE-L, turnaround; definitions in ``docs/labeler.md``). The alert is the
mean agreement of the last ``agreement_window`` pairs below ``agreement_alert_threshold``
(with at least ``agreement_min_pairs`` pairs).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from models.concordance import (
    ConcordanceSummary,
    Discrepancy,
    DiscrepancyDirection,
    PairConcordance,
    TextOverlap,
    summarize,
    summarize_by,
    window_start,
)
from models.labeler import OBSERVATIONS, Label, Observation
from node.db import finals as finals_db
from node.metrics import agreement_alert
from node.services.context import ServiceContext

__all__ = [
    "EXPORT_COLUMNS",
    "AlertState",
    "alert_state",
    "export_csv",
    "export_rows",
    "job_finals",
    "pair_of",
    "summary",
]

#: the columns of the per-pair export, in order (labels: one column per observation/side)
EXPORT_COLUMNS = (
    "final_id",
    "job_id",
    "study_uid",
    "source",
    "received_at",
    "signed_at",
    "model_name",
    "model_version",
    "agreement",
    "significant",
    "bleu4",
    "rouge_l",
    "turnaround_s",
    *(f"draft_{o.value}" for o in OBSERVATIONS),
    *(f"final_{o.value}" for o in OBSERVATIONS),
)


@dataclass(frozen=True)
class AlertState:
    """The rolling agreement and whether it is an alert."""

    rolling_agreement: float | None
    pairs: int
    threshold: float
    min_pairs: int
    active: bool


def alert_state(ctx: ServiceContext) -> AlertState:
    """The quality alert now (read from the database: right in every process)."""
    s = ctx.settings
    with ctx.read_sessions() as session:
        rolling, pairs = finals_db.rolling_agreement(session, s.agreement_window)
    active = agreement_alert(rolling, pairs, s.agreement_alert_threshold, s.agreement_min_pairs)
    return AlertState(rolling, pairs, s.agreement_alert_threshold, s.agreement_min_pairs, active)


def job_finals(ctx: ServiceContext, job_id: int) -> list[finals_db.FinalRow]:
    """The final reports matched to a job's draft, with their scores."""
    with ctx.read_sessions() as session:
        return finals_db.finals_for_job(session, job_id)


def pair_of(row: finals_db.FinalRow) -> PairConcordance:
    """A stored, scored pair as :class:`models.concordance.PairConcordance`."""
    if row.draft_labels is None or row.final_labels is None:
        raise ValueError(f"final report {row.id} is not scored")
    draft = {
        o: Label(row.draft_labels.get(o.value, Label.NOT_MENTIONED.value)) for o in OBSERVATIONS
    }
    final = {
        o: Label(row.final_labels.get(o.value, Label.NOT_MENTIONED.value)) for o in OBSERVATIONS
    }
    text = (
        TextOverlap(row.bleu4, row.rouge_l)
        if row.bleu4 is not None and row.rouge_l is not None
        else None
    )
    return PairConcordance(
        draft=draft,
        final=final,
        agreement={o: draft[o] is final[o] for o in OBSERVATIONS},
        discrepancies=tuple(
            Discrepancy(
                Observation(d["observation"]),
                DiscrepancyDirection(d["direction"]),
                Label(d["draft"]),
                Label(d["final"]),
            )
            for d in row.discrepancies or []
        ),
        text=text,
        turnaround_s=row.turnaround_s,
        model_version=row.model_version,
        finalized_at=row.received_at,
    )


def _window(pair: PairConcordance, width: timedelta) -> datetime:
    assert pair.finalized_at is not None  # pair_of sets it from received_at
    return window_start(pair.finalized_at, width)


def _summary_dict(s: ConcordanceSummary) -> dict[str, Any]:
    return {
        "pairs": s.n_pairs,
        "micro_f1": s.micro_f1,
        "macro_f1": s.macro_f1,
        "significant_discrepancies": s.significant_discrepancies,
        "mean_bleu4": s.mean_bleu4,
        "mean_rouge_l": s.mean_rouge_l_f,
        "turnaround_median_s": s.turnaround_median_s,
        "observations": {
            o.value: {
                "agreement": x.agreement,
                "kappa": x.kappa,
                "f1": x.f1,
                "missed": x.missed,
                "overcalled": x.overcalled,
            }
            for o, x in s.per_observation.items()
        },
    }


def summary(
    ctx: ServiceContext,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    model_version: str | None = None,
    window: timedelta = timedelta(days=7),
) -> dict[str, Any]:
    """Concordance over the matched pairs received in ``[since, until)``: overall and per
    model version, and per model version and ``window`` (the time series the console
    plots); with the alert state and the pairs with a significant discrepancy."""
    with ctx.read_sessions() as session:
        rows = finals_db.pair_rows(session, since=since, until=until, model_version=model_version)
    pairs = [pair_of(r) for r in rows]
    by_version = summarize_by(pairs, lambda p: p.model_version or "")
    series = summarize_by(pairs, lambda p: (p.model_version or "", _window(p, window)))

    return {
        "alert": vars(alert_state(ctx)),
        "window_seconds": int(window.total_seconds()),
        "overall": _summary_dict(summarize(pairs)) if pairs else None,
        "by_model_version": {k: _summary_dict(v) for k, v in sorted(by_version.items())},
        "series": [
            {"model_version": k[0], "window_start": k[1].isoformat(), **_summary_dict(v)}
            for k, v in sorted(series.items())
        ],
        "discrepancies": [
            {
                "final_id": r.id,
                "job_id": r.job_id,
                "received_at": r.received_at.isoformat(),
                "model_version": r.model_version,
                "items": r.discrepancies,
            }
            for r in rows
            if r.significant
        ],
    }


def export_rows(
    ctx: ServiceContext,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    model_version: str | None = None,
) -> list[dict[str, Any]]:
    """One row per scored pair (:data:`EXPORT_COLUMNS`): identifiers, scores and the 14
    labels of each side; no report text and no patient data, for a quality registry."""
    with ctx.read_sessions() as session:
        rows = finals_db.pair_rows(session, since=since, until=until, model_version=model_version)
    out = []
    for r in rows:
        item: dict[str, Any] = {
            "final_id": r.id,
            "job_id": r.job_id,
            "study_uid": r.study_uid,
            "source": r.source,
            "received_at": r.received_at.isoformat(),
            "signed_at": r.signed_at.isoformat() if r.signed_at else None,
            "model_name": r.model_name,
            "model_version": r.model_version,
            "agreement": r.agreement,
            "significant": r.significant,
            "bleu4": r.bleu4,
            "rouge_l": r.rouge_l,
            "turnaround_s": r.turnaround_s,
        }
        for side, labels in (("draft", r.draft_labels or {}), ("final", r.final_labels or {})):
            for o in OBSERVATIONS:
                item[f"{side}_{o.value}"] = labels.get(o.value, Label.NOT_MENTIONED.value)
        out.append(item)
    return out


def export_csv(rows: list[dict[str, Any]]) -> str:
    """The export rows as CSV (RFC 4180, header row first)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(EXPORT_COLUMNS), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
