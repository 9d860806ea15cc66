"""The node's database: typed models, engine, migrations and the repository (all queries)."""

from node.db.models import (
    AuditLog,
    Base,
    Delivery,
    DeliveryKind,
    DeliveryState,
    Draft,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    StudyState,
)

__all__ = [
    "AuditLog",
    "Base",
    "Delivery",
    "DeliveryKind",
    "DeliveryState",
    "Draft",
    "Instance",
    "Job",
    "JobState",
    "Series",
    "Study",
    "StudyState",
]
