"""LLM-CXR tokenizer handling: build, load, check the layout, inject and extract images.

The runtime tokenizer is a :class:`tokenizers.Tokenizer` read from a local ``tokenizer.json``
(never the hub). :func:`build_llmcxr_tokenizer` reproduces the published layout from the
GPT-NeoX-20B tokenizer, which ships with this package (``models/assets``, Apache-2.0,
EleutherAI). :func:`check_tokenizer_layout` refuses any tokenizer whose first 50,277 entries
are not GPT-NeoX-20B's: the LLM-CXR weights are trained on those ids, so another vocabulary
(or one padded with placeholder entries) would put meaningless word pieces into reports.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer

from models.layout import (
    BASE_TEXT_VOCAB,
    CODES_PER_IMAGE,
    DOLLY_SPECIALS,
    END_ID,
    EOS_ID,
    EOS_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_OFFSET,
    LLMCXR_SPECIALS,
    N_IMAGE_CODES,
    PAD_TOKEN,
    PADDING_ID,
    RESPONSE_MARKER_ID,
    SPECIAL_IDS,
    TEXT_VOCAB,
    VOCAB,
    TokenLayoutError,
    codes_to_ids,
    id_to_code,
    is_image_id,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENIZER_FILE = "tokenizer.json"
NEOX_TOKENIZER_RESOURCE = "gpt-neox-20b-tokenizer.json"
"""The GPT-NeoX-20B ``tokenizer.json`` in the package ``models.assets``."""
NEOX_VOCAB_SHA256 = "fa289ee6214f3e457de5825266765b46dbcdd60240a10f8e2c17e15e7a89be56"
"""SHA-256 of GPT-NeoX-20B's entries, one ``"<id>\\t<token>\\n"`` line per id 0..50276
(:func:`base_vocab_fingerprint`)."""
_LAYOUT_NEEDS = (
    f"the LLM-CXR layout needs {TEXT_VOCAB} text entries (GPT-NeoX-20B's {BASE_TEXT_VOCAB}, "
    f"dolly's 3 specials and '### Response:\\n') followed by {N_IMAGE_CODES} image ids "
    f"({IMAGE_TOKEN_OFFSET}..{VOCAB - 1})"
)


def neox_tokenizer_json() -> str:
    """The text of the GPT-NeoX-20B ``tokenizer.json`` that ships with this package."""
    return resources.files("models.assets").joinpath(NEOX_TOKENIZER_RESOURCE).read_text("utf-8")


def base_vocab_fingerprint(tok: Tokenizer) -> str:
    """SHA-256 of ``tok``'s entries with ids below 50,277, in id order (see
    :data:`NEOX_VOCAB_SHA256`)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    digest = hashlib.sha256()
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if i < BASE_TEXT_VOCAB:
            digest.update(f"{i}\t{token}\n".encode())
    return digest.hexdigest()


def check_tokenizer_layout(tok: Tokenizer, source: str | Path | None = None) -> None:
    """Raise :class:`TokenLayoutError` unless ``tok`` has the LLM-CXR layout.

    Checks ``len == 50281``, that ids 0..50276 are GPT-NeoX-20B's entries
    (:data:`NEOX_VOCAB_SHA256`), ``<|endoftext|> == 0``, ``<|padding|> == 1`` and the ids of
    ``### End``, ``### Instruction:``, ``### Response:`` and ``"### Response:\\n"``.

    Parameters
    ----------
    tok
        The tokenizer to check.
    source
        Where it was read from, named in the error (e.g. a bundle's ``llm/tokenizer.json``).
    """
    where = f"{source}: " if source is not None else ""
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != TEXT_VOCAB:
        raise TokenLayoutError(f"{where}the tokenizer has {size} entries; {_LAYOUT_NEEDS}")
    if base_vocab_fingerprint(tok) != NEOX_VOCAB_SHA256:
        vocab = tok.get_vocab(with_added_tokens=True)
        odd = next((t for t in vocab if t.startswith("<|unused")), None)
        hint = f", e.g. placeholder entry {odd!r}" if odd else ""
        raise TokenLayoutError(
            f"{where}ids 0..{BASE_TEXT_VOCAB - 1} are not GPT-NeoX-20B's vocabulary{hint}; "
            f"LLM-CXR's weights are trained on those ids, and {_LAYOUT_NEEDS}"
        )
    expected = {EOS_TOKEN: EOS_ID, PAD_TOKEN: PADDING_ID, **SPECIAL_IDS}
    for token, want in expected.items():
        got = tok.token_to_id(token)
        if got != want:
            raise TokenLayoutError(f"{where}the tokenizer maps {token!r} to {got}, expected {want}")


