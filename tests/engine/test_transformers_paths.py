"""The transformers backend's GPU-path options (static KV cache, compiled decoding), run on
CPU where they can, and the CUDA path itself under ``@pytest.mark.gpu`` (skipped here)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from models.backends.base import GenerationRequest, GenerationResult
from models.backends.transformers_backend import TransformersBackend
from models.backends.transformers_support import (
    MAX_STATIC_CACHES,
    STATIC_CACHE_BUCKET,
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


# --- the own decode loop (decode_loop="graph"), on CPU ------------------------------------------


@pytest.fixture(scope="module")
def graph(demo_bundle: ModelBundle) -> Iterator[TransformersBackend]:
    backend = TransformersBackend(
        demo_bundle.llm_dir, dtype="float32", cache="static", decode_loop="graph"
    )
    backend.load()
    yield backend


def test_decode_loop_resolution_and_validation(demo_bundle: ModelBundle) -> None:
    cpu = TransformersBackend(demo_bundle.llm_dir, dtype="float32")
    assert cpu.decode_loop == "generate"  # dynamic cache on CPU
    gpu = TransformersBackend(demo_bundle.llm_dir, dtype="bfloat16", device="cuda")
    assert gpu.decode_loop == "auto"  # decided once the model is loaded (its forward's API)
    gpu_generate = TransformersBackend(demo_bundle.llm_dir, device="cuda", decode_loop="generate")
    assert gpu_generate.decode_loop == "generate"
    with pytest.raises(ValueError, match="needs cache='static'"):
        TransformersBackend(demo_bundle.llm_dir, cache="dynamic", decode_loop="graph")
    with pytest.raises(ValueError, match="decode_loop must be one of"):
        TransformersBackend(demo_bundle.llm_dir, decode_loop="fast")


def test_graph_loop_equals_generate_batched(
    dynamic: TransformersBackend, graph: TransformersBackend
) -> None:
    """Left-padded batch of 5 prompts of different lengths, 40 greedy tokens (more than one
    stop-check interval), the same tokens as transformers' generate with a dynamic cache."""
    reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=40) for p in _prompts(dynamic)]
    ref = _tokens(dynamic.generate(reqs))
    got = graph.generate(reqs)
    assert _tokens(got) == ref
    assert all(len(t) == 40 for t in ref) and len({tuple(t) for t in ref}) > 1
    assert all(r.prefill_s > 0 and r.decode_s > 0 for r in got)
    assert graph.health()["decode_loop"] == "graph"


def test_graph_loop_equals_generate_one_by_one(
    dynamic: TransformersBackend, graph: TransformersBackend
) -> None:
    """Batch 1, no padding (the case where transformers may drop the mask in eager mode),
    with cache shapes that change and come back (the static caches are reused)."""
    for n, p in enumerate([*_prompts(dynamic)[::-1], _prompts(dynamic)[0]]):
        req = [GenerationRequest(prompt_ids=p, max_new_tokens=12 + n)]
        assert _tokens(graph.generate(req)) == _tokens(dynamic.generate(req))
    assert len(graph._caches) <= MAX_STATIC_CACHES


def test_graph_loop_constrained_image_decoding(
    dynamic: TransformersBackend, graph: TransformersBackend
) -> None:
    ids = dynamic.tokenizer.encode(report_to_image_prompt("No acute cardiopulmonary process."))
    reqs = [GenerationRequest(prompt_ids=ids, max_new_tokens=1, mode="image")] * 2
    ref, got = dynamic.generate(reqs), graph.generate(reqs)
    for r, g in zip(ref, got, strict=True):
        assert g.stop_reason == "image_complete"
        assert g.image_codes is not None and len(g.image_codes) == 256
        assert g.image_codes == r.image_codes


def _compiled_graph_backend(
    bundle: ModelBundle, max_batch: int = 8, warmup_batch: int = 1
) -> TransformersBackend:
    """fp32, static cache, the own loop with its step compiled by ``torch.compile`` with the
    ``eager`` backend (Dynamo traces the step; no C++ build on CPU), loaded."""
    backend = TransformersBackend(
        bundle.llm_dir,
        dtype="float32",
        cache="static",
        compile=True,
        compile_backend="eager",
        decode_loop="graph",
        max_batch=max_batch,
        warmup_batch=warmup_batch,
    )
    backend.load()
    return backend


