"""Settings of the DICOM receiver: the storage SCP's AE title, address, the peers it accepts
and the PS3.8 timers of its associations (``docs/configuration.md``, "DICOM receiving").

A base of :class:`node.settings.Settings` (each field is ``CXR_NODE_<FIELD>``); the checks
that involve other groups (``allowed_aes`` off loopback, ``reuse_port`` with
``spool_shared``) are the ``Settings`` model's own.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import NoDecode

from node.settings.values import (
    AETitle,
    AllowedAE,
    Host,
    Port,
    PositiveSeconds,
    split_each,
    within,
)

__all__ = ["ReceiverSettings"]


class ReceiverSettings(BaseModel):
    """The storage SCP (PS3.4 Annex B) and its associations; every refusal names its
    setting."""

    ae_title: AETitle = "LLMCXR"
    host: Host = "127.0.0.1"
    port: Port = 11112
    # several receiver processes on one host listen on `port` (SO_REUSEPORT)
    reuse_port: bool = False
    allowed_aes: Annotated[list[AllowedAE], NoDecode] = Field(default_factory=list)
    max_associations: Annotated[int, within(1, 1000)] = 10
    acse_timeout: PositiveSeconds = 30.0
    dimse_timeout: PositiveSeconds = 30.0
    network_timeout: PositiveSeconds = 60.0

    @field_validator("allowed_aes", mode="before")
    @classmethod
    def _allowed_aes(cls, v: Any) -> Any:
        return split_each(v, lambda i: AllowedAE.parse(i) if isinstance(i, str) else i)
