"""GGUF conversion of a tiny GPT-NeoX in the LLM-CXR layout: vocabulary, tensors, manifest."""

from __future__ import annotations

from .conftest import require_engine

require_engine()

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from models.backends.llamacpp import LlamaCppBackend  # noqa: E402
from models.gguf_convert import (  # noqa: E402
    ConversionError,
    ConversionResult,
    add_engine_to_manifest,
    bundle_engine_files,
    check_gguf_layout,
    choose_qtype,
    convert_bundle,
    convert_bundle_llm,
    image_token_text,
)
from models.layout import END_ID, IMAGE_TOKEN_OFFSET, TEXT_VOCAB, VOCAB, TokenLayoutError  # noqa: E402
from models.prompts import report_prompt, report_to_image_prompt  # noqa: E402

from .conftest import THREADS  # noqa: E402

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def readers(ggufs: dict[str, ConversionResult]) -> dict[str, gguf.GGUFReader]:
    """GGUF readers (each parses the 51k-entry vocabulary: a few seconds)."""
    return {q: gguf.GGUFReader(str(ggufs[q].path)) for q in ("f32", "q8_0")}


def test_vocabulary_keeps_text_and_image_ids(
    engines: dict[str, LlamaCppBackend], tiny_llm: Path
) -> None:
    from tokenizers import Tokenizer

    engine = engines["f16"]  # the vocabulary as llama.cpp loaded it
    assert engine.health()["loaded"]
    tok = Tokenizer.from_file(str(tiny_llm / "tokenizer.json"))
    # text entries keep their ids (spot checks over the whole range)
    for i in [0, 1, 2, 187, 1000, 25000, 50253, 50254, 50276, 50277, 50280]:
        assert engine.vocab_entry(i)[0] == tok.id_to_token(i), i
    assert engine.vocab_entry(END_ID) == ("### End", "control")
    assert engine.vocab_entry(0) == ("<|endoftext|>", "control")
    assert engine.vocab_entry(50276)[1] == "user_defined"  # a whitespace run of GPT-NeoX
    assert engine.vocab_entry(1000)[1] == "normal"
    # image ids: USER_DEFINED placeholders, read and written as their text by a server
    assert engine.vocab_entry(IMAGE_TOKEN_OFFSET) == (image_token_text(0), "user_defined")
    assert image_token_text(0) == "<img_0000>"
    assert engine.vocab_entry(VOCAB - 1) == ("<img_1023>", "user_defined")
    assert {engine.vocab_entry(i)[1] for i in range(TEXT_VOCAB, VOCAB, 37)} == {"user_defined"}


def test_gguf_metadata(ggufs: dict[str, ConversionResult]) -> None:
    meta = check_gguf_layout(ggufs["q8_0"].path)  # through gguf.GGUFReader
    assert meta["general.architecture"] == "gptneox"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.eos_token_id"] == 0
    assert meta["tokenizer.ggml.eot_token_id"] == END_ID
    assert meta["gptneox.rope.dimension_count"] == 4  # 0.25 * head_dim 16
    assert meta["gptneox.use_parallel_residual"] is True
    assert meta["gptneox.context_length"] == 2048
    assert meta["llmcxr.image_token_offset"] == IMAGE_TOKEN_OFFSET
    assert meta["llmcxr.quant"] == "q8_0"


def test_llama_cpp_tokenizes_text_like_the_bundle_tokenizer(
    engines: dict[str, LlamaCppBackend], hf: object
) -> None:
    engine = engines["f16"]
    tok = hf.tokenizer  # type: ignore[attr-defined]
    for text in [
        report_prompt(),
        report_to_image_prompt("Small left pleural effusion.  No pneumothorax."),
    ]:
        assert engine.tokenize(text) == tok.encode(text)
    # an image placeholder's text is its id (the remote backend's wire form); <image> is text
    ids = engine.tokenize("<img_0005> and <image>", parse_special=False)
    assert ids[0] == IMAGE_TOKEN_OFFSET + 5 and all(i < IMAGE_TOKEN_OFFSET for i in ids[1:])
    assert engine.detokenize(tok.encode("No acute cardiopulmonary process.")) == (
        "No acute cardiopulmonary process."
    )


def test_tensor_types_per_quantisation(
    ggufs: dict[str, ConversionResult], readers: dict[str, gguf.GGUFReader]
) -> None:
    # 2 layers x (qkv, attn_out, ffn_up, ffn_down) + token_embd + output = 10 matrices;
    # 2 x (2 norms x 2 + 4 biases) + output_norm x 2 = 18 vectors
    assert ggufs["f32"].tensor_types == {"F32": 28}
    assert ggufs["f16"].tensor_types == {"F16": 10, "F32": 18}
    assert ggufs["q8_0"].tensor_types == {"Q8_0": 10, "F32": 18}
    by_name = {t.name: t for t in readers["q8_0"].tensors}
    assert by_name["token_embd.weight"].tensor_type == Q.Q8_0
    assert by_name["output.weight"].tensor_type == Q.Q8_0  # untied: a tensor of its own
    assert list(by_name["output.weight"].shape) == [64, VOCAB]
    assert by_name["blk.0.attn_norm.bias"].tensor_type == Q.F32
    sizes = [r.size for r in ggufs.values()]
    assert sizes[0] > sizes[1] > sizes[2]


def test_quantisation_fallbacks() -> None:
    assert choose_qtype((51305, 64), "q8_0") == Q.Q8_0
    assert choose_qtype((51305, 48), "q8_0") == Q.F16  # row not a multiple of 32
    assert choose_qtype((64,), "q8_0") == Q.F32
    assert choose_qtype((256, 256), "bf16") == Q.BF16
    with pytest.raises(ConversionError):
        choose_qtype((64, 64), "q3")


