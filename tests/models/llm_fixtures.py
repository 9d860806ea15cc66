"""Fixtures for the LLM-side model tests (bundles, tiny GPT-NeoX folders, taming ckpts).

Expensive objects are built once per process (cached helpers) because fixtures imported
into several modules would otherwise be rebuilt per module.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from models.bundle import ModelBundle
from models.layout import VOCAB
from models.text import build_llmcxr_tokenizer, save_tokenizer_dir


def _tmpdir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.cache
def llmcxr_tokenizer() -> Any:
    """The LLM-CXR tokenizer (GPT-NeoX-20B as packaged, with the published specials)."""
    return build_llmcxr_tokenizer()


def with_placeholders(tokenizer_json: str, ids: range) -> str:
    """A ``tokenizer.json`` whose entries ``ids`` are renamed ``<|unused_ID|>`` (ids kept), and
    with no merges: the right length, but not the vocabulary it claims to be.

    Parameters
    ----------
    tokenizer_json
        The tokenizer as ``tokenizer.json`` text.
    ids
        The ids to replace.

    Returns
    -------
    str
        The changed ``tokenizer.json`` text.
    """
    data = json.loads(tokenizer_json)
    vocab = data["model"]["vocab"]
    for token, i in list(vocab.items()):
        if i in ids:
            del vocab[token]
            vocab[f"<|unused_{i}|>"] = i
    data["model"]["merges"] = []
    return json.dumps(data)


@functools.cache
def demo_bundle_dir() -> Path:
    """A demo bundle (created once per test process)."""
    from models.demo import create_demo_bundle

    out = _tmpdir("llmcxr-demo-") / "bundle"
    create_demo_bundle(out, seed=0, hidden=32, layers=1, heads=2)
    return out


def write_tiny_llm(
    out: Path,
    *,
    vocab: int = VOCAB,
    tie: bool = False,
    seed: int = 0,
    tokenizer: Any = None,
    hidden: int = 32,
) -> Path:
    """A tiny GPT-NeoX in the published layout, saved in Hugging Face format."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=4 * hidden,
        max_position_embeddings=2048,
        rotary_pct=0.25,  # type: ignore[call-arg]
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(cfg).eval()
    model.save_pretrained(str(out))
    save_tokenizer_dir(tokenizer or llmcxr_tokenizer(), out)
    return out


def write_taming_ckpt(dirpath: Path, cfg: Any, *, seed: int = 7) -> tuple[Path, Path]:
    """A Lightning-style taming checkpoint with a ``loss.*`` section, plus its YAML."""
    from models.vqgan import VQModel

    torch.manual_seed(seed)
    vq = VQModel(cfg).eval()
    sd = dict(vq.state_dict())
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3)
    ckpt = dirpath / "vqgan.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 100}, ckpt)
    doc = cfg.to_yaml_dict()
    doc["model"]["params"]["lossconfig"] = {
        "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
        "params": {"disc_start": 10000, "codebook_weight": 1.0},
    }
    yml = dirpath / "vqgan.yaml"
    yml.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return ckpt, yml


@pytest.fixture
def demo_bundle() -> ModelBundle:
    """The shared demo bundle (read-only: copy it before modifying)."""
    return ModelBundle.open(demo_bundle_dir())
