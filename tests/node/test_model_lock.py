"""The model's lock: interactive requests ahead of batch drafting, batches never starved,
first come first served within a kind, re-entrant, timeouts. Real threads; the order of
arrival is fixed with events, never with sleeps."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from node.runtime.model_lock import FairModelLock
from tests.helpers import wait_for


def _waiter(
    lock: FairModelLock, name: str, *, interactive: bool, order: list[str]
) -> threading.Thread:
    def run() -> None:
        assert lock.acquire(interactive=interactive, timeout=30)
        order.append(name)
        lock.release()

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


def _queued(lock: FairModelLock, n: int) -> Callable[[], bool]:
    return lambda: sum(lock.waiting()) == n


def _queue_up(
    lock: FairModelLock, specs: list[tuple[str, bool]], order: list[str]
) -> list[threading.Thread]:
    """Start waiters one after the other, each queued before the next starts."""
    threads = []
    for n, (name, interactive) in enumerate(specs, start=1):
        threads.append(_waiter(lock, name, interactive=interactive, order=order))
        wait_for(_queued(lock, n), timeout=10)
    return threads


def test_interactive_goes_first_but_batches_are_not_starved() -> None:
    lock = FairModelLock(interactive_burst=2)
    order: list[str] = []
    assert lock.acquire(interactive=False)  # a batch is running
    threads = _queue_up(
        lock,
        [("b1", False), ("i1", True), ("i2", True), ("i3", True), ("b2", False), ("i4", True)],
        order,
    )
    lock.release()
    for t in threads:
        t.join(timeout=30)
    # two interactive turns, then the oldest batch, then the rest by the same rule
    assert order == ["i1", "i2", "b1", "i3", "i4", "b2"]


def test_only_one_kind_waiting_is_served_in_arrival_order() -> None:
    lock = FairModelLock(interactive_burst=1)
    order: list[str] = []
    assert lock.acquire(interactive=True)
    threads = _queue_up(lock, [("i1", True), ("i2", True), ("i3", True)], order)
    lock.release()
    for t in threads:
        t.join(timeout=30)
    assert order == ["i1", "i2", "i3"]  # no batch waits: the burst limit does not hold them


def test_reentrant_timeout_and_misuse() -> None:
    lock = FairModelLock()
    assert lock.acquire(interactive=False)
    assert lock.acquire(interactive=True)  # the holder again
    lock.release()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(lock.acquire(interactive=True, timeout=0.2)))
    t.start()
    t.join(timeout=10)
    assert got == [False] and lock.waiting() == (0, 0)  # gave up, left the queue
    lock.release()
    assert lock.acquire(interactive=True, timeout=1)
    lock.release()
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()
    with pytest.raises(ValueError):
        FairModelLock(interactive_burst=0)
