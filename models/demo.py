"""A small, randomly initialised LLM-CXR-shaped model bundle for demos and tests.

Same architecture family and token layout as the published model (GPT-NeoX with 51,305
untied embedding rows and rotary_pct 0.25, a taming VQ-GAN with 1,024 codes on a 16x16
grid) but tiny, so it is built in seconds and deterministic from a seed. Marked DEMO in
its manifest: its output is noise and must never reach a clinician as a report.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from models.bundle import DECODER_FILE, ENCODER_FILE, LLM_DIR, ModelBundle, write_manifest
from models.layout import EOS_ID, VOCAB
from models.text import build_llmcxr_tokenizer, save_tokenizer_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEMO_MODEL_NAME = "LLM-CXR DEMO (random weights, not for clinical use)"


def _prepare_out(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (use overwrite)")
        shutil.rmtree(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _finish(staging: Path, out: Path) -> ModelBundle:
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    return ModelBundle.open(out)


def demo_gpt_neox_config(
    *, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int | None = None
) -> Any:
    """A ``GPTNeoXConfig`` with dolly-v2's shape family and the LLM-CXR vocabulary."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=2048,
        rotary_pct=0.25,  # type: ignore[call-arg]  # dolly's key; v5 maps it to rope_parameters
        rotary_emb_base=10000,  # type: ignore[call-arg]
        use_parallel_residual=True,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )


def demo_vqgan_config() -> Any:
    """A small taming VQ-GAN config: 5 levels (16x16 grid), 1,024 codes, 32 channels.

    Only the widths (``ch``, ``z_channels``, ``embed_dim``) and the depth (``ch_mult``,
    ``num_res_blocks``) differ from :class:`models.vqgan.VQGANConfig`'s defaults;
    the input (3 x 256 x 256), codebook size, attention at 16 and the rest are LLM-CXR's.
    """
    from models.vqgan import VQGANConfig

    return VQGANConfig(
        ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32
    )


def create_demo_bundle(
    out: Path | str,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    base_tokenizer: Path | None = None,
    overwrite: bool = False,
) -> ModelBundle:
    """Build a DEMO bundle at ``out`` (deterministic from ``seed``).

    Parameters
    ----------
    out
        Destination directory (must be absent or empty unless ``overwrite``).
    seed
        Seed of every random initialisation.
    hidden, layers, heads
        GPT-NeoX shape (vocabulary and rotary fraction are always LLM-CXR's).
    base_tokenizer
        A GPT-NeoX-20B ``tokenizer.json``; default: the copy that ships with ``models``.
    overwrite
        Replace a non-empty ``out``.

    Returns
    -------
    ModelBundle
        The opened bundle (``demo: true`` in its manifest).
    """
    from transformers import GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    from models.onnx_export import export_decoder, export_encoder
    from models.vqgan import VQModel

    hf_logging.disable_progress_bar()
    out = Path(out)
    staging = _prepare_out(out, overwrite)
    try:
        tok = build_llmcxr_tokenizer(Path(base_tokenizer) if base_tokenizer else None)
        llm_dir = staging / LLM_DIR
        cfg = demo_gpt_neox_config(hidden=hidden, layers=layers, heads=heads)
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(cfg).eval()
        model.save_pretrained(str(llm_dir))
        save_tokenizer_dir(tok, llm_dir)

        vq_cfg = demo_vqgan_config()
        torch.manual_seed(seed + 1)
        vq = VQModel(vq_cfg).eval()
        with torch.no_grad():  # spread the codebook so that codes vary across images
            vq.quantize.embedding.weight.uniform_(-1.0, 1.0)
        export_encoder(vq, staging / ENCODER_FILE)
        export_decoder(vq, staging / DECODER_FILE)
        (staging / "vqgan" / "config.yaml").write_text(
            yaml.safe_dump(vq_cfg.to_yaml_dict(), sort_keys=False), encoding="utf-8"
        )
        # the source checkpoint, as an imported bundle keeps it: the PyTorch tokenizer on a GPU
        torch.save({"state_dict": vq.state_dict()}, staging / "vqgan" / "model.ckpt")
        write_manifest(
            staging,
            model_name=DEMO_MODEL_NAME,
            model_version=f"demo-h{hidden}-l{layers}-seed{seed}",
            demo=True,
            llm={
                "architecture": "GPTNeoXForCausalLM",
                "hidden_size": hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "parameters": int(sum(p.numel() for p in model.parameters())),
                "tokenizer": "gpt-neox-20b",
            },
            vqgan={"config": vq_cfg.to_dict()},
            source={"kind": "demo", "seed": seed},
            created_by="cxr-node models create-demo",
        )
        return _finish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
