"""Import the published LLM-CXR checkpoints (HF LLM folder + VQ-GAN ckpt/YAML) as a bundle."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from models.bundle import (
    DECODER_FILE,
    ENCODER_FILE,
    LLM_DIR,
    WEIGHT_SUFFIXES,
    BundleError,
    ModelBundle,
    copy_tree,
    sha256_file,
    write_manifest,
)
from models.demo import _finish, _prepare_out
from models.layout import CODES_PER_IMAGE, IMAGE_SIZE, N_IMAGE_CODES, VOCAB, TokenLayoutError
from models.text import LLMCXRTokenizer

DEFAULT_MODEL_NAME = "LLM-CXR"


def read_neox_config(llm_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a GPT-NeoX folder with untied embeddings, as LLM-CXR's (the
    published model and its base, dolly-v2).

    Raises
    ------
    BundleError
        No readable ``config.json``, another ``model_type``, or tied embeddings.
    """
    cfg_path = llm_dir / "config.json"
    if not cfg_path.is_file():
        raise BundleError(f"LLM folder {llm_dir} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict) or cfg.get("model_type") != "gpt_neox":
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise BundleError(f"{cfg_path}: model_type {kind!r}, expected 'gpt_neox'")
    if cfg.get("tie_word_embeddings", False):
        raise BundleError(f"{cfg_path}: tie_word_embeddings is true; LLM-CXR's are untied")
    return cfg


def check_llm_dir(llm_dir: Path) -> dict[str, object]:
    """Check a published LLM folder before import; return a description for the manifest.

    Requires ``config.json`` (``model_type`` gpt_neox, ``vocab_size`` 51305, untied
    embeddings), ``tokenizer.json`` with the LLM-CXR layout (len 50281) and weights
    (``*.safetensors`` or ``*.bin``).

    Raises
    ------
    BundleError
        Naming the file or field at fault.
    """
    llm_dir = Path(llm_dir)
    cfg = read_neox_config(llm_dir)
    cfg_path = llm_dir / "config.json"
    if cfg.get("vocab_size") != VOCAB:
        raise BundleError(
            f"{cfg_path}: vocab_size {cfg.get('vocab_size')}, the LLM-CXR layout needs {VOCAB} "
            "(50281 text + 1024 image tokens)"
        )
    try:
        LLMCXRTokenizer.from_dir(llm_dir)
    except TokenLayoutError as exc:
        raise BundleError(f"{llm_dir}: tokenizer: {exc}") from exc
    weights = sorted(p.name for p in llm_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise BundleError(f"LLM folder {llm_dir} has no weights (*.safetensors or *.bin)")
    rope = cfg.get("rope_parameters") or {}
    return {
        "architecture": (cfg.get("architectures") or ["GPTNeoXForCausalLM"])[0],
        "hidden_size": cfg.get("hidden_size"),
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "num_attention_heads": cfg.get("num_attention_heads"),
        "intermediate_size": cfg.get("intermediate_size"),
        "max_position_embeddings": cfg.get("max_position_embeddings"),
        "rotary_pct": cfg.get("rotary_pct", rope.get("partial_rotary_factor")),
        "dtype": cfg.get("torch_dtype", cfg.get("dtype")),
        "weights": weights,
    }


def import_llmcxr(
    llm_dir: Path | str,
    vqgan_ckpt: Path | str,
    vqgan_yaml: Path | str,
    out: Path | str,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    model_version: str | None = None,
    keep_source: bool = True,
    link: bool = False,
    overwrite: bool = False,
) -> ModelBundle:
    """Build a bundle from the published LLM-CXR files.

    Parameters
    ----------
    llm_dir
        Hugging Face folder of the LLM (config.json with vocab_size 51305, tokenizer files
        with len 50281, weights).
    vqgan_ckpt, vqgan_yaml
        The taming VQ-GAN checkpoint (``["state_dict"]``, ``loss.*`` ignored) and its YAML.
    out
        Destination directory (absent or empty unless ``overwrite``).
    model_name, model_version
        Recorded in the manifest; the version defaults to ``sha-`` + 12 hex digits of a
        hash over the weight files, so that a different checkpoint gets a different version.
    keep_source
        Copy the ``.ckpt`` and YAML into ``vqgan/`` as well.
    link
        Hard-link the LLM files instead of copying where the filesystem allows.
    overwrite
        Replace a non-empty ``out``.

    Returns
    -------
    ModelBundle
        The opened bundle (``demo: false``).
    """
    from models.onnx_export import export_decoder, export_encoder
    from models.vqgan import load_taming_checkpoint

    llm_dir, vqgan_ckpt, vqgan_yaml, out = (
        Path(llm_dir),
        Path(vqgan_ckpt),
        Path(vqgan_yaml),
        Path(out),
    )
    llm_info = check_llm_dir(llm_dir)
    weight_names = sorted(p.name for p in llm_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    for p in (vqgan_ckpt, vqgan_yaml):
        if not p.is_file():
            raise BundleError(f"VQ-GAN file {p} does not exist")
    vq = load_taming_checkpoint(vqgan_ckpt, vqgan_yaml)
    cfg = vq.cfg
    if cfg.n_embed != N_IMAGE_CODES or cfg.codes_per_image != CODES_PER_IMAGE:
        raise BundleError(
            f"VQ-GAN has {cfg.n_embed} codes and {cfg.codes_per_image} codes per image; "
            f"LLM-CXR needs {N_IMAGE_CODES} and {CODES_PER_IMAGE}"
        )
    if cfg.resolution != IMAGE_SIZE:
        raise BundleError(f"VQ-GAN resolution {cfg.resolution} != {IMAGE_SIZE}")
    staging = _prepare_out(out, overwrite)
    try:
        copy_tree(llm_dir, staging / LLM_DIR, link=link)
        if not (staging / LLM_DIR / "tokenizer.json").is_file():  # slow-tokenizer folders
            LLMCXRTokenizer.from_dir(llm_dir).raw.save(str(staging / LLM_DIR / "tokenizer.json"))
        export_encoder(vq, staging / ENCODER_FILE)
        export_decoder(vq, staging / DECODER_FILE)
        ckpt_sha = sha256_file(vqgan_ckpt)
        if keep_source:
            shutil.copy2(vqgan_ckpt, staging / "vqgan" / vqgan_ckpt.name)
            shutil.copy2(vqgan_yaml, staging / "vqgan" / vqgan_yaml.name)
        if model_version is None:
            h = hashlib.sha256(ckpt_sha.encode())
            for name in weight_names:
                h.update(sha256_file(llm_dir / name).encode())
            model_version = f"sha-{h.hexdigest()[:12]}"
        write_manifest(
            staging,
            model_name=model_name,
            model_version=model_version,
            demo=False,
            llm=llm_info,
            vqgan={"config": cfg.to_dict()},
            source={
                "kind": "import-llmcxr",
                "llm_dir": str(llm_dir),
                "vqgan_ckpt": str(vqgan_ckpt),
                "vqgan_ckpt_sha256": ckpt_sha,
                "vqgan_yaml": str(vqgan_yaml),
            },
            created_by="cxr-node models import-llmcxr",
        )
        return _finish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