def test_warmup_prepares_batch_one_unless_told(demo_bundle: ModelBundle) -> None:
    backend = _compiled_graph_backend(demo_bundle)
    backend.warmup()
    assert {b for b, _ in backend._caches} == {1}
    assert TransformersBackend(demo_bundle.llm_dir, max_batch=2, warmup_batch=6).warmup_batch == 2
    with pytest.raises(ValueError, match="warmup_batch"):
        TransformersBackend(demo_bundle.llm_dir, warmup_batch=0)


def test_graph_loop_compiled_on_cpu(demo_bundle: ModelBundle, dynamic: TransformersBackend) -> None:
    """The loop's step compiled (Dynamo traces it; ``eager`` backend, no C++ build)."""
    compiled = _compiled_graph_backend(demo_bundle)
    reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=20) for p in _prompts(dynamic)[:3]]
    assert _tokens(compiled.generate(reqs)) == _tokens(dynamic.generate(reqs))
    step = compiled._step_fn
    assert step is not None and hasattr(step, "_torchdynamo_orig_callable")  # torch.compile's
    # other prompt widths and lengths in the same cache shape reuse the compiled step (a
    # recompile costs tens of seconds at full size on a GPU)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    for n, p in zip((5, 31, 17), _prompts(dynamic)[2:5], strict=True):
        req = [GenerationRequest(prompt_ids=p, max_new_tokens=n)]
        assert _tokens(compiled.generate(req)) == _tokens(dynamic.generate(req))
    graphs_b1 = counters["stats"]["unique_graphs"]
    assert graphs_b1 - graphs == 1  # batch 1 once; then widths 40 and 130, lengths 31 and 17


def test_batch_bucket() -> None:
    from models.backends.transformers_support import batch_bucket

    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 32)] == [1, 2, 4, 4, 8, 8, 16, 32]
    with pytest.raises(ValueError):
        batch_bucket(0)


def test_graph_loop_batch_buckets_share_one_compiled_step(
    demo_bundle: ModelBundle, dynamic: TransformersBackend
) -> None:
    """Batches of 3 and 4 run at 4 (the 3 padded with a copy of its first row), through one
    compiled step; warmup compiles every bucket up to warmup_batch (the worker's batch size);
    results equal generate's."""
    from torch._dynamo.utils import counters

    compiled = _compiled_graph_backend(demo_bundle, max_batch=8, warmup_batch=5)
    compiled.warmup()  # buckets 1, 2, 4 and 8 (Dynamo may reuse graphs that earlier tests'
    # backends compiled: the step is one function, the parameters are its inputs)
    assert {b for b, _ in compiled._caches} == {1, 2, 4, 8}
    after_warmup = counters["stats"]["unique_graphs"]
    prompts = _prompts(dynamic)
    for n in (3, 4, 5):
        reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=18) for p in prompts[:n]]
        got = compiled.generate(reqs)
        assert len(got) == n
        assert _tokens(got) == _tokens(dynamic.generate(reqs))
    assert counters["stats"]["unique_graphs"] == after_warmup  # no compile after warmup


def test_graph_loop_stops_within_one_check_interval(demo_bundle: ModelBundle) -> None:
    """A model whose every logit is 0 emits EOS (id 0) first: generation stops at the first
    stop check, not at max_new_tokens, and the result ends there as with generate."""
    from models.backends.transformers_support import STOP_CHECK_EVERY

    backend = TransformersBackend(
        demo_bundle.llm_dir, dtype="float32", cache="static", decode_loop="graph"
    )
    backend.load()
    with torch.no_grad():
        backend.model.get_output_embeddings().weight.zero_()
    real_step = backend._decode_step()
    calls = []

    def counting(*args: object) -> torch.Tensor:
        calls.append(1)
        return real_step(*args)

    backend._step_fn = counting
    res = backend.generate([GenerationRequest(prompt_ids=[5, 6, 7], max_new_tokens=100)])[0]
    assert (res.error, res.stop_reason, res.token_ids) == (None, "eos", [])
    assert len(calls) == STOP_CHECK_EVERY - 1  # the prefill made the first token