def test_qkv_reordered_for_llama_cpp(readers: dict[str, gguf.GGUFReader], tiny_llm: Path) -> None:
    from safetensors.numpy import load_file

    sd = load_file(str(tiny_llm / "model.safetensors"))
    hf_qkv = sd["gpt_neox.layers.0.attention.query_key_value.weight"]  # [3*64, 64], per head q,k,v
    qkv = next(t for t in readers["f32"].tensors if t.name == "blk.0.attn_qkv.weight")
    data = np.asarray(qkv.data).reshape(192, 64)
    head = 16
    # head 1's key rows sit at [64 + 16, 64 + 32) in llama.cpp's [Q | K | V] order
    np.testing.assert_array_equal(
        data[64 + head : 64 + 2 * head], hf_qkv[3 * head + head : 3 * head + 2 * head]
    )
    assert not np.array_equal(data, hf_qkv)


def test_rejects_non_llmcxr_layout(tiny_llm: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llm, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenLayoutError, match="untied"):
        convert_bundle_llm(bad, tmp_path / "x.gguf", quant="f16")
    cfg["tie_word_embeddings"] = False
    cfg["vocab_size"] = 50304
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenLayoutError, match="51305"):
        convert_bundle_llm(bad, tmp_path / "x.gguf", quant="f16")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(ConversionError, match="quant"):
        convert_bundle_llm(tiny_llm, tmp_path / "x.gguf", quant="q2")  # type: ignore[arg-type]


def test_convert_bundle_records_engine_in_manifest(tiny_llm: Path, tmp_path: Path) -> None:
    from models.backends import make_backend
    from models.backends.base import GenerationRequest
    from models.bundle import ModelBundle, write_manifest

    root = tmp_path / "bundle"
    shutil.copytree(tiny_llm, root / "llm")
    (root / "vqgan").mkdir()
    for name in ("encoder.onnx", "decoder.onnx"):  # not run here: only hashed
        (root / "vqgan" / name).write_bytes(b"onnx placeholder " + name.encode())
    write_manifest(root, model_name="tiny", model_version="t1", demo=True, llm={}, vqgan={})
    result = convert_bundle(root, quant="q8_0", threads=THREADS)
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["engines"]["llamacpp"]["q8_0"]
    assert entry["path"] == "engines/llamacpp/llm-q8_0.gguf"
    assert entry["sha256"] == result.sha256 == manifest["files"][entry["path"]]["sha256"]
    bundle = ModelBundle.open(root)
    assert bundle.verify_checksums().ok  # the GGUF is listed, hashes match, nothing unlisted
    assert bundle_engine_files(root) == {"q8_0": root / entry["path"]}
    backend = make_backend("llamacpp", bundle.llm_dir, threads=THREADS, max_batch=1)
    out = backend.generate([GenerationRequest(prompt_ids=[10, 20, 30], max_new_tokens=3)])
    assert out[0].new_tokens == 3 and out[0].error is None
    assert backend.health()["quant"] == "q8_0"
    # a tampered file is caught by the bundle's checksum verification
    with open(root / entry["path"], "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x01")
    assert not ModelBundle.open(root).verify_checksums().ok
    with pytest.raises(ConversionError, match="inside the bundle"):
        add_engine_to_manifest(root, quant="f16", path=tmp_path / "elsewhere.gguf")


@pytest.mark.slow
def test_q4_k_m_through_llama_quantize(tmp_path: Path) -> None:
    from models.backends.base import GenerationRequest

    from .conftest import make_tiny_llm

    llm = make_tiny_llm(tmp_path / "llm256", hidden=256)  # rows of 256: real Q4_K blocks
    res = convert_bundle_llm(llm, tmp_path / "q4.gguf", quant="q4_k_m", threads=THREADS)
    assert res.tensor_types.get("Q4_K", 0) > 0
    assert not (tmp_path / "q4.gguf.f16-intermediate").exists()
    assert res.size < (VOCAB * 256 * 2 * 2) * 0.5
    engine = LlamaCppBackend(res.path, threads=THREADS, max_batch=1)
    out = engine.generate([GenerationRequest(prompt_ids=[5, 6, 7], max_new_tokens=1, mode="image")])
    assert out[0].image_codes is not None and len(out[0].image_codes) == 256
    engine.close()


def test_torch_bin_and_bf16_checkpoints(
    tiny_llm: Path, ggufs: dict[str, ConversionResult], tmp_path: Path
) -> None:
    import torch
    from transformers import GPTNeoXForCausalLM

    model: Any = GPTNeoXForCausalLM.from_pretrained(str(tiny_llm), dtype=torch.float32)
    as_bin = tmp_path / "bin"  # the older torch pickle layout of published checkpoints
    as_bin.mkdir()
    torch.save(model.state_dict(), as_bin / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_llm / name, as_bin / name)
    res = convert_bundle_llm(as_bin, tmp_path / "bin.gguf", quant="f16")
    assert res.sha256 == ggufs["f16"].sha256  # same weights, same file, whatever the container
    as_bf16 = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(str(as_bf16))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_llm / name, as_bf16 / name)
    res16 = convert_bundle_llm(as_bf16, tmp_path / "bf16.gguf", quant="f16")
    assert res16.tensor_types == ggufs["f16"].tensor_types
    assert res16.size == ggufs["f16"].size and res16.sha256 != ggufs["f16"].sha256
