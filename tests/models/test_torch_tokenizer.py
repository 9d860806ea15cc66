"""The PyTorch image tokenizer (#29 part 4): the bundle's VQ-GAN from its checkpoint, on the
device the LLM runs on. On CPU here: codes equal to the ONNX graphs' (the same near-tie rule
as the ONNX parity tests), decoded images within the same tolerance, the same input checks,
and the runtime's choice between the two. On a GPU (``-m gpu``): the same agreement on CUDA.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from models.bundle import ModelBundle
from models.image_tokenizer import ImageTokenizerError, OnnxImageTokenizer
from models.runtime import LLMCXR
from models.torch_image_tokenizer import TorchImageTokenizer
from tests.models.llm_fixtures import demo_bundle  # noqa: F401  (fixture)
from tests.models.test_onnx_tokenizer import DECODER_REL_TOL, _check_code_parity


def _pair(
    bundle: ModelBundle, device: str = "cpu"
) -> tuple[TorchImageTokenizer, OnnxImageTokenizer]:
    source = bundle.vqgan_checkpoint
    assert source is not None, "the demo bundle keeps its VQ-GAN checkpoint"
    return (
        TorchImageTokenizer.from_checkpoint(*source, device=device),
        OnnxImageTokenizer(
            bundle.encoder_path, bundle.decoder_path, providers=["CPUExecutionProvider"]
        ),
    )


def test_codes_and_images_agree_with_the_onnx_graphs(
    demo_bundle: ModelBundle,  # noqa: F811
    nih_inputs: npt.NDArray[np.float32],
    rg1_input: npt.NDArray[np.float32],
) -> None:
    torch_tok, onnx_tok = _pair(demo_bundle)
    x = np.concatenate([nih_inputs, rg1_input[None]])
    codes = torch_tok.encode(x)
    assert codes.dtype == np.int64 and codes.shape == (3, 256)
    agreement = _check_code_parity(torch_tok.model, x, onnx_tok.encode(x))
    assert agreement >= 0.995
    images = torch_tok.decode(codes)
    ref = onnx_tok.decode(codes)
    assert images.shape == (3, 3, 256, 256) and images.dtype == np.float32
    err = float(np.abs(images - ref).max())
    assert err <= DECODER_REL_TOL * max(1.0, float(np.abs(ref).max())), err


def test_same_checks_as_onnx(demo_bundle: ModelBundle) -> None:  # noqa: F811
    tok, _ = _pair(demo_bundle)
    with pytest.raises(ImageTokenizerError, match="add a batch axis"):
        tok.encode(np.zeros((3, 256, 256), np.float32))
    with pytest.raises(ImageTokenizerError, match=r"scaled to \[-1, 1\]"):
        tok.encode(np.full((1, 3, 256, 256), 2.0, np.float32))
    with pytest.raises(ImageTokenizerError, match="must be in"):
        tok.decode(np.full((1, 256), 1024, np.int64))
    with pytest.raises(ImageTokenizerError, match="max_batch"):
        TorchImageTokenizer(tok.model, max_batch=0)
    if not torch.cuda.is_available():
        with pytest.raises(ImageTokenizerError, match="no usable CUDA"):
            TorchImageTokenizer(tok.model, device="cuda")


def test_chunked_batches_give_the_same_codes(
    demo_bundle: ModelBundle,  # noqa: F811
    nih_inputs: npt.NDArray[np.float32],
) -> None:
    source = demo_bundle.vqgan_checkpoint
    assert source is not None
    one = TorchImageTokenizer.from_checkpoint(*source, max_batch=1)
    many = TorchImageTokenizer.from_checkpoint(*source, max_batch=8)
    assert np.array_equal(one.encode(nih_inputs), many.encode(nih_inputs))


def test_the_runtime_picks_pytorch_on_the_llms_gpu_and_onnx_otherwise(
    demo_bundle: ModelBundle,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cpu = LLMCXR.from_bundle(demo_bundle, load=False)
    assert isinstance(cpu.image_tokenizer, OnnxImageTokenizer)  # a CPU backend: ONNX
    asked = LLMCXR.from_bundle(demo_bundle, load=False, image_device="cpu")
    assert isinstance(asked.image_tokenizer, TorchImageTokenizer)
    assert asked.image_tokenizer.providers == ["torch:cpu"]

    # a bundle without the checkpoint (an import without the source) stays on ONNX, and says so
    bare = tmp_path / "bundle"
    shutil.copytree(demo_bundle.root, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    for p in (bare / "vqgan").glob("*.ckpt"):
        p.unlink()
        del manifest["files"][f"vqgan/{p.name}"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        fallback = LLMCXR.from_bundle(ModelBundle.open(bare), load=False, image_device="cpu")
    assert isinstance(fallback.image_tokenizer, OnnxImageTokenizer)
    assert "keeps no vqgan/*.ckpt" in caplog.text


@pytest.mark.gpu
def test_cuda_codes_agree_with_the_onnx_graphs_on_cpu(
    demo_bundle: ModelBundle,  # noqa: F811
    nih_inputs: npt.NDArray[np.float32],
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    gpu, onnx_tok = _pair(demo_bundle, device="cuda")
    assert gpu.providers == ["torch:cuda"]
    codes = gpu.encode(nih_inputs)
    assert float((codes == onnx_tok.encode(nih_inputs)).mean()) >= 0.995
    images = gpu.decode(codes)
    ref = onnx_tok.decode(codes)
    assert float(np.abs(images - ref).max()) <= 1e-3 * max(1.0, float(np.abs(ref).max()))
