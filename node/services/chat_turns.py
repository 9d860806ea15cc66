"""The running turns of conversations (#27): one turn at a time per conversation, its
cancel event, and the callback that streams its answer.

:func:`reserve` takes a conversation for one turn (a second is refused, 409) and returns
its :class:`TurnHandle`; :func:`signal_cancel` sets the running turn's cancel event (the
Stop button, ``POST /api/conversations/{id}/cancel``, or a client that went away);
:func:`streamer` wraps the caller's ``on_text`` so that the model stops at its next token
once the event is set. The registry is per process: the API server that streams a turn is
the one that holds it, so a cancel goes to the same process (one API server per node, see
``docs/architecture.md``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from node.services.errors import Conflict

__all__ = [
    "TOKEN_DELAY_ENV",
    "OnText",
    "TurnHandle",
    "reserve",
    "reserved",
    "signal_cancel",
    "streamer",
]

log = logging.getLogger(__name__)

#: tests only: seconds to sleep before each streamed delta (so that a test sees the text grow)
TOKEN_DELAY_ENV = "CXR_NODE_TEST_TOKEN_DELAY"

OnText = Callable[[str], object]


class TurnHandle:
    """The running turn of one conversation: its cancel event (see :func:`reserve`)."""

    def __init__(self, conversation_id: int) -> None:
        self.conversation_id = conversation_id
        self.cancel = threading.Event()
        self._released = False

    def release(self) -> None:
        """End the reservation (idempotent)."""
        with _running_lock:
            if not self._released and _running.get(self.conversation_id) is self:
                del _running[self.conversation_id]
            self._released = True


_running: dict[int, TurnHandle] = {}
_running_lock = threading.Lock()


def reserve(conversation_id: int) -> TurnHandle:
    """Reserve the conversation for one turn (release the handle when the turn is over).

    Raises
    ------
    node.services.errors.Conflict
        When a turn of this conversation is running (409).
    """
    with _running_lock:
        if conversation_id in _running:
            raise Conflict(f"conversation {conversation_id} has a turn running: wait or cancel it")
        handle = TurnHandle(conversation_id)
        _running[conversation_id] = handle
        return handle


@contextmanager
def reserved(conversation_id: int, handle: TurnHandle | None) -> Iterator[TurnHandle]:
    """``handle``, or a reservation taken here and released on exit when it is ``None``."""
    own = handle is None
    h = reserve(conversation_id) if handle is None else handle
    try:
        yield h
    finally:
        if own:
            h.release()


def signal_cancel(conversation_id: int) -> bool:
    """Set the cancel event of the conversation's running turn; ``False`` when none runs.
    The caller checks that the conversation is the asker's."""
    with _running_lock:
        handle = _running.get(conversation_id)
    if handle is None:
        return False
    handle.cancel.set()
    log.info("conversation %d: running turn cancelled", conversation_id)
    return True


def _token_delay() -> float:
    text = os.environ.get(TOKEN_DELAY_ENV, "")
    if not text:
        return 0.0
    try:
        delay = float(text)
    except ValueError:
        raise ValueError(f"{TOKEN_DELAY_ENV}: {text!r} is not a number of seconds") from None
    log.warning("%s: %.3f s before each streamed delta (test hook)", TOKEN_DELAY_ENV, delay)
    return delay


def streamer(on_text: OnText | None, handle: TurnHandle) -> Callable[[str], bool]:
    """The model's ``on_text`` callback for a turn: passes each delta to ``on_text`` and
    returns ``False`` (stop) once ``handle.cancel`` is set."""
    delay = _token_delay()

    def stream(delta: str) -> bool:
        # every delta is passed on, also the one that meets a cancel: the model keeps it in
        # the stopped answer's text, so the stored turn is exactly what the client saw
        if delay > 0 and not handle.cancel.is_set():
            time.sleep(delay)
        if on_text is not None:
            on_text(delta)
        return not handle.cancel.is_set()

    return stream
