"""Routing rules for the API and the console: the rule set, and the dry-run.

The dry-run evaluates the node's rules (``settings.routing_rules``) against a stored study
(the facts the completion sweep uses: :func:`node.runtime.routing.study_facts`) or an
uploaded DICOM header (read without pixel data, never stored), and returns the decision
with each evaluated rule's explanation. Explanations name attributes and quote only coded
values (:mod:`integration.routing`); nothing about the study is logged but its UID.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from integration.routing import ATTRIBUTES, RoutingDecision, RuleSet
from node.db.models import Study
from node.runtime.routing import facts_from_dataset, read_header, study_facts
from node.services.context import ServiceContext
from node.services.errors import InputTooLarge, InvalidInput, NotFound

__all__ = ["dry_run_study", "dry_run_upload", "rule_set"]

log = logging.getLogger(__name__)


def rule_set(ctx: ServiceContext) -> dict[str, Any]:
    """The node's routing rules as JSON: ``source``, ``rules`` (first match wins; each
    with ``when``, ``draft``, ``model``, ``priority``, ``destinations`` and ``action``),
    ``attributes`` (what a condition may name, with its tag) and ``default`` (whether this
    is the default chest rule set)."""
    rules: RuleSet = ctx.settings.routing_rules
    out = rules.to_dict()
    out["attributes"] = {name: tag for name, (tag, _) in ATTRIBUTES.items()}
    out["default"] = ctx.settings.routing_rules_file is None
    return out


def _decision(decision: RoutingDecision, **extra: Any) -> dict[str, Any]:
    out = decision.to_dict()
    out.update(extra)
    return out


def dry_run_study(ctx: ServiceContext, study_uid: str) -> dict[str, Any]:
    """Route the stored study ``study_uid`` as its completion would now; nothing changes.

    Raises
    ------
    NotFound
        No such study.
    """
    rules = ctx.settings.routing_rules
    with ctx.read_sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None:
            raise NotFound(f"study {study_uid} is not stored")
        facts = study_facts(session, study, rules=rules, spool_dir=ctx.settings.spool_dir)
        decision = rules.evaluate(facts)
    log.info("routing dry-run of study %s: rule %s", study_uid, decision.rule or "none")
    return _decision(decision, study_uid=study_uid, series=len(facts), source="study")


def dry_run_upload(
    ctx: ServiceContext, data: bytes, *, max_bytes: int, calling_ae: str | None = None
) -> dict[str, Any]:
    """Route the study an uploaded DICOM Part 10 file belongs to, as if it were its only
    series (header only: no pixel data is read; nothing is stored).

    Parameters
    ----------
    data
        The file (its first ``max_bytes`` + 1 bytes at most).
    max_bytes
        The upload limit.
    calling_ae
        The calling AE title to assume (the upload has no association).

    Raises
    ------
    InputTooLarge
        Over ``max_bytes``.
    InvalidInput
        Not a DICOM Part 10 file.
    """
    if len(data) > max_bytes:
        raise InputTooLarge(f"upload is larger than {max_bytes} bytes")
    if not data:
        raise InvalidInput("the upload is empty")
    try:
        ds = read_header(io.BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError):
        raise InvalidInput("not a readable DICOM Part 10 file (PS3.10)") from None
    ae = (calling_ae or "").strip()[:16] or None
    facts = facts_from_dataset(ds, calling_ae=ae)
    decision = ctx.settings.routing_rules.evaluate([facts])
    log.info("routing dry-run of an uploaded header: rule %s", decision.rule or "none")
    return _decision(decision, study_uid=None, series=1, source="upload")
