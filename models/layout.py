"""The LLM-CXR token layout (must match the published checkpoints exactly).

GPT-NeoX-20B BPE (50,277 entries, ``<|endoftext|>`` = 0, ``<|padding|>`` = 1), dolly-v2's
special tokens ``### End`` = 50277, ``### Instruction:`` = 50278, ``### Response:`` = 50279,
and LLM-CXR's ``"### Response:\\n"`` = 50280, so ``len(tokenizer) == 50281``. Image code ``c``
is token id ``50281 + c``; the embedding matrices (input and output, untied) have 51,305 rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

BASE_TEXT_VOCAB = 50277
"""Entries of the GPT-NeoX-20B tokenizer (BPE vocabulary plus its added tokens)."""
EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0
PAD_TOKEN = "<|padding|>"
PADDING_ID = 1
END_MARKER = "### End"
INSTRUCTION_MARKER = "### Instruction:"
RESPONSE_KEY = "### Response:"
RESPONSE_MARKER = "### Response:\n"
INPUT_KEY = "Input:"
DOLLY_SPECIALS: tuple[str, ...] = (END_MARKER, INSTRUCTION_MARKER, RESPONSE_KEY)
LLMCXR_SPECIALS: tuple[str, ...] = (RESPONSE_MARKER,)
SPECIAL_IDS: dict[str, int] = {
    END_MARKER: 50277,
    INSTRUCTION_MARKER: 50278,
    RESPONSE_KEY: 50279,
    RESPONSE_MARKER: 50280,
}
END_ID = SPECIAL_IDS[END_MARKER]
RESPONSE_MARKER_ID = SPECIAL_IDS[RESPONSE_MARKER]

TEXT_VOCAB = 50281
N_IMAGE_CODES = 1024
IMAGE_TOKEN_OFFSET = 50281
VOCAB = TEXT_VOCAB + N_IMAGE_CODES  # 51305
CODES_PER_IMAGE = 256
IMAGE_GRID = 16
IMAGE_SIZE = 256
IMAGE_PLACEHOLDER = "<image>"


class TokenLayoutError(ValueError):
    """A tokenizer, model or token sequence does not follow the LLM-CXR token layout."""


@dataclass(frozen=True, kw_only=True)
class TokenLayout:
    """The token layout recorded in a bundle manifest and checked at load time."""

    text_vocab: int = TEXT_VOCAB
    image_token_offset: int = IMAGE_TOKEN_OFFSET
    n_image_codes: int = N_IMAGE_CODES
    codes_per_image: int = CODES_PER_IMAGE
    vocab_size: int = VOCAB

    def __post_init__(self) -> None:
        if self.image_token_offset != self.text_vocab:
            raise TokenLayoutError(
                f"image_token_offset {self.image_token_offset} != text_vocab {self.text_vocab}"
            )
        if self.vocab_size != self.text_vocab + self.n_image_codes:
            raise TokenLayoutError(
                f"vocab_size {self.vocab_size} != text_vocab + n_image_codes "
                f"({self.text_vocab} + {self.n_image_codes})"
            )
        if self.codes_per_image <= 0 or self.n_image_codes <= 0:
            raise TokenLayoutError("codes_per_image and n_image_codes must be positive")

    def to_dict(self) -> dict[str, int]:
        """Plain dict for the manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenLayout:
        """Build from a manifest's ``token_layout`` object (every field required)."""
        missing = [k for k in cls.__dataclass_fields__ if k not in data]
        if missing:
            raise TokenLayoutError(f"token_layout is missing field(s): {', '.join(missing)}")
        try:
            values = {k: int(data[k]) for k in cls.__dataclass_fields__}
        except (TypeError, ValueError) as exc:
            raise TokenLayoutError(f"token_layout has a non-integer field: {exc}") from exc
        return cls(**values)

    def check_published(self) -> None:
        """Raise unless this is exactly the published LLM-CXR layout."""
        if self != LLMCXR_LAYOUT:
            raise TokenLayoutError(f"token layout {self.to_dict()} != LLM-CXR {LLMCXR_LAYOUT}")


LLMCXR_LAYOUT = TokenLayout()


def code_to_id(code: int) -> int:
    """Token id of VQ-GAN code ``code`` (0..1023)."""
    if not 0 <= code < N_IMAGE_CODES:
        raise TokenLayoutError(f"image code {code} outside 0..{N_IMAGE_CODES - 1}")
    return IMAGE_TOKEN_OFFSET + code


def id_to_code(token_id: int) -> int:
    """VQ-GAN code of image token ``token_id`` (50281..51304)."""
    if not is_image_id(token_id):
        raise TokenLayoutError(
            f"token id {token_id} is not an image token ({IMAGE_TOKEN_OFFSET}..{VOCAB - 1})"
        )
    return token_id - IMAGE_TOKEN_OFFSET


def is_image_id(token_id: int) -> bool:
    """Whether ``token_id`` is one of the 1,024 image tokens."""
    return IMAGE_TOKEN_OFFSET <= token_id < VOCAB


def codes_to_ids(codes: Sequence[int]) -> list[int]:
    """Token ids of exactly ``CODES_PER_IMAGE`` image codes (else :class:`TokenLayoutError`)."""
    if len(codes) != CODES_PER_IMAGE:
        raise TokenLayoutError(f"an image is {CODES_PER_IMAGE} codes, got {len(codes)}")
    return [code_to_id(int(c)) for c in codes]


def ids_to_codes(ids: Sequence[int]) -> list[int]:
    """Codes of exactly ``CODES_PER_IMAGE`` image token ids; anything else is an error."""
    if len(ids) != CODES_PER_IMAGE:
        raise TokenLayoutError(f"an image is {CODES_PER_IMAGE} image tokens, got {len(ids)}")
    return [id_to_code(int(i)) for i in ids]
