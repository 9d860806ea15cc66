"""SQLAlchemy 2.0 typed models of the node's database.

The tables hold no patient names, IDs or birth dates: the spooled DICOM files carry those.
What is kept is what the node needs to route, assemble and audit: DICOM UIDs, modality, body
part, descriptions (for the chest rule), file locations and checksums, job and delivery state.
Every change here needs an Alembic revision in ``node/db/migrations/versions``; a test checks
that the migrations produce exactly this metadata.
"""

from __future__ import annotations

from node.db.models.access import ApiSession, ApiToken, AuditLog
from node.db.models.base import AE_LEN, ID_MAX, UID_LEN, Base, UTCDateTime, utcnow
from node.db.models.conversations import Conversation, ConversationTurn
from node.db.models.deliveries import Delivery
from node.db.models.finals import FinalReport
from node.db.models.jobs import Draft, Job, JobEvent
from node.db.models.receive_log import Association, RefusedInstance
from node.db.models.states import (
    ApiRole,
    DeliveryKind,
    DeliveryObject,
    DeliveryState,
    FinalSource,
    JobState,
    StudyState,
)
from node.db.models.studies import Instance, Series, Study

__all__ = [
    "AE_LEN",
    "ID_MAX",
    "UID_LEN",
    "ApiRole",
    "ApiSession",
    "ApiToken",
    "Association",
    "AuditLog",
    "Base",
    "Conversation",
    "ConversationTurn",
    "Delivery",
    "DeliveryKind",
    "DeliveryObject",
    "DeliveryState",
    "Draft",
    "FinalReport",
    "FinalSource",
    "Instance",
    "Job",
    "JobEvent",
    "JobState",
    "RefusedInstance",
    "Series",
    "Study",
    "StudyState",
    "UTCDateTime",
    "utcnow",
]
