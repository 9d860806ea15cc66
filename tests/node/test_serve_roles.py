"""``cxr-node serve --no-worker``: a receiver or API process beside separate workers holds
the model host (for the API's tasks) but drafts nothing itself."""

from __future__ import annotations

from pathlib import Path

from node.runtime.components import default_components
from node.settings import load_settings
from tests.models.llm_fixtures import demo_bundle_dir


def _names(items: list[object]) -> list[str]:
    return [getattr(i, "__name__", type(i).__name__) for i in items]


def test_no_worker_keeps_the_model_host_without_the_worker(tmp_path: Path) -> None:
    settings = load_settings(
        model_dir=demo_bundle_dir(),
        spool_dir=tmp_path / "spool",
        database_url=f"sqlite:///{tmp_path}/n.db",
    )
    both = _names(default_components(settings))
    assert "make_model_host" in both and "make_worker" in both
    receiver = _names(default_components(settings, worker=False))
    assert "make_model_host" in receiver and "make_worker" not in receiver
    assert "make_delivery" in receiver


def test_the_serve_command_takes_no_worker() -> None:
    from typer.testing import CliRunner

    from node.cli import app

    r = CliRunner().invoke(app, ["serve", "--help"])
    assert r.exit_code == 0 and "--no-worker" in r.output
