"""A loaded GGUF file's vocabulary, as llama.cpp's tokenizer sees it."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from models.backends.base import GenerationError
from models.layout import IMAGE_TOKEN_OFFSET, VOCAB, TokenLayoutError

__all__ = ["GgufVocab"]


class GgufVocab:
    """Tokenizing and detokenizing with a loaded model's vocabulary.

    Parameters
    ----------
    llama_cpp
        The initialised ``llama_cpp`` module.
    model
        A loaded ``llama_model`` handle (it must outlive this object's use).
    """

    def __init__(self, llama_cpp: Any, model: Any) -> None:
        self._llama = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(model)

    def single_token(self, text: str) -> int:
        """The id of ``text``, which must be one token.

        Raises
        ------
        TokenLayoutError
            ``text`` is not a single token.
        """
        buf = (self._llama.llama_token * 8)()
        data = text.encode("utf-8")
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, 8, False, False)
        if n != 1:
            raise TokenLayoutError(f"{text!r} is not a single token in the GGUF vocabulary")
        return int(buf[0])

    def entry(self, token_id: int) -> tuple[str, str]:
        """``(text, kind)`` of a vocabulary entry; ``kind`` is ``"control"``,
        ``"user_defined"``, ``"normal"`` or ``"other"``."""
        llama = self._llama
        raw = llama.llama_vocab_get_text(self._vocab, int(token_id))
        attr = int(llama.llama_vocab_get_attr(self._vocab, int(token_id)))
        kinds = (
            (llama.LLAMA_TOKEN_ATTR_CONTROL, "control"),
            (llama.LLAMA_TOKEN_ATTR_USER_DEFINED, "user_defined"),
            (llama.LLAMA_TOKEN_ATTR_NORMAL, "normal"),
        )
        kind = next((name for bit, name in kinds if attr & bit), "other")
        return (raw or b"").decode("utf-8", "replace"), kind

    def tokenize(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` (``parse_special``: control-token texts become their ids)."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._llama.llama_token * cap)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, cap, False, parse_special)
        if n < 0:
            raise GenerationError(f"llama.cpp tokenization needs {-n} tokens")
        return [int(buf[i]) for i in range(n)]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (control tokens and image ids dropped)."""
        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for i in ids:
            if IMAGE_TOKEN_OFFSET <= int(i) < VOCAB:
                continue
            n = self._llama.llama_token_to_piece(self._vocab, int(i), buf, 256, 0, False)
            out += buf.raw[: max(n, 0)]
        return out.decode("utf-8", "replace")
