"""The transformers backend's GPU-path options (static KV cache, compiled decoding), run on
CPU where they can, and the CUDA path itself under ``@pytest.mark.gpu`` (skipped here)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from models.backends.base import GenerationRequest, GenerationResult
from models.backends.transformers_backend import (
    STATIC_CACHE_BUCKET,
    TransformersBackend,
    static_cache_len,
)
from models.bundle import ModelBundle
from models.prompts import report_prompt, report_to_image_prompt, vqa_prompt


def _prompts(backend: TransformersBackend) -> list[list[int]]:
    """Report and VQA prompts with random image codes, and random text of random length."""
    rng = np.random.default_rng(7)
    tok = backend.tokenizer
    out = [
        tok.encode_with_image(report_prompt(), rng.integers(0, 1024, 256).tolist()),
        tok.encode_with_image(
            vqa_prompt("Is there a pleural effusion?"), rng.integers(0, 1024, 256).tolist()
        ),
    ]
    out += [rng.integers(2, 50277, int(n)).tolist() for n in (9, 40, 130)]
    return out


@pytest.fixture(scope="module")
def dynamic(demo_bundle: ModelBundle) -> Iterator[TransformersBackend]:
    backend = TransformersBackend(demo_bundle.llm_dir, dtype="float32", cache="dynamic")
    backend.load()
    yield backend


@pytest.fixture(scope="module")
def static(demo_bundle: ModelBundle) -> Iterator[TransformersBackend]:
    backend = TransformersBackend(demo_bundle.llm_dir, dtype="float32", cache="static")
    backend.load()
    yield backend


def _tokens(results: list[GenerationResult]) -> list[list[int]]:
    assert all(r.error is None for r in results), [r.error for r in results]
    return [r.token_ids for r in results]


def test_static_cache_len_buckets() -> None:
    assert static_cache_len(1, 2048) == STATIC_CACHE_BUCKET
    assert static_cache_len(STATIC_CACHE_BUCKET, 2048) == STATIC_CACHE_BUCKET
    assert static_cache_len(STATIC_CACHE_BUCKET + 1, 2048) == 2 * STATIC_CACHE_BUCKET
    assert static_cache_len(2000, 2048) == 2048  # capped at the model's positions
    assert static_cache_len(2048, 2048) == 2048
    with pytest.raises(ValueError):
        static_cache_len(0, 2048)


def test_option_resolution_and_validation(demo_bundle: ModelBundle) -> None:
    cpu = TransformersBackend(demo_bundle.llm_dir, dtype="float32")
    assert (cpu.cache, cpu.compile, cpu.compile_mode) == ("dynamic", False, "default")
    # the CUDA defaults are decided without touching a GPU
    gpu = TransformersBackend(demo_bundle.llm_dir, dtype="bfloat16", device="cuda")
    assert (gpu.cache, gpu.compile, gpu.compile_mode) == ("static", True, "reduce-overhead")
    assert gpu.dtype == torch.bfloat16
    eager_gpu = TransformersBackend(
        demo_bundle.llm_dir, dtype="bfloat16", device="cuda:1", compile=False
    )
    assert (eager_gpu.cache, eager_gpu.compile) == ("static", False)
    with pytest.raises(ValueError, match="needs cache='static'"):
        TransformersBackend(demo_bundle.llm_dir, cache="dynamic", compile=True)
    with pytest.raises(ValueError, match="cache must be one of"):
        TransformersBackend(demo_bundle.llm_dir, cache="paged")
    with pytest.raises(ValueError, match="device must be"):
        TransformersBackend(demo_bundle.llm_dir, device="tpu")


def test_static_cache_equals_dynamic_greedy_batched(
    dynamic: TransformersBackend, static: TransformersBackend
) -> None:
    """Left-padded batch of 5 prompts of different lengths, 24 greedy tokens each."""
    reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=24) for p in _prompts(dynamic)]
    ref = _tokens(dynamic.generate(reqs))
    got = _tokens(static.generate(reqs))
    assert got == ref
    assert all(len(t) == 24 for t in ref)
    assert len({tuple(t) for t in ref}) > 1  # the prompts lead to different outputs
    assert static.health()["cache"] == "static"


def test_static_cache_equals_dynamic_one_by_one_and_reused(
    dynamic: TransformersBackend, static: TransformersBackend
) -> None:
    """One request at a time (different cache lengths and batch sizes follow each other)."""
    for p in _prompts(dynamic)[::-1]:
        req = [GenerationRequest(prompt_ids=p, max_new_tokens=12)]
        assert _tokens(static.generate(req)) == _tokens(dynamic.generate(req))


def test_static_cache_constrained_image_decoding(
    dynamic: TransformersBackend, static: TransformersBackend
) -> None:
    ids = dynamic.tokenizer.encode(report_to_image_prompt("No acute cardiopulmonary process."))
    req = [GenerationRequest(prompt_ids=ids, max_new_tokens=1, mode="image")]
    ref, got = dynamic.generate(req)[0], static.generate(req)[0]
    assert got.stop_reason == "image_complete"
    assert got.image_codes is not None and len(got.image_codes) == 256
    assert got.image_codes == ref.image_codes


def test_compiled_decode_step_on_cpu(
    demo_bundle: ModelBundle, dynamic: TransformersBackend
) -> None:
    """compile=True goes through transformers' compiled decode call (``torch.compile`` with
    the ``eager`` backend here: Dynamo traces the step without C++ code generation)."""
    compiled = TransformersBackend(
        demo_bundle.llm_dir, dtype="float32", cache="static", compile=True, compile_backend="eager"
    )
    compiled.load()
    assert not hasattr(compiled.model, "_compiled_call")
    reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=10) for p in _prompts(dynamic)[:3]]
    assert _tokens(compiled.generate(reqs)) == _tokens(dynamic.generate(reqs))
    assert hasattr(compiled.model, "_compiled_call")  # the decode steps ran compiled
    health = compiled.health()
    assert health["compile"] is True and health["cache"] == "static"


def test_uncompiled_static_cache_does_not_compile(static: TransformersBackend) -> None:
    req = [GenerationRequest(prompt_ids=[5, 6, 7], max_new_tokens=3)]
    static.generate(req)
    assert not hasattr(static.model, "_compiled_call")


# --- CUDA only ------------------------------------------------------------------------------


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)")


@pytest.mark.gpu
def test_cuda_bf16_static_compiled_matches_eager(demo_bundle: ModelBundle) -> None:
    """On CUDA: bf16, static cache, compiled decode (CUDA graphs) gives the same greedy
    tokens as bf16 eager decoding with a dynamic cache."""
    _require_cuda()
    fast = TransformersBackend(demo_bundle.llm_dir, device="cuda")
    slow = TransformersBackend(demo_bundle.llm_dir, device="cuda", cache="dynamic", compile=False)
    fast.load()
    slow.load()
    assert fast.dtype == torch.bfloat16 and (fast.cache, fast.compile) == ("static", True)
    reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=16) for p in _prompts(slow)]
    fast.generate(reqs)  # compile and capture
    got, ref = fast.generate(reqs), slow.generate(reqs)
    assert _tokens(got) == _tokens(ref)
    assert hasattr(fast.model, "_compiled_call")
    assert got[0].prefill_s > 0 and got[0].decode_s > 0


@pytest.mark.gpu
def test_cuda_fp32_matches_cpu_fp32_reference(
    demo_bundle: ModelBundle, dynamic: TransformersBackend
) -> None:
    _require_cuda()
    gpu = TransformersBackend(demo_bundle.llm_dir, dtype="float32", device="cuda")
    gpu.load()
    reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=16) for p in _prompts(dynamic)]
    assert _tokens(gpu.generate(reqs)) == _tokens(dynamic.generate(reqs))


@pytest.mark.gpu
def test_bundle_vqgan_uses_cuda_provider(demo_bundle: ModelBundle) -> None:
    """With onnxruntime-gpu (the ``gpu`` extra) and a GPU, the bundle's ONNX VQ-GAN runs on
    the CUDA execution provider, with the same codes as on CPU."""
    import onnxruntime as ort

    from models.image_tokenizer import OnnxImageTokenizer

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with a CUDA GPU is not available")
    gpu = OnnxImageTokenizer(demo_bundle.encoder_path, demo_bundle.decoder_path)
    cpu = OnnxImageTokenizer(
        demo_bundle.encoder_path, demo_bundle.decoder_path, providers=["CPUExecutionProvider"]
    )
    assert gpu.providers[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 256, 256)).astype(np.float32)
    agree = float((gpu.encode(x) == cpu.encode(x)).mean())
    assert agree >= 0.995


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_vqgan_cuda_request_falls_back_with_a_warning(
    demo_bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    """Asking for the CUDA provider where onnxruntime cannot give it runs on CPU, and says so
    (with onnxruntime-gpu and a GPU, ``default_providers`` puts CUDA first: gpu test above)."""
    import logging

    import onnxruntime as ort

    from models.image_tokenizer import OnnxImageTokenizer, default_providers

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here: the gpu test covers it")
    assert default_providers() == ["CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger="models.image_tokenizer"):
        tok = OnnxImageTokenizer(
            demo_bundle.encoder_path,
            demo_bundle.decoder_path,
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        )
    assert tok.providers == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider was requested" in r.message for r in caplog.records)
    codes = tok.encode(np.zeros((1, 3, 256, 256), dtype=np.float32))
    assert codes.shape == (1, 256)


def test_static_warmup_sizes_the_cache_for_reports(demo_bundle: ModelBundle) -> None:
    backend = TransformersBackend(demo_bundle.llm_dir, dtype="float32", cache="static")
    backend.warmup()
    assert backend.health()["new_tokens"] == 4
    # a report prompt (302 ids) + 128 new tokens fits the cache the warm-up made
    assert getattr(backend.model, "_previous_max_cache_length", 0) == static_cache_len(
        302 + 128, 2048
    )