# --- CUDA only ------------------------------------------------------------------------------


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)")


BF16_TIE_ULPS = 8
"""How many bf16 steps apart two logits may be for a greedy choice between them to count as a
tie that rounding decides (bf16 keeps 8 significant bits: one step is 2**-7 of the value)."""


def _divergence_is_a_bf16_tie(
    ref_backend: TransformersBackend, prompt: list[int], got: list[int], ref: list[int]
) -> str | None:
    """``None`` when ``got`` equals ``ref``, or first differs where the two chosen tokens'
    logits (eager bf16, on the common prefix) are within :data:`BF16_TIE_ULPS` bf16 steps;
    else a description of the divergence."""
    k = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), None)
    if k is None:
        return None if len(got) == len(ref) else f"lengths {len(got)} != {len(ref)}"
    ids = torch.tensor([prompt + ref[:k]], device=ref_backend.device)
    with torch.inference_mode():
        logits = ref_backend.model(input_ids=ids).logits[0, -1].float()
    la, lb = float(logits[got[k]]), float(logits[ref[k]])
    tol = BF16_TIE_ULPS * 2**-7 * max(abs(la), abs(lb))
    if abs(la - lb) <= tol:
        return None
    gap = abs(la - lb)
    return f"step {k}: {got[k]} ({la:.4f}) vs {ref[k]} ({lb:.4f}), gap {gap:.4f} > {tol:.4f}"


@pytest.mark.gpu
def test_cuda_bf16_compiled_loop_agrees_with_eager_up_to_bf16_ties(
    demo_bundle: ModelBundle,
) -> None:
    """On CUDA: bf16, static cache, the own loop with its compiled step (CUDA graphs) gives
    the greedy tokens of bf16 eager ``generate`` (dynamic cache), except where a row's first
    difference is a choice between two logits that bf16 cannot tell apart (compiled kernels
    round differently; on the H200, 2026-11-28, one row of five differed from step 8)."""
    _require_cuda()
    fast = TransformersBackend(demo_bundle.llm_dir, device="cuda")
    slow = TransformersBackend(demo_bundle.llm_dir, device="cuda", cache="dynamic", compile=False)
    fast.load()
    slow.load()
    assert fast.dtype == torch.bfloat16 and (fast.cache, fast.compile) == ("static", True)
    assert fast.decode_loop == "graph"
    prompts = _prompts(slow)
    reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=16) for p in prompts]
    fast.generate(reqs)  # compile and capture
    got, ref = _tokens(fast.generate(reqs)), _tokens(slow.generate(reqs))
    problems = [
        f"row {row}: {msg}"
        for row, (p, g, r) in enumerate(zip(prompts, got, ref, strict=True))
        if (msg := _divergence_is_a_bf16_tie(slow, p, g, r)) is not None
    ]
    assert not problems, problems
    assert sum(g == r for g, r in zip(got, ref, strict=True)) >= 3  # ties are the exception
    res = fast.generate(reqs[:1])[0]
    assert res.prefill_s > 0 and res.decode_s > 0


@pytest.mark.gpu
@pytest.mark.parametrize("loop", ["graph", "generate"])
def test_cuda_fp32_matches_cpu_fp32_reference(
    demo_bundle: ModelBundle, dynamic: TransformersBackend, loop: str
) -> None:
    """fp32 on CUDA, static cache, compiled step with CUDA graphs, through the own loop and
    through ``generate``: the same tokens as fp32 on CPU with a dynamic cache."""
    _require_cuda()
    gpu = TransformersBackend(demo_bundle.llm_dir, dtype="float32", device="cuda", decode_loop=loop)
    gpu.load()
    assert gpu.decode_loop == loop and gpu.compile
    reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=16) for p in _prompts(dynamic)]
    assert _tokens(gpu.generate(reqs)) == _tokens(dynamic.generate(reqs))
    ids = dynamic.tokenizer.encode(report_to_image_prompt("No acute cardiopulmonary process."))
    img = [GenerationRequest(prompt_ids=ids, max_new_tokens=1, mode="image")]
    assert gpu.generate(img)[0].image_codes == dynamic.generate(img)[0].image_codes


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
