"""Settings of the final-report loop: where final reports come from and how quality is
watched (``docs/configuration.md``, section "Final reports and quality")."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from models.concordance import DEFAULT_CRITICAL
from models.labeler.observations import OBSERVATIONS
from node.settings.values import (
    _validate_host,
    _validate_port,
    is_loopback,
    split_each,
    validate_ae_title,
    within,
)

__all__ = ["DEFAULT_CRITICAL_FINDINGS", "OBSERVATION_NAMES", "ReportIntakeSettings"]

#: the 14 CheXpert observations (``models.labeler.Observation`` values, CheXpert order)
OBSERVATION_NAMES = tuple(o.value for o in OBSERVATIONS)
#: the critical findings of ``models.concordance`` (CheXpert order)
DEFAULT_CRITICAL_FINDINGS = [o.value for o in OBSERVATIONS if o in DEFAULT_CRITICAL]


def _ip_address(item: Any) -> str:
    """One entry of ``hl7_allowed_hosts``: an IP address, in its normal form."""
    try:
        return str(ipaddress.ip_address(str(item).strip()))
    except ValueError:
        raise ValueError(f"hl7_allowed_hosts: {item!r} is not an IP address") from None


def _observation_name(item: Any) -> str:
    """One entry of ``critical_findings``: a CheXpert observation's name, any case, spaces
    or hyphens for underscores."""
    name = str(item).strip().lower().replace(" ", "_").replace("-", "_")
    if name not in OBSERVATION_NAMES:
        raise ValueError(
            f"critical_findings: {item!r} is not a CheXpert observation "
            f"({', '.join(OBSERVATION_NAMES)})"
        )
    return name


class ReportIntakeSettings(BaseModel):
    """Final report intake (DICOM and HL7 MLLP) and the agreement alert; a base of
    :class:`node.settings.Settings`, so each field is ``CXR_NODE_<FIELD>`` as usual."""

    report_sources: Annotated[list[str], NoDecode] = Field(default_factory=list)
    hl7_listen: str | None = None
    hl7_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    hl7_max_message_kb: Annotated[int, within(1, 65536)] = 1024
    critical_findings: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_CRITICAL_FINDINGS)
    )
    agreement_alert_threshold: Annotated[float, within(0.0, 1.0)] = 0.8
    agreement_window: Annotated[int, within(1, 100_000)] = 50
    agreement_min_pairs: Annotated[int, within(1, 100_000)] = 10

    @field_validator("report_sources", mode="before")
    @classmethod
    def _report_sources(cls, v: Any) -> Any:
        return split_each(v, lambda i: validate_ae_title(str(i), setting="report_sources"))

    @field_validator("hl7_allowed_hosts", mode="before")
    @classmethod
    def _hl7_hosts(cls, v: Any) -> Any:
        return split_each(v, _ip_address)

    @field_validator("critical_findings", mode="before")
    @classmethod
    def _critical(cls, v: Any) -> Any:
        return split_each(v, _observation_name)

    @field_validator("hl7_listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        host, sep, port = v.strip().rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"hl7_listen: {v!r} is not host:port")
        _validate_host(host or "0.0.0.0", setting="hl7_listen")
        _validate_port(int(port), setting="hl7_listen")
        return f"{host or '0.0.0.0'}:{int(port)}"

    @model_validator(mode="after")
    def _hl7_allow_list(self) -> ReportIntakeSettings:
        if self.hl7_listen is not None:
            host, _port = self.hl7_listen_address()
            if not is_loopback(host) and not self.hl7_allowed_hosts:
                raise ValueError(
                    f"hl7_allowed_hosts: empty while hl7_listen={self.hl7_listen!r} is not "
                    "loopback; name the hosts (IP addresses) that may send final reports"
                )
        return self

    def hl7_listen_address(self) -> tuple[str, int]:
        """``hl7_listen`` as ``(host, port)``; raises ``ValueError`` when it is not set."""
        if self.hl7_listen is None:
            raise ValueError("hl7_listen is not set")
        host, _, port = self.hl7_listen.rpartition(":")
        return host.strip("[]"), int(port)
