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
    _split_commas,
    _validate_host,
    _validate_port,
    is_loopback,
    validate_ae_title,
)

__all__ = ["DEFAULT_CRITICAL_FINDINGS", "OBSERVATION_NAMES", "ReportIntakeSettings"]

#: the 14 CheXpert observations (``models.labeler.Observation`` values, CheXpert order)
OBSERVATION_NAMES = tuple(o.value for o in OBSERVATIONS)
#: the critical findings of ``models.concordance`` (CheXpert order)
DEFAULT_CRITICAL_FINDINGS = [o.value for o in OBSERVATIONS if o in DEFAULT_CRITICAL]


class ReportIntakeSettings(BaseModel):
    """Final report intake (DICOM and HL7 MLLP) and the agreement alert; a base of
    :class:`node.settings.Settings`, so each field is ``CXR_NODE_<FIELD>`` as usual."""

    report_sources: Annotated[list[str], NoDecode] = Field(default_factory=list)
    hl7_listen: str | None = None
    hl7_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    hl7_max_message_kb: int = 1024
    critical_findings: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_CRITICAL_FINDINGS)
    )
    agreement_alert_threshold: float = 0.8
    agreement_window: int = 50
    agreement_min_pairs: int = 10

    @field_validator("report_sources", mode="before")
    @classmethod
    def _report_sources(cls, v: Any) -> Any:
        items = _split_commas(v)
        if isinstance(items, list):
            return [validate_ae_title(str(i), setting="report_sources") for i in items]
        return items

    @field_validator("hl7_allowed_hosts", mode="before")
    @classmethod
    def _hl7_hosts(cls, v: Any) -> Any:
        items = _split_commas(v)
        if not isinstance(items, list):
            return items
        out = []
        for i in items:
            try:
                out.append(str(ipaddress.ip_address(str(i).strip())))
            except ValueError:
                raise ValueError(f"hl7_allowed_hosts: {i!r} is not an IP address") from None
        return out

    @field_validator("critical_findings", mode="before")
    @classmethod
    def _critical(cls, v: Any) -> Any:
        items = _split_commas(v)
        if not isinstance(items, list):
            return items
        out = []
        for i in items:
            name = str(i).strip().lower().replace(" ", "_").replace("-", "_")
            if name not in OBSERVATION_NAMES:
                raise ValueError(
                    f"critical_findings: {i!r} is not a CheXpert observation "
                    f"({', '.join(OBSERVATION_NAMES)})"
                )
            out.append(name)
        return out

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

    @field_validator("hl7_max_message_kb")
    @classmethod
    def _max_kb(cls, v: int) -> int:
        if not 1 <= v <= 65536:
            raise ValueError("hl7_max_message_kb: must be 1..65536")
        return v

    @field_validator("agreement_alert_threshold")
    @classmethod
    def _threshold(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("agreement_alert_threshold: must be 0..1")
        return v

    @field_validator("agreement_window", "agreement_min_pairs")
    @classmethod
    def _window(cls, v: int, info: Any) -> int:
        if not 1 <= v <= 100_000:
            raise ValueError(f"{info.field_name}: must be 1..100000")
        return v

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
