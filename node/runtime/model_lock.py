"""Who runs on the model next: interactive requests ahead of batch drafting, without
starving it.

The model runs one piece of work at a time (a worker's batch, or one interactive request:
a question, a conversation turn, a report for an upload). When the model is released and
both kinds wait, an interactive request gets it, unless the last ``interactive_burst``
grants in a row went to interactive requests: then the waiting batch goes first. So a
clinician waits at most for the batch in progress, and the worker waits at most for
``interactive_burst`` interactive requests between two of its batches. Within a kind,
waiters are served first come, first served. The holder may take the lock again
(re-entrant), as ``threading.RLock`` allows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["FairModelLock"]


@dataclass
class _Waiter:
    interactive: bool
    granted: bool = False


class FairModelLock:
    """A re-entrant lock with two kinds of waiter (see the module text).

    Parameters
    ----------
    interactive_burst
        How many interactive grants in a row before a waiting batch goes first (>= 1).
    """

    def __init__(self, interactive_burst: int = 3) -> None:
        if interactive_burst < 1:
            raise ValueError(f"interactive_burst must be >= 1, got {interactive_burst}")
        self.interactive_burst = interactive_burst
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._queue: deque[_Waiter] = deque()
        self._burst = 0  # interactive grants in a row
        #: the kinds granted, in order (``True``: interactive); for tests and diagnostics
        self.grants: deque[bool] = deque(maxlen=1000)

    def acquire(self, *, interactive: bool, timeout: float | None = None) -> bool:
        """Take the lock; ``False`` when ``timeout`` seconds passed first."""
        me = threading.get_ident()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            waiter = _Waiter(interactive)
            self._queue.append(waiter)
            if self._owner is None:
                self._grant_next()
            while not waiter.granted:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._queue.remove(waiter)
                    return False
                self._cond.wait(remaining)
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        """Give the lock back (the next waiter, by the policy, gets it)."""
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a model lock this thread does not hold")
            self._depth -= 1
            if self._depth:
                return
            self._owner = None
            self._grant_next()

    def waiting(self) -> tuple[int, int]:
        """``(interactive, batch)`` waiters now."""
        with self._cond:
            inter = sum(1 for w in self._queue if w.interactive)
            return inter, len(self._queue) - inter

    def _grant_next(self) -> None:
        """Pick the next waiter by the policy; called with the condition held, lock free."""
        if not self._queue:
            return
        interactive = [w for w in self._queue if w.interactive]
        batch = [w for w in self._queue if not w.interactive]
        if interactive and (not batch or self._burst < self.interactive_burst):
            chosen = interactive[0]
            self._burst += 1
        else:
            chosen = batch[0]
            self._burst = 0
        self._queue.remove(chosen)
        chosen.granted = True
        self._owner = -1  # reserved until the chosen thread wakes and takes it
        self.grants.append(chosen.interactive)
        self._cond.notify_all()
