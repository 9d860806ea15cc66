"""The API server component inside ``run_node``: serves while the node runs, stops cleanly."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from node.api.server import make_api_server
from node.settings import load_settings
from tests.helpers import free_port, node_thread, port_open, wait_for

pytestmark = pytest.mark.integration


def test_run_node_serves_the_api_and_stops_it(tmp_path: Path) -> None:
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path}/node.sqlite3",
        spool_dir=tmp_path / "spool",
        port=free_port(),
        api_port=free_port(),
    )
    stop = threading.Event()
    thread, codes = node_thread(
        settings, stop, extra_components=[make_api_server], shutdown_grace_seconds=1
    )
    try:
        wait_for(lambda: port_open(settings.api_port), timeout=60)
        r = httpx.get(f"http://127.0.0.1:{settings.api_port}/health")
        assert r.json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{settings.api_port}/api/jobs").status_code == 401
        # the OpenAPI schema is published
        spec = httpx.get(f"http://127.0.0.1:{settings.api_port}/openapi.json").json()
        assert "/api/jobs/{job_id}/retry" in spec["paths"]
    finally:
        stop.set()
        thread.join(60)
    assert codes == [0]
    assert not port_open(settings.api_port)
