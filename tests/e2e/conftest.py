"""Fixtures for end-to-end tests: the real node started as ``python -m node.cli serve`` in a
subprocess (the demo model bundle is ``demo_bundle`` of ``tests/conftest.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, free_port, node_env, port_open, spawn_node, terminate, wait_for


@dataclass
class NodeProcess:
    """A running ``cxr-node serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    workdir: Path
    log_path: Path

    def cli(self, *args: str) -> str:
        """Run ``cxr-node ARGS`` with the node's environment; return stdout (exit 0 required)."""
        out = subprocess.run(
            [sys.executable, "-m", "node.cli", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, f"cxr-node {' '.join(args)}: {out.stderr}"
        return out.stdout

    def jobs(self) -> list[dict[str, Any]]:
        """``cxr-node jobs list --json``."""
        return list(json.loads(self.cli("jobs", "list", "--json")))

    def log_tail(self, n: int = 4000) -> str:
        """The last ``n`` characters of the node's log."""
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        return terminate(self.proc, timeout=120)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start ``python -m node.cli serve`` with ``CXR_NODE_*`` settings; killed at teardown."""
    started: list[NodeProcess] = []

    def start(settings: Mapping[str, str], *, port: int | None = None) -> NodeProcess:
        port = port or free_port()
        workdir = tmp_path / f"node-{len(started)}"
        workdir.mkdir()
        env = node_env(
            port,
            workdir,
            {"PYTHONPATH": str(REPO), "CXR_NODE_API_PORT": str(free_port()), **settings},
        )
        log_path = workdir / "serve.log"
        proc = spawn_node(env, log_path, cwd=workdir)
        node = NodeProcess(proc, port, env, workdir, log_path)
        started.append(node)
        wait_for(lambda: port_open(port) or proc.poll() is not None, timeout=120)
        if proc.poll() is not None:
            pytest.fail(f"cxr-node serve exited early:\n{node.log_tail()}")
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
