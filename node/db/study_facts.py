"""The facts of a stored study that the routing rules look at, as the database records them.

Per series Modality (0008,0060), Body Part Examined (0018,0015), Series Description
(0008,103E) (PS3.3 C.7.3.1) and the View Positions (0018,5101) of its instances; per study
the Study Description (0008,1030) and the calling AE title of the association. Attributes
the database does not record are read from the spool by :mod:`node.runtime.routing`, which
passes its own ``facts_of`` to :func:`node.db.study_completion.complete_quiet_studies`. The facts
hold patient data: they are evaluated, never logged or stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import Instance, Series, Study

__all__ = ["FactsOf", "recorded_facts"]

FactsOf = Callable[[Session, Study], list[dict[str, Any]]]
"""What gives the rules' facts of a study: one mapping per series, in order."""


def recorded_facts(session: Session, study: Study) -> list[dict[str, Any]]:
    """One facts mapping per series of ``study`` (in order), from the database alone."""
    out: list[dict[str, Any]] = []
    for s in session.scalars(
        select(Series).where(Series.study_id == study.id).order_by(Series.id)
    ).all():
        views = session.scalars(
            select(Instance.view_position)
            .where(Instance.series_id == s.id, Instance.view_position.is_not(None))
            .distinct()
        ).all()
        out.append(
            {
                "Modality": s.modality,
                "BodyPartExamined": s.body_part_examined,
                "SeriesDescription": s.series_description,
                "ViewPosition": tuple(v for v in views if v),
                "StudyDescription": study.study_description,
                "CallingAETitle": study.calling_ae,
            }
        )
    return out
