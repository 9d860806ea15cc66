"""Bounds of the node against hostile peers, outages and oversized input: the DICOM
network (PS3.8 timers and PDU size), inflation of deflated data sets, the admin API's body
and failed-authentication limits, and the database, PACS and job retry timings.

A base of :class:`node.settings.Settings` (each field is ``CXR_NODE_<FIELD>`` as usual);
``docs/security.md`` explains each bound, ``docs/configuration.md`` lists them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, model_validator

from node.settings.values import not_shorter, within

__all__ = ["BoundsSettings"]


_SECONDS_TO_HOUR = within(0, 3600, open_low=True, note="seconds")
_SECONDS_TO_DAY = within(0, 86400, open_low=True, note="seconds")


class BoundsSettings(BaseModel):
    """The node's bounds; every refusal names its setting and the range it must lie in."""

    # DICOM network bounds against hostile peers (docs/security.md, "DICOM network: ...")
    max_associations_per_address: Annotated[int, within(1, 1000)] = 5
    association_request_timeout: Annotated[float, _SECONDS_TO_HOUR] = 5.0
    pdu_receive_timeout: Annotated[float, _SECONDS_TO_HOUR] = 30.0
    # PS3.8 D.1 Maximum Length; 0 (unlimited) would let one PDU fill memory
    max_pdu_size: Annotated[int, within(4096, 16 * 1024 * 1024, note="bytes (16 MiB)")] = 1048576
    tls_handshake_timeout: Annotated[float, _SECONDS_TO_HOUR] = 10.0
    # received data: inflation of deflated data sets (docs/security.md, "Received data: ...");
    # zlib's own maximum ratio is about 1032:1, past that the ratio no longer bounds anything
    deflate_max_ratio: Annotated[int, within(2, 1100)] = 100
    deflate_max_inflated_mb: Annotated[int, within(1, 65536, note="(MiB)")] = 256
    # admin API bounds against hostile clients (docs/security.md, "Admin API and web console")
    api_max_upload_mb: Annotated[int, within(1, 1024, note="(MiB)")] = 64
    api_auth_max_failures: Annotated[int, within(1, 10000)] = 10
    api_auth_window_seconds: Annotated[float, _SECONDS_TO_DAY] = 60.0
    # outages of the database, the PACS, failing jobs (docs/security.md, "Outages: ...")
    database_connect_timeout_seconds: Annotated[
        int, within(2, 300, note="(libpq's minimum is 2)")
    ] = 5
    database_statement_timeout_seconds: Annotated[float, _SECONDS_TO_HOUR] = 10.0
    delivery_retry_hours: Annotated[float, within(0, 8760, open_low=True, note="hours")] = 24.0
    delivery_recheck_minutes: Annotated[float, within(0, 1440, note="(0: off)")] = 5.0
    job_backoff_seconds: Annotated[float, _SECONDS_TO_DAY] = 60.0
    job_max_backoff_seconds: Annotated[float, _SECONDS_TO_DAY] = 1800.0

    @model_validator(mode="after")
    def _outage_bounds(self) -> BoundsSettings:
        not_shorter(self, "job_max_backoff_seconds", "job_backoff_seconds")
        return self
