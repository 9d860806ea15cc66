"""``cxr-node-probe`` (``deploy/compose/probe.py``), the containers' health checks, against
real servers on loopback: a listening socket, and the node's own API app behind uvicorn on a
migrated SQLite database with a viewer token (``/health`` without a token; ``/ready`` with
one, which answers 503 here: the process has no model host, as in a receiver)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from tests.deploy import manifests as m
from tests.helpers import free_port


@pytest.fixture(scope="module")
def probe() -> Any:
    return m.load_probe()


def test_tcp_probe_accepts_a_listener_and_refuses_a_closed_port(probe: Any) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        ok, message = probe.probe_tcp(f"127.0.0.1:{port}", 2.0)
        assert ok, message
    ok, message = probe.probe_tcp(f"127.0.0.1:{free_port()}", 2.0)
    assert not ok and message.startswith("tcp 127.0.0.1:")
    assert probe.probe_tcp("no-port", 1.0)[0] is False


@dataclass
class Api:
    url: str
    token: str


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The node's API app (no web console) under uvicorn on loopback, its database migrated
    and a viewer token created as `cxr-node tokens create` does."""
    from node.api.app import create_app
    from node.db.engine import make_engine, make_session_factory
    from node.db.migrate import upgrade
    from node.db.models import ApiRole
    from node.services import tokens as token_service
    from node.services.context import ServiceContext
    from node.settings import Settings

    work = tmp_path_factory.mktemp("probe-api")
    url = f"sqlite:///{work / 'node.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    ctx = ServiceContext(
        settings=Settings(api_enabled=False, database_url=url, spool_dir=work / "spool"),
        read_sessions=make_session_factory(engine, read_only=True),
        write_sessions=make_session_factory(engine),
    )
    _, token = token_service.create_token(
        ctx, name="probe", role=ApiRole.viewer, actor="test:probe"
    )
    port = free_port()
    config = uvicorn.Config(
        create_app(ctx, include_web=False),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield Api(f"http://127.0.0.1:{port}", token)
    server.should_exit = True
    thread.join(timeout=10)
    engine.dispose()


def test_http_probe_of_health(probe: Any, api: Api) -> None:
    ok, message = probe.probe_http(f"{api.url}/health", 5.0)
    assert ok and message == f"GET {api.url}/health: 200", message


def test_http_probe_without_a_token_file_falls_back_to_health(
    probe: Any, api: Api, tmp_path: Path
) -> None:
    missing = tmp_path / "token"
    ok, message = probe.probe_http(f"{api.url}/ready", 5.0, missing)
    assert ok, message
    assert f"GET {api.url}/health: 200 (no token in {missing}" in message
    missing.write_text("\n", encoding="utf-8")  # an empty file: the same
    assert probe.probe_http(f"{api.url}/ready", 5.0, missing)[0]


def test_http_probe_with_a_token_asks_ready(probe: Any, api: Api, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(f"{api.token}\n", encoding="utf-8")
    ok, message = probe.probe_http(f"{api.url}/ready", 5.0, token)
    # authenticated; not ready: no model host in this process (a receiver's /ready is so too)
    assert not ok and message == f"GET {api.url}/ready: 503", message
    token.write_text("cxr_" + "x" * 43, encoding="utf-8")
    ok, message = probe.probe_http(f"{api.url}/ready", 5.0, token)
    assert not ok and message == f"GET {api.url}/ready: 401", message


def test_wait_passes_once_the_server_listens(probe: Any) -> None:
    port = free_port()
    server = socket.socket()

    def listen_later() -> None:
        time.sleep(1.0)
        server.bind(("127.0.0.1", port))
        server.listen(1)

    thread = threading.Thread(target=listen_later, daemon=True)
    thread.start()
    try:
        assert probe.main(["--timeout", "1", "--wait", "20", "tcp", f"127.0.0.1:{port}"]) == 0
    finally:
        thread.join()
        server.close()


def test_http_probe_of_nothing_fails(probe: Any) -> None:
    ok, message = probe.probe_http(f"http://127.0.0.1:{free_port()}/health", 2.0)
    assert not ok and message.startswith("GET ")
    assert probe.probe_http("ftp://127.0.0.1/", 1.0)[0] is False


def test_main_exit_status(probe: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert probe.main(["--timeout", "1", "tcp", f"127.0.0.1:{free_port()}"]) == 1
    assert capsys.readouterr().out.startswith("tcp 127.0.0.1:")
    t0 = time.monotonic()
    assert probe.main(["--timeout", "1", "--wait", "3", "tcp", f"127.0.0.1:{free_port()}"]) == 1
    assert 2.0 <= time.monotonic() - t0 < 10.0, "retried for about --wait seconds"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        probe.build_parser().parse_args(["udp", "127.0.0.1:1"])
