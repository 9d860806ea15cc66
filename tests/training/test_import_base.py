"""``cxr-node models import-base``: a dolly-v2-like GPT-NeoX (dolly's tokenizer, 50,280
embedding rows) becomes a bundle in the LLM-CXR layout that ``cxr-node train`` starts from:
the known rows kept, 1,025 new ones, the tokenizer of 50,281 entries."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from typer.testing import CliRunner

from models.bundle import ModelBundle
from models.layout import DOLLY_SPECIALS, TEXT_VOCAB, VOCAB
from models.text import LLMCXRTokenizer, neox_tokenizer_json
from node.cli import app
from tests.models.conftest import tiny_vqgan_config_value
from tests.models.llm_fixtures import write_taming_ckpt


def _dolly(out: Path) -> Path:
    from transformers import GPTNeoXForCausalLM

    from models.demo import demo_gpt_neox_config

    cfg = demo_gpt_neox_config(hidden=32, layers=1, heads=2)
    cfg.vocab_size = TEXT_VOCAB - 1  # dolly-v2: GPT-NeoX-20B + its three special tokens
    torch.manual_seed(3)
    GPTNeoXForCausalLM(cfg).save_pretrained(str(out))
    tok = Tokenizer.from_str(neox_tokenizer_json())
    tok.add_special_tokens(list(DOLLY_SPECIALS))
    tok.save(str(out / "tokenizer.json"))
    return out


def _weight(module: object) -> torch.Tensor:
    w = getattr(module, "weight")  # noqa: B009
    assert isinstance(w, torch.Tensor)
    return w


def test_a_dolly_base_becomes_a_bundle_in_the_llmcxr_layout(tmp_path: Path) -> None:
    from transformers import GPTNeoXForCausalLM

    base = _dolly(tmp_path / "dolly")
    ckpt, yml = write_taming_ckpt(tmp_path, tiny_vqgan_config_value())
    out = tmp_path / "bundle"
    r = CliRunner().invoke(
        app,
        [
            "models",
            "import-base",
            "--llm",
            str(base),
            "--vqgan-ckpt",
            str(ckpt),
            "--vqgan-config",
            str(yml),
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    bundle = ModelBundle.open(out)
    assert bundle.verify().ok
    LLMCXRTokenizer.from_dir(bundle.llm_dir)  # the published layout, checked
    before = _weight(GPTNeoXForCausalLM.from_pretrained(str(base)).get_input_embeddings())
    after_model = GPTNeoXForCausalLM.from_pretrained(str(bundle.llm_dir))
    after = _weight(after_model.get_input_embeddings())
    assert (
        after.shape[0] == VOCAB and _weight(after_model.get_output_embeddings()).shape[0] == VOCAB
    )
    assert torch.equal(after[: before.shape[0]], before)  # dolly's rows kept
    assert torch.allclose(after[VOCAB - 1], after[TEXT_VOCAB], atol=1e-2)  # new rows: a mean
    assert not any(p.name.startswith(".base-llm-") for p in tmp_path.iterdir())  # cleaned up

    # not a GPT-NeoX-20B tokenizer: refused, naming the file, no bundle written
    bad = _dolly(tmp_path / "bad")
    tok = Tokenizer.from_str(neox_tokenizer_json())
    tok.add_special_tokens(["<|x|>", "<|y|>", "<|z|>"])
    tok.save(str(bad / "tokenizer.json"))
    r = CliRunner().invoke(
        app,
        [
            "models",
            "import-base",
            "--llm",
            str(bad),
            "--vqgan-ckpt",
            str(ckpt),
            "--vqgan-config",
            str(yml),
            "--out",
            str(tmp_path / "never"),
        ],
    )
    assert r.exit_code == 1 and "'### End' is not id 50277" in r.output
    assert not (tmp_path / "never" / "manifest.json").exists()
