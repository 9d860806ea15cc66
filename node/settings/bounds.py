"""Bounds of the node against hostile peers, outages and oversized input: the DICOM
network (PS3.8 timers and PDU size), inflation of deflated data sets, the admin API's body
and failed-authentication limits, and the database, PACS and job retry timings.

A base of :class:`node.settings.Settings` (each field is ``CXR_NODE_<FIELD>`` as usual);
``docs/security.md`` explains each bound, ``docs/configuration.md`` lists them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, field_validator, model_validator

__all__ = ["BoundsSettings"]


class BoundsSettings(BaseModel):
    """The node's bounds; every refusal names its setting."""

    # DICOM network bounds against hostile peers (docs/security.md, "DICOM network: ...")
    max_associations_per_address: int = 5
    association_request_timeout: float = 5.0
    pdu_receive_timeout: float = 30.0
    max_pdu_size: int = 1048576
    tls_handshake_timeout: float = 10.0
    # received data: inflation of deflated data sets (docs/security.md, "Received data: ...")
    deflate_max_ratio: int = 100
    deflate_max_inflated_mb: int = 256
    # admin API bounds against hostile clients (docs/security.md, "Admin API and web console")
    api_max_upload_mb: int = 64
    api_auth_max_failures: int = 10
    api_auth_window_seconds: float = 60.0
    # outages of the database, the PACS, failing jobs (docs/security.md, "Outages: ...")
    database_connect_timeout_seconds: int = 5
    database_statement_timeout_seconds: float = 10.0
    delivery_retry_hours: float = 24.0
    delivery_recheck_minutes: float = 5.0
    job_backoff_seconds: float = 60.0
    job_max_backoff_seconds: float = 1800.0

    # --- DICOM network bounds -----------------------------------------------------------

    @field_validator("max_associations_per_address")
    @classmethod
    def _max_assoc_per_address(cls, v: int) -> int:
        if not 1 <= v <= 1000:
            raise ValueError(f"max_associations_per_address: {v} is outside 1..1000")
        return v

    @field_validator("association_request_timeout", "pdu_receive_timeout", "tls_handshake_timeout")
    @classmethod
    def _network_bound_seconds(cls, v: float, info: Any) -> float:
        if not 0 < v <= 3600:
            raise ValueError(f"{info.field_name}: {v} is outside (0, 3600] seconds")
        return v

    @field_validator("max_pdu_size")
    @classmethod
    def _max_pdu_size(cls, v: int) -> int:
        # PS3.8 D.1 Maximum Length; 0 (unlimited) would let one PDU fill memory
        if not 4096 <= v <= 16 * 1024 * 1024:
            raise ValueError(f"max_pdu_size: {v} is outside 4096..16777216 bytes (16 MiB)")
        return v

    # --- admin API bounds ---------------------------------------------------------------

    @field_validator("api_max_upload_mb")
    @classmethod
    def _api_upload(cls, v: int) -> int:
        if not 1 <= v <= 1024:
            raise ValueError(f"api_max_upload_mb: {v} is outside 1..1024 (MiB)")
        return v

    @field_validator("api_auth_max_failures")
    @classmethod
    def _api_failures(cls, v: int) -> int:
        if not 1 <= v <= 10000:
            raise ValueError(f"api_auth_max_failures: {v} is outside 1..10000")
        return v

    @field_validator("api_auth_window_seconds")
    @classmethod
    def _api_window(cls, v: float) -> float:
        if not 0 < v <= 86400:
            raise ValueError(f"api_auth_window_seconds: {v} is outside (0, 86400] seconds")
        return v

    # --- outages: database, PACS, failing jobs ------------------------------------------

    @field_validator("database_connect_timeout_seconds")
    @classmethod
    def _db_connect_timeout(cls, v: int) -> int:
        if not 2 <= v <= 300:
            raise ValueError(
                f"database_connect_timeout_seconds: {v} is outside 2..300 (libpq's minimum is 2)"
            )
        return v

    @field_validator("database_statement_timeout_seconds")
    @classmethod
    def _db_statement_timeout(cls, v: float) -> float:
        if not 0 < v <= 3600:
            raise ValueError(
                f"database_statement_timeout_seconds: {v} is outside (0, 3600] seconds"
            )
        return v

    @field_validator("delivery_retry_hours")
    @classmethod
    def _delivery_horizon(cls, v: float) -> float:
        if not 0 < v <= 8760:
            raise ValueError(f"delivery_retry_hours: {v} is outside (0, 8760] hours")
        return v

    @field_validator("delivery_recheck_minutes")
    @classmethod
    def _delivery_recheck(cls, v: float) -> float:
        if not 0 <= v <= 1440:
            raise ValueError(f"delivery_recheck_minutes: {v} is outside 0..1440 (0: off)")
        return v

    @field_validator("job_backoff_seconds", "job_max_backoff_seconds")
    @classmethod
    def _job_backoff(cls, v: float, info: Any) -> float:
        if not 0 < v <= 86400:
            raise ValueError(f"{info.field_name}: {v} is outside (0, 86400] seconds")
        return v

    @model_validator(mode="after")
    def _outage_bounds(self) -> BoundsSettings:
        if self.job_max_backoff_seconds < self.job_backoff_seconds:
            raise ValueError(
                f"job_max_backoff_seconds ({self.job_max_backoff_seconds}) must not be shorter "
                f"than job_backoff_seconds ({self.job_backoff_seconds})"
            )
        return self

    # --- received data bounds -----------------------------------------------------------

    @field_validator("deflate_max_ratio")
    @classmethod
    def _deflate_ratio(cls, v: int) -> int:
        # zlib's own maximum is about 1032:1; past that the ratio no longer bounds anything
        if not 2 <= v <= 1100:
            raise ValueError(f"deflate_max_ratio: {v} is outside 2..1100")
        return v

    @field_validator("deflate_max_inflated_mb")
    @classmethod
    def _deflate_inflated(cls, v: int) -> int:
        if not 1 <= v <= 65536:
            raise ValueError(f"deflate_max_inflated_mb: {v} is outside 1..65536 (MiB)")
        return v
