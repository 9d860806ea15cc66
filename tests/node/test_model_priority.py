"""The model host's priority (#27): ``use(interactive=True)`` goes ahead of waiting worker
batches, and after ``model_interactive_burst`` interactive grants in a row the waiting batch
goes next. The real host on the demo bundle; real threads, their order of arrival fixed
by waiting until each is queued (never by sleeping)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.runtime.modelhost import ModelHost, ModelNotReady
from node.settings import load_settings
from node.settings.values import ConfigError
from tests.helpers import wait_for
from tests.models.llm_fixtures import demo_bundle_dir


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelHost]:
    tmp = tmp_path_factory.mktemp("priority")
    settings = load_settings(
        model_dir=demo_bundle_dir(),
        backend_dtype="float32",
        spool_dir=tmp / "spool",
        database_url=f"sqlite:///{tmp}/p.db",
        model_interactive_burst=2,
    )
    h = ModelHost(settings, warmup=False)
    h.start()
    assert h.wait_ready(300), h.error
    yield h
    h.stop()


def _user(host: ModelHost, name: str, interactive: bool, order: list[str]) -> threading.Thread:
    def run() -> None:
        with host.use(timeout=60, interactive=interactive) as runtime:
            assert runtime is host.runtime
            order.append(name)

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


def _queue_up(
    host: ModelHost, specs: list[tuple[str, bool]], order: list[str]
) -> list[threading.Thread]:
    threads = []
    for n, (name, interactive) in enumerate(specs, start=1):
        threads.append(_user(host, name, interactive, order))
        wait_for(lambda n=n: sum(host.model_lock.waiting()) == n, timeout=10)  # type: ignore[misc]
    return threads


def _release_and_join(
    host: ModelHost, held: threading.Event, threads: list[threading.Thread]
) -> None:
    held.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    assert host.model_lock.waiting() == (0, 0)


def _hold(host: ModelHost, *, interactive: bool) -> tuple[threading.Thread, threading.Event]:
    """A holder (a worker batch or a turn) that keeps the model until told to let go."""
    got, let_go = threading.Event(), threading.Event()

    def run() -> None:
        with host.use(interactive=interactive):
            got.set()
            let_go.wait(30)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert got.wait(30)
    return t, let_go


def _fresh(host: ModelHost) -> None:
    """A batch alone on the model: the run of interactive grants starts again at 0."""
    with host.use(interactive=False):
        pass
    assert host.model_lock.grants[-1] is False


def test_interactive_first_then_the_batch_after_the_burst(host: ModelHost) -> None:
    _fresh(host)
    order: list[str] = []
    holder, let_go = _hold(host, interactive=False)  # the worker's batch is running
    threads = _queue_up(
        host,
        [("batch-1", False), ("turn-1", True), ("turn-2", True), ("turn-3", True)],
        order,
    )
    _release_and_join(host, let_go, [holder, *threads])
    # two interactive grants (the setting), then the waiting batch, then the last turn
    assert order == ["turn-1", "turn-2", "batch-1", "turn-3"]


def test_the_worker_waits_for_one_turn_when_people_take_turns(host: ModelHost) -> None:
    """A turn runs; the worker's next batch and another turn wait: the turn goes first (the
    batch waits for one turn), and the batch goes right after that one."""
    _fresh(host)
    order: list[str] = []
    holder, let_go = _hold(host, interactive=True)  # a conversation turn is streaming
    threads = _queue_up(host, [("batch", False), ("turn", True)], order)
    _release_and_join(host, let_go, [holder, *threads])
    assert order == ["turn", "batch"]


def test_batches_alone_are_first_come_first_served_and_busy_times_out(host: ModelHost) -> None:
    order: list[str] = []
    holder, let_go = _hold(host, interactive=False)
    threads = _queue_up(host, [("b1", False), ("b2", False)], order)
    with pytest.raises(ModelNotReady, match="busy"), host.use(timeout=0.05, interactive=True):
        pass
    _release_and_join(host, let_go, [holder, *threads])
    assert order == ["b1", "b2"]


def test_burst_setting_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_interactive_burst"):
        load_settings(model_interactive_burst=0, spool_dir=tmp_path)
    assert load_settings(spool_dir=tmp_path).model_interactive_burst == 3
