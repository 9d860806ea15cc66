"""SIGTERM/SIGINT as events: the one place where the node's processes take signals."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

__all__ = ["install_stop_signals"]

log = logging.getLogger(__name__)


def install_stop_signals(
    stop_event: threading.Event,
    force_event: threading.Event | None = None,
    *,
    what: str = "shutting down",
) -> Callable[[], None]:
    """Route SIGTERM and SIGINT to ``stop_event``; return a function restoring the handlers.

    A second signal while ``stop_event`` is set sets ``force_event`` (when given): the
    caller stops waiting for work in flight. Python runs signal handlers in the main
    thread only: called from another thread this does nothing (and restores nothing).

    Parameters
    ----------
    stop_event
        Set by the first signal.
    force_event
        Set by a second signal, or ``None`` (a second signal is logged only).
    what
        What the first signal starts, for the log line.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop_event.is_set() and force_event is not None:
            force_event.set()
            log.warning("second %s: aborting work in flight", name)
        else:
            log.info("%s received: %s", name, what)
            stop_event.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