def build_llmcxr_tokenizer(base_tokenizer_json: Path | None = None) -> Tokenizer:
    """Add dolly's and LLM-CXR's special tokens to the GPT-NeoX-20B tokenizer.

    Parameters
    ----------
    base_tokenizer_json
        A GPT-NeoX-20B ``tokenizer.json`` (50,277 entries); default: the copy that ships
        with this package.

    Returns
    -------
    tokenizers.Tokenizer
        A tokenizer of length 50,281 with the published special-token ids.
    """
    if base_tokenizer_json is None:
        source: str | Path = f"models/assets/{NEOX_TOKENIZER_RESOURCE}"
        tok = Tokenizer.from_str(neox_tokenizer_json())
    else:
        source = base_tokenizer_json
        tok = Tokenizer.from_file(str(base_tokenizer_json))
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != BASE_TEXT_VOCAB:
        raise TokenLayoutError(f"{source} has {size} entries, GPT-NeoX-20B has {BASE_TEXT_VOCAB}")
    tok.add_special_tokens(list(DOLLY_SPECIALS))
    tok.add_special_tokens(list(LLMCXR_SPECIALS))
    check_tokenizer_layout(tok, source)
    return tok


def save_tokenizer_dir(tok: Tokenizer, out_dir: Path) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The config files follow the Hugging Face layout (loadable by ``AutoTokenizer`` offline).
    """
    check_tokenizer_layout(tok)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / TOKENIZER_FILE))
    specials = [*DOLLY_SPECIALS, *LLMCXR_SPECIALS]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": specials,
        "model_max_length": 2048,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }
    special_map = {
        "eos_token": EOS_TOKEN,
        "bos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": specials,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return [
        out_dir / n for n in (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
    ]


class LLMCXRTokenizer:
    """The LLM-CXR text tokenizer with image injection and response extraction.

    Parameters
    ----------
    tokenizer
        A ``tokenizers.Tokenizer`` with the LLM-CXR layout (checked here).
    source
        Where it was read from, named in a layout error.
    """

    def __init__(self, tokenizer: Tokenizer, source: str | Path | None = None) -> None:
        check_tokenizer_layout(tokenizer, source)
        self._tok = tokenizer

    @classmethod
    def from_dir(cls, path: Path) -> LLMCXRTokenizer:
        """Load ``tokenizer.json`` from a Hugging Face folder (or the file itself).

        A folder without ``tokenizer.json`` but with slow-tokenizer files
        (``vocab.json``/``merges.txt`` and ``tokenizer_config.json``) is converted with
        ``transformers.AutoTokenizer`` offline.
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if file.is_file():
            try:
                raw = Tokenizer.from_file(str(file))
            except Exception as exc:  # the tokenizers library raises a bare Exception
                raise TokenLayoutError(f"{file}: not a readable tokenizer.json ({exc})") from exc
            return cls(raw, file)
        if path.is_dir() and (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            try:
                hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise TokenLayoutError(f"cannot load the tokenizer in {path}: {exc}") from exc
            backend = getattr(hf, "backend_tokenizer", None)
            if isinstance(backend, Tokenizer):
                return cls(backend, path)
        raise TokenLayoutError(f"no {TOKENIZER_FILE} at {path}; {_LAYOUT_NEEDS}")

    @property
    def raw(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int:
        """``<|endoftext|>`` (also the pad id)."""
        return EOS_ID

    @property
    def pad_id(self) -> int:
        """pad = eos = ``<|endoftext|>``, as in dolly/LLM-CXR."""
        return EOS_ID

    @property
    def end_id(self) -> int:
        """``### End``: the stop token of generation."""
        return END_ID

    @property
    def response_id(self) -> int:
        """``"### Response:\\n"``: the token that ends every prompt."""
        return RESPONSE_MARKER_ID

    def token_id(self, token: str) -> int:
        """Id of a single token string (e.g. ``"<"``); error if absent."""
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenLayoutError(f"token {token!r} is not in the vocabulary")
        return int(tid)

    @property
    def image_open_id(self) -> int:
        """Id of ``<`` (the token before the 256 image ids)."""
        return self.token_id("<")

    @property
    def image_close_id(self) -> int:
        """Id of ``>`` (the token after the 256 image ids)."""
        return self.token_id(">")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special markers recognised, nothing prepended)."""
        return list(self._tok.encode(text).ids)

    def encode_with_image(self, text: str, codes: Sequence[int] | None) -> list[int]:
        """Tokenize ``text`` and replace the ``image`` token(s) of ``<image>`` by 256 image ids.

        The text is tokenized as a whole (as in training), so ``<image>`` becomes
        ``<``, ``image``, ``>``; the token(s) covering ``image`` are replaced, giving
        ``<`` + 256 ids + ``>``. One image per prompt.

        Parameters
        ----------
        text
            The prompt text; must contain ``<image>`` exactly once when ``codes`` is given,
            and not at all when ``codes`` is ``None``.
        codes
            The 256 VQ-GAN codes (0..1023) of the image, or ``None``.
        """
        count = text.count(IMAGE_PLACEHOLDER)
        if codes is None:
            if count:
                raise TokenLayoutError(f"prompt has {IMAGE_PLACEHOLDER} but no image codes")
            return self.encode(text)
        if count != 1:
            raise TokenLayoutError(f"prompt must contain {IMAGE_PLACEHOLDER} once, found {count}")
        image_ids = codes_to_ids(codes)
        enc = self._tok.encode(text)
        start = text.index(IMAGE_PLACEHOLDER)
        inner = (start + 1, start + len(IMAGE_PLACEHOLDER) - 1)
        ids, offsets = enc.ids, enc.offsets
        open_idx = [i for i, (a, b) in enumerate(offsets) if (a, b) == (start, start + 1)]
        close_idx = [i for i, (a, b) in enumerate(offsets) if (a, b) == (inner[1], inner[1] + 1)]
        if len(open_idx) != 1 or len(close_idx) != 1:
            raise TokenLayoutError(
                f"{IMAGE_PLACEHOLDER} did not tokenize to '<' ... '>' as separate tokens"
            )
        lo, hi = open_idx[0], close_idx[0]
        middle = offsets[lo + 1 : hi]
        if not middle or middle[0][0] != inner[0] or middle[-1][1] != inner[1]:
            raise TokenLayoutError(f"{IMAGE_PLACEHOLDER}: the 'image' token does not align")
        return [*ids[: lo + 1], *image_ids, *ids[hi:]]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; image ids are dropped (they are not strings)."""
        text_ids = [int(i) for i in ids if not is_image_id(int(i))]
        return str(self._tok.decode(text_ids, skip_special_tokens=skip_special_tokens))

    def render(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with each run of image ids shown as ``image`` (so ``<image>``)."""
        out: list[int] = []
        parts: list[str] = []
        in_image = False
        for raw in ids:
            i = int(raw)
            if is_image_id(i):
                if not in_image:
                    parts.append(self._tok.decode(out, skip_special_tokens=False))
                    parts.append("image")
                    out = []
                in_image = True
            else:
                in_image = False
                out.append(i)
        parts.append(self._tok.decode(out, skip_special_tokens=False))
        return "".join(parts)


def response_ids(ids: Sequence[int]) -> list[int]:
    """Ids after the last ``"### Response:\\n"`` (if any) and before ``### End`` / eos."""
    seq = [int(i) for i in ids]
    if RESPONSE_MARKER_ID in seq:
        seq = seq[len(seq) - seq[::-1].index(RESPONSE_MARKER_ID) :]
    for j, i in enumerate(seq):
        if i in (END_ID, EOS_ID):
            return seq[:j]
    return seq


def extract_image_codes(
    ids: Sequence[int], *, open_id: int | None = None, close_id: int | None = None
) -> list[int]:
    """The 256 codes of a generated image; anything else is a :class:`TokenLayoutError`.

    ``ids`` is a response (or a full sequence with the response marker). Optional ``<`` and
    ``>`` (``open_id`` / ``close_id``) may surround the image; any other token, a second
    image, fewer or more than 256 image ids, or an id out of range is rejected.
    """
    seq = response_ids(ids)
    if open_id is not None and seq and seq[0] == open_id:
        seq = seq[1:]
    if close_id is not None and seq and seq[-1] == close_id:
        seq = seq[:-1]
    bad = [i for i in seq if not is_image_id(i)]
    if bad:
        raise TokenLayoutError(
            f"generated image has {len(bad)} non-image token(s) (first: {bad[0]})"
        )
    if len(seq) != CODES_PER_IMAGE:
        raise TokenLayoutError(f"generated image has {len(seq)} codes, need {CODES_PER_IMAGE}")
    return [id_to_code(i) for i in seq]
