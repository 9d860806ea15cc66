"""Settings of the DICOM receiver: the storage SCP's AE title, address, the peers it accepts
and the PS3.8 timers of its associations (``docs/configuration.md``, "DICOM receiving").

A base of :class:`node.settings.Settings` (each field is ``CXR_NODE_<FIELD>``); the checks
that involve other groups (``allowed_aes`` off loopback, ``reuse_port`` with
``spool_shared``) are the ``Settings`` model's own.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationInfo, field_validator
from pydantic_settings import NoDecode

from node.settings.values import (
    AllowedAE,
    _split_commas,
    _validate_host,
    _validate_port,
    positive_seconds,
    validate_ae_title,
)

__all__ = ["ReceiverSettings"]


class ReceiverSettings(BaseModel):
    """The storage SCP (PS3.4 Annex B) and its associations; every refusal names its
    setting."""

    ae_title: str = "LLMCXR"
    host: str = "127.0.0.1"
    port: int = 11112
    # several receiver processes on one host listen on `port` (SO_REUSEPORT)
    reuse_port: bool = False
    allowed_aes: Annotated[list[AllowedAE], NoDecode] = Field(default_factory=list)
    max_associations: int = 10
    acse_timeout: float = 30.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, v: str) -> str:
        return validate_ae_title(v, setting="ae_title")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _validate_host(v, setting="host")

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        return _validate_port(v, setting="port")

    @field_validator("allowed_aes", mode="before")
    @classmethod
    def _allowed_aes(cls, v: Any) -> Any:
        items = _split_commas(v)
        if isinstance(items, list):
            return [AllowedAE.parse(i) if isinstance(i, str) else i for i in items]
        return items

    @field_validator("max_associations")
    @classmethod
    def _max_assoc(cls, v: int) -> int:
        if not 1 <= v <= 1000:
            raise ValueError(f"max_associations: {v} is outside 1..1000")
        return v

    @field_validator("acse_timeout", "dimse_timeout", "network_timeout")
    @classmethod
    def _timeouts(cls, v: float, info: ValidationInfo) -> float:
        return positive_seconds(v, setting=str(info.field_name))
