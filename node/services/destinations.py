"""Configured destinations: C-ECHO one on an operator's request."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from node.db import audit as audit_db
from node.services.context import ServiceContext
from node.services.errors import Conflict, NotFound
from node.settings import DicomDestination

__all__ = ["EchoResult", "echo"]

log = logging.getLogger(__name__)

#: the longest any step of an operator's C-ECHO may wait (seconds)
ECHO_TIMEOUT = 10.0


@dataclass(frozen=True)
class EchoResult:
    """The outcome of a C-ECHO: the destination (``AE@host:port``) and whether it answered
    Success."""

    index: int
    destination: str
    ok: bool


def echo(ctx: ServiceContext, index: int, *, actor: str) -> EchoResult:
    """C-ECHO configured destination ``index`` (Verification SOP Class, PS3.4 Annex A) with
    the node's TLS settings; audited ``destination.echo``. Blocks up to a few timeouts.

    Raises
    ------
    NotFound
        When no destination has that index.
    Conflict
        When the destination is not a DIMSE one (STOW-RS, HL7, FHIR have no C-ECHO).
    """
    from integration.scu import DicomDestination as ScuDestination
    from integration.scu import echo as scu_echo
    from node.tls import client_context

    settings = ctx.settings
    if not 0 <= index < len(settings.destinations):
        raise NotFound(f"no destination {index} is configured")
    dest = settings.destinations[index]
    if not isinstance(dest, DicomDestination):
        raise Conflict(f"destination {index} is not DICOM DIMSE: C-ECHO is DIMSE only")
    target = ScuDestination(ae_title=dest.ae_title, host=dest.host, port=dest.port)
    timeout = min(settings.acse_timeout, ECHO_TIMEOUT)
    ok = scu_echo(
        target,
        settings.ae_title,
        acse_timeout=timeout,
        dimse_timeout=timeout,
        network_timeout=timeout,
        connection_timeout=timeout,
        ssl_context=client_context(settings),
    )
    log.info("C-ECHO %s requested by %s: %s", target, actor, "success" if ok else "failed")
    with ctx.write_sessions() as session:
        audit_db.audit(
            session,
            actor=actor,
            action="destination.echo",
            target=f"destination:{index}",
            detail={"destination": str(target), "ok": ok},
        )
    return EchoResult(index, str(target), ok)
