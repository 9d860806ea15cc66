"""Server-Sent Events for a streamed conversation turn (``text/event-stream``, WHATWG HTML
"Server-sent events"): ``delta`` ``{"text"}`` as the answer is generated, ``notice``
``{"dropped_turns", "message"}`` before it when the oldest turns were left out of the
model's window, then ``done`` (the stored turn's stop reason, ids and provenance) or
``error`` ``{"status", "detail"}``. The turn runs in a thread of its own; a client that goes
away sets the turn's cancel event, so the model stops at its next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from node.api.errors import reason_for, status_for
from node.services.chat import TurnOutcome
from node.services.chat_turns import TurnHandle

__all__ = ["Run", "sse", "stream_turn"]

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event: ``event: <name>`` and one ``data:`` line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


Run = Callable[[Callable[[str], object], Callable[[int], object]], TurnOutcome]
"""Runs one turn: called with the answer's ``on_text`` and the window ``on_notice``."""


def _error_event(exc: BaseException) -> dict[str, Any]:
    status = status_for(exc)
    if status is None:
        log.error("conversation turn failed: %s", type(exc).__name__, exc_info=exc)
        return {"status": 500, "detail": "internal error"}
    return {"status": status, "detail": reason_for(exc)}


def stream_turn(run: Run, handle: TurnHandle) -> StreamingResponse:
    """Run ``run`` in a thread and stream its deltas, notice and outcome as SSE; a client
    that goes away sets the handle's cancel event."""

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()

    def put(item: tuple[str, dict[str, Any]] | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody listens any more
            handle.cancel.set()

    def notice(n: int) -> None:
        message = f"the oldest {n} turn(s) were left out to fit the model's 2,048-token window"
        put(("notice", {"dropped_turns": n, "message": message}))

    def work() -> None:
        try:
            out = run(lambda d: put(("delta", {"text": d})), notice)
            t = out.turn
            done = {
                "stop_reason": t.stop_reason,
                "turn_id": t.id,
                "kind": t.kind,
                "dropped_turns": t.dropped_turns,
                "prompt_tokens": t.prompt_tokens,
                "new_tokens": t.new_tokens,
                "ai_generated": True,
                "demo": out.demo,
                "model_name": out.model_name,
                "model_version": out.model_version,
            }
            put(("done", done))
        except Exception as exc:
            put(("error", _error_event(exc)))
        finally:
            handle.release()
            put(None)

    # started here, not in the body: the reservation is released even if the body is
    # never sent (a client gone before the answer starts)
    thread = threading.Thread(target=work, name=f"conversation-{handle.conversation_id}")
    thread.daemon = True
    thread.start()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b": stream open\n\n"
            while True:
                item = await queue.get()
                if item is None:
                    break
                yield sse(*item)
        finally:
            if thread.is_alive():  # the client went away (or the server stops): stop it
                handle.cancel.set()

    return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)
