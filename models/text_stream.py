"""Generated ids as streamed text: the visible deltas of an answer, for ``on_text``.

``on_text(delta)`` gets the newly decoded visible text as tokens are generated (the
generated ids decoded with the bundle's tokenizer, holding back an incomplete UTF-8 tail
and any end that may be the start of ``### End``, which is never sent), in order; the
deltas add up to the answer's text. Returning ``False`` stops the generation as soon as the
backend can, and the answer is the text sent so far. An exception raised by ``on_text``
cancels as well and is kept for the caller to raise once generation stops
(:func:`models.chat.chat`, :func:`models.chat.summarize`). The callbacks run in the
generating thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from models.layout import END_ID, END_MARKER, EOS_ID

if TYPE_CHECKING:
    from models.text import LLMCXRTokenizer

__all__ = ["TextStream"]


class TextStream:
    """Turns generated ids into visible text deltas for ``on_text`` (an ``on_token``).

    Decodes the ids so far, holds back an incomplete UTF-8 tail (U+FFFD at the end),
    trailing blanks and any end that may be the start of ``### End``; stops handing over at
    a stop id. An exception from ``on_text`` cancels and is kept in :attr:`error`.
    """

    def __init__(self, tokenizer: LLMCXRTokenizer, on_text: Callable[[str], bool]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.sent = ""
        self.ended = False
        self.error: BaseException | None = None

    def visible(self, *, final: bool) -> str:
        """The text that may be shown for the ids so far (all of it when ``final``)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cut = text.find(END_MARKER)
        if cut >= 0:
            return text[:cut].rstrip()
        if final:
            return text.rstrip()
        text = text.rstrip("\ufffd")
        for k in range(min(len(END_MARKER), len(text)), 0, -1):
            tail = text[-k:]
            if tail.strip() and END_MARKER.startswith(tail.lstrip()):
                return text[:-k].rstrip()
        return text.rstrip()

    def emit(self, text: str) -> bool:
        """Send what ``text`` adds to the text sent; ``False`` to cancel."""
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return True
        delta = text[len(self.sent) :]
        try:
            keep = bool(self.on_text(delta))
        except Exception as exc:  # raised again by chat/summarize once generation stops
            self.error = exc
            return False
        self.sent = text  # sent even when on_text cancels: it has seen the delta
        return keep

    def __call__(self, token_id: int) -> bool:
        if self.ended or token_id in (END_ID, EOS_ID):
            self.ended = True
            return True
        self.ids.append(token_id)
        return self.emit(self.visible(final=False))

    def finish(self, final_text: str) -> str:
        """Send what is left of the answer and return the whole text sent.

        ``final_text`` is the runtime's text of the answer; should it not continue what was
        sent (a ``### Response:`` typed out by the model, which the runtime's text starts
        after), the streamed text is completed instead, so the deltas still add up.
        """
        if not final_text.startswith(self.sent):
            final_text = self.visible(final=True)
        self.emit(final_text)
        return self.sent
