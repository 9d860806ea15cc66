"""A base instruction model (dolly-v2, GPT-NeoX) in the LLM-CXR layout: the starting point
of training from scratch as the paper did (``cxr-node models import-base``).

LLM-CXR started from dolly-v2-3b: dolly's tokenizer (GPT-NeoX-20B plus ``### End``,
``### Instruction:``, ``### Response:``) with one more special token, ``"### Response:\\n"``
(so ``len(tokenizer) == 50281``), and the input and output embeddings resized to 51,305
rows, the last 1,024 for the VQ-GAN's image codes (``../models/layout.py``). The new rows
start as the mean of the existing ones (transformers' ``mean_resizing``), so the untrained
image ids are not far out of distribution; training (``cxr-node train``) teaches them.
"""

from __future__ import annotations

from pathlib import Path

from models.bundle import BundleError
from models.layout import BASE_TEXT_VOCAB, DOLLY_SPECIALS, TEXT_VOCAB, VOCAB
from models.text import base_vocab_fingerprint, build_llmcxr_tokenizer, save_tokenizer_dir

__all__ = ["prepare_base_llm"]

#: dolly's three special tokens after GPT-NeoX-20B's 50,277 entries
_DOLLY_SIZE = BASE_TEXT_VOCAB + 3


def _check_base(base_dir: Path) -> dict[str, object]:
    from tokenizers import Tokenizer

    from models.importer import read_neox_config
    from models.text import NEOX_VOCAB_SHA256

    cfg_path = base_dir / "config.json"
    cfg = read_neox_config(base_dir)
    tok_path = base_dir / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as exc:
        raise BundleError(f"{tok_path}: not a readable tokenizer ({exc})") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    if size not in (BASE_TEXT_VOCAB, _DOLLY_SIZE, TEXT_VOCAB):
        raise BundleError(
            f"{tok_path}: {size} entries; a GPT-NeoX-20B ({BASE_TEXT_VOCAB}) or dolly-v2 "
            f"({_DOLLY_SIZE}) tokenizer is needed"
        )
    if base_vocab_fingerprint(tok) != NEOX_VOCAB_SHA256:
        raise BundleError(f"{tok_path}: ids 0..{BASE_TEXT_VOCAB - 1} are not GPT-NeoX-20B's")
    for offset, token in enumerate(DOLLY_SPECIALS[: size - BASE_TEXT_VOCAB]):
        if tok.token_to_id(token) != BASE_TEXT_VOCAB + offset:
            raise BundleError(f"{tok_path}: {token!r} is not id {BASE_TEXT_VOCAB + offset}")
    if int(cfg.get("vocab_size", 0)) < size:
        raise BundleError(f"{cfg_path}: vocab_size {cfg.get('vocab_size')} < tokenizer {size}")
    return cfg


def prepare_base_llm(base_dir: Path | str, out_dir: Path | str) -> Path:
    """Write ``base_dir``'s model in the LLM-CXR layout to ``out_dir`` (created).

    Parameters
    ----------
    base_dir
        A Hugging Face GPT-NeoX folder with untied embeddings and a GPT-NeoX-20B or dolly-v2
        ``tokenizer.json`` (e.g. ``databricks/dolly-v2-3b``).
    out_dir
        Where the folder in the LLM-CXR layout goes: the tokenizer of 50,281 entries and
        the weights with 51,305 embedding rows; ``models.importer.import_llmcxr`` takes it.

    Raises
    ------
    models.bundle.BundleError
        The base is not GPT-NeoX, its embeddings are tied, or its tokenizer is not
        GPT-NeoX-20B's (naming the file).
    """
    import torch
    from transformers import GPTNeoXForCausalLM

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _check_base(base_dir)
    model = GPTNeoXForCausalLM.from_pretrained(str(base_dir))
    weight: torch.Tensor = model.get_input_embeddings().weight  # type: ignore[assignment]
    rows = int(weight.shape[0])
    if rows > VOCAB:
        raise BundleError(f"{base_dir}: {rows} embedding rows, more than LLM-CXR's {VOCAB}")
    model.resize_token_embeddings(VOCAB, mean_resizing=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    save_tokenizer_dir(build_llmcxr_tokenizer(), out_dir)
    return out_dir
