"""The llama.cpp backend agrees with the transformers fp32 reference on a tiny LLM-CXR LLM."""

from __future__ import annotations

from .conftest import require_engine

require_engine()

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from models.backends.base import GenerationBackend, GenerationRequest  # noqa: E402
from models.backends.llamacpp import LlamaCppBackend, cpu_features, sample_next  # noqa: E402
from models.backends.transformers_backend import TransformersBackend  # noqa: E402
from models.gguf_convert import ConversionResult, convert_bundle_llm  # noqa: E402
from models.layout import (  # noqa: E402
    CODES_PER_IMAGE,
    IMAGE_TOKEN_OFFSET,
    VOCAB,
)
from models.prompts import report_prompt, report_to_image_prompt  # noqa: E402

from .conftest import THREADS, hf_next_logits, make_tiny_llm, task_prompts  # noqa: E402

N_AGREE = 32
Q8_PROMPTS = 64
Q8_FLOOR = 0.85


def _greedy(backend: GenerationBackend, ids: list[int]) -> list[int]:
    res = backend.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=N_AGREE)])[0]
    assert res.error is None
    return res.token_ids


def _report_ids(hf: TransformersBackend, seed: int) -> list[int]:
    codes = np.random.default_rng(seed).integers(0, 1024, CODES_PER_IMAGE).tolist()
    return hf.tokenizer.encode_with_image(report_prompt(), codes)


def test_backend_implements_protocol(engines: dict[str, LlamaCppBackend]) -> None:
    engine = engines["f16"]
    assert isinstance(engine, GenerationBackend)
    engine.warmup()
    health = engine.health()
    assert health["loaded"] and health["backend"] == "llamacpp" and health["quant"] == "f16"
    assert health["engine_version"] == f"llama-cpp-python {llama_cpp.__version__}"
    assert health["cpu_features"] == cpu_features(llama_cpp.llama_print_system_info())
    assert "LLAMAFILE" in health["cpu_features"]


def test_cpu_features_reads_only_the_cpu_section() -> None:
    text = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | CUDA : ARCHS = 890 | USE_GRAPHS = 1 | "
    assert cpu_features(text.encode()) == ["SSE3", "AVX2"]
    assert cpu_features(b"") == []


# the AVX-512 set of ggml's Skylake-X variant, which the later x86 variants build on
_AVX512 = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("no x86 flags in /proc/cpuinfo")


_INIT_SNIPPET = """
import llama_cpp
from models.backends.base import GenerationError
from models.backends.llamacpp import init_llama
try:
    print("FEATURES", " ".join(init_llama(llama_cpp)))
except GenerationError as exc:
    print("REFUSED", exc)
"""


def _run_child(
    code: str, *args: str, cwd: Path, site: Path | None = None, timeout: int = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python with the repository (after ``site``, if given, from
    which llama_cpp is then imported) on ``PYTHONPATH``."""
    repo = Path(__file__).resolve().parents[2]
    path = [str(site), str(repo)] if site is not None else [str(repo)]
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _init_in(site: Path, cwd: Path) -> str:
    """Start the backend's llama.cpp in a fresh process, importing llama_cpp from ``site``."""
    out = _run_child(_INIT_SNIPPET, cwd=cwd, site=site)
    out.check_returncode()
    return out.stdout


def test_cpu_backends_load_only_from_beside_libggml(
    tmp_path: Path, engines: dict[str, LlamaCppBackend]
) -> None:
    """The backend loads ggml's CPU variants from the directory of libggml and from nowhere
    else. Without them it refuses to start, with the fix in the message, even when the
    working directory holds files named like them (ggml's default search would load those)."""
    pkg = Path(llama_cpp.__file__).resolve().parent
    variants = sorted((pkg / "lib").glob("libggml-cpu-*.so"))
    if not variants:
        pytest.skip("llama-cpp-python is not built with GGML_BACKEND_DL (one fixed CPU backend)")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for v in variants:  # decoys where upstream ggml looks
        shutil.copy2(v, cwd / v.name)
    bare = tmp_path / "bare"
    shutil.copytree(
        pkg, bare / "llama_cpp", ignore=shutil.ignore_patterns("libggml-cpu-*", "__pycache__")
    )
    out = _init_in(bare, cwd)
    assert out.startswith("REFUSED") and "loaded no CPU backend" in out, out
    assert "scripts/build-llama-cpp.sh" in out
    # the same copy with its variants beside libggml starts, with this CPU's features
    for v in variants:
        shutil.copy2(v, bare / "llama_cpp" / "lib" / v.name)
    out = _init_in(bare, cwd)
    assert out.split() == ["FEATURES", *engines["f16"].health()["cpu_features"]], out


def test_engine_runs_the_cpu_variant_for_this_cpu(engines: dict[str, LlamaCppBackend]) -> None:
    """The node's build holds every x86 CPU variant of ggml and loads the best for this CPU
    (docs/cpu-engine.md, "One build for every x86 CPU"): its kernels use AVX2 exactly when the
    CPU has it, AVX-512 when it has the AVX-512 set ggml's Skylake-X variant needs, and the
    AVX-512 BF16 dot products when it also has VNNI and BF16. A build fixed at AVX2 fails here
    on an AVX-512 machine."""
    flags = _cpu_flags()
    feats = set(engines["f16"].health()["cpu_features"])
    avx512 = flags >= _AVX512
    assert ("AVX2" in feats) == ({"avx2", "fma", "f16c", "bmi2"} <= flags)
    assert ("AVX512" in feats) == avx512
    assert ("AVX512_BF16" in feats) == (avx512 and {"avx512_vnni", "avx512_bf16"} <= flags)


def test_installed_engine_is_the_node_build() -> None:
    """setup.sh installs llama-cpp-python through scripts/build-llama-cpp.sh: the version the
    script pins (stock, or with the patched flavour's local label), with the build's key
    beside the package."""
    script = Path(__file__).resolve().parents[2] / "scripts/build-llama-cpp.sh"
    pinned = re.search(r"^VER=(\S+)$", script.read_text(), re.M)
    assert pinned is not None
    assert llama_cpp.__version__.split("+")[0] == pinned.group(1), (
        f"llama-cpp-python {llama_cpp.__version__} is not the node's build of "
        f"{pinned.group(1)}: run scripts/build-llama-cpp.sh"
    )
    # the build's key (source hash, flavour, CMAKE_ARGS, Python), which lets a re-run tell
    # builds apart
    marker = Path(llama_cpp.__file__).parent / ".cxrnode-build"
    assert re.fullmatch(r"[0-9a-f]{16}", marker.read_text().strip()), marker


_AMX_SNIPPET = """
import ctypes, json, sys
import llama_cpp
import torch
from models.backends.llamacpp import LlamaCppBackend, init_llama
from models.backends.base import GenerationRequest

init_llama(llama_cpp)
lines = []
def _keep(level, text, _user):
    lines.append((text or b"").decode("utf-8", "replace"))
keep = llama_cpp.llama_log_callback(_keep)
llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))  # see where the weights went
engine = LlamaCppBackend(sys.argv[1], threads=2, max_batch=1, prefix_cache=False)
engine.load()
ids = json.loads(sys.argv[2])
a = torch.randn(256, 512, dtype=torch.bfloat16)
b = torch.randn(512, 512, dtype=torch.bfloat16)
rounds = []
for _ in range(3):
    res = engine.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=8)])[0]
    rounds.append(res.token_ids)
    float((a @ b).float().sum())  # oneDNN on the same threads (AMX where the CPU has it)
print(json.dumps({"rounds": rounds, "amx": any("AMX model buffer" in t for t in lines)}))
"""


def test_q8_0_runs_between_torch_matmuls_on_the_same_threads(
    ggufs: dict[str, ConversionResult], engines: dict[str, LlamaCppBackend], tmp_path: Path
) -> None:
    """A worker process holds PyTorch and llama.cpp, which share one OpenMP pool. On CPUs with
    AMX, ggml keeps Q8_0 weights in its AMX layout and prefills with tile instructions, as
    oneDNN does for torch's bf16 matmuls. Stock llama-cpp-python 0.3.36 built with GCC 12
    crashed there (SIGILL at its first tile load, and again once torch had used the tiles on
    the same threads); the stock build therefore installs without that variant and the patched
    flavour mends both (docs/cpu-engine.md, "Intel Xeon with AMX"). Run in a child process, so
    that a crash fails this test only."""
    ids = list(range(100, 164))  # 64 prompt ids: prefill takes the tile kernels, not the GEMV
    out = _run_child(_AMX_SNIPPET, str(ggufs["q8_0"].path), repr(ids), cwd=tmp_path, timeout=300)
    assert out.returncode == 0, f"child exited {out.returncode}: {out.stderr[-2000:]}"
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = engines["q8_0"].generate([GenerationRequest(prompt_ids=ids, max_new_tokens=8)])[0]
    assert got["rounds"] == [want.token_ids] * 3
    # ggml's sapphirerapids variant, the one with AMX, loads exactly where the CPU has its set
    # and the build installed it (the stock flavour leaves it out unless CXR_NODE_LLAMACPP_AMX=on)
    flags = _cpu_flags()
    amx_variant = "AMX_INT8" in engines["q8_0"].health()["cpu_features"]
    amx_built = (Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu-sapphirerapids.so").exists()
    sapphire = {"avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"}
    assert amx_variant == (amx_built and flags >= _AVX512 | sapphire)
    # and its tile kernels ran, unless the kernel refused the AMX state (ggml says so)
    assert got["amx"] == amx_variant or "AMX is not ready" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_greedy_first_32_tokens_match_transformers_fp32(
    quant: str, engines: dict[str, LlamaCppBackend], hf: TransformersBackend
) -> None:
    prompts = [
        _report_ids(hf, 7),
        _report_ids(hf, 8),
        hf.tokenizer.encode(report_to_image_prompt("Clear lungs.")),
    ]
    for ids in prompts:
        ref = _greedy(hf, ids)
        got = _greedy(engines[quant], ids)
        assert len(ref) == N_AGREE
        prefix = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), None)
        assert got == ref, f"{quant}: first mismatch at generated token {prefix}"


@pytest.mark.slow
def test_q8_0_top1_next_token_agreement(
    engines: dict[str, LlamaCppBackend], hf: TransformersBackend
) -> None:
    prompts = task_prompts(hf, Q8_PROMPTS)
    agree = {q: 0 for q in engines}
    for ids in prompts:
        ref = int(np.argmax(hf_next_logits(hf, ids)[:IMAGE_TOKEN_OFFSET]))
        for q, engine in engines.items():
            agree[q] += int(np.argmax(engine.next_token_logits(ids)[:IMAGE_TOKEN_OFFSET])) == ref
    rates = {q: n / len(prompts) for q, n in agree.items()}
    print(
        f"\ntop-1 next-token agreement with transformers fp32 over {len(prompts)} prompts: {rates}"
    )
    assert rates["f32"] == 1.0
    assert rates["f16"] >= 0.95
    assert rates["q8_0"] >= Q8_FLOOR


def test_image_ids_enter_exactly(
    engines: dict[str, LlamaCppBackend], hf: TransformersBackend
) -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 1024, CODES_PER_IMAGE).tolist()
    ids = hf.tokenizer.encode_with_image(report_prompt(), codes)
    open_at = ids.index(hf.tokenizer.image_open_id)
    assert ids[open_at + 1 : open_at + 1 + CODES_PER_IMAGE] == [
        IMAGE_TOKEN_OFFSET + c for c in codes
    ]
    ref = hf_next_logits(hf, ids)
    got = engines["f32"].next_token_logits(ids)
    assert got.shape == (VOCAB,)
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=0)
    # other codes give other logits: image ids are distinct embeddings, not one placeholder
    codes2 = [(c + 1) % 1024 for c in codes]
    other = engines["f32"].next_token_logits(
        hf.tokenizer.encode_with_image(report_prompt(), codes2)
    )
    np.testing.assert_allclose(
        other,
        hf_next_logits(hf, hf.tokenizer.encode_with_image(report_prompt(), codes2)),
        atol=2e-3,
        rtol=0,
    )
    assert np.abs(other - got).max() > 1e-2


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_constrained_report_to_cxr_gives_256_codes(
    quant: str, engines: dict[str, LlamaCppBackend], hf: TransformersBackend
) -> None:
    ids = hf.tokenizer.encode(report_to_image_prompt("No acute cardiopulmonary process."))
    req = GenerationRequest(prompt_ids=ids, max_new_tokens=1, mode="image")
    res = engines[quant].generate([req])[0]
    assert res.stop_reason == "image_complete" and res.error is None
    assert res.image_codes is not None and len(res.image_codes) == CODES_PER_IMAGE
    assert all(0 <= c < 1024 for c in res.image_codes)
    assert res.token_ids[:CODES_PER_IMAGE] == [IMAGE_TOKEN_OFFSET + c for c in res.image_codes]
    assert (
        res.token_ids[-1] == hf.tokenizer.image_close_id and res.new_tokens == CODES_PER_IMAGE + 1
    )
    assert res.prompt_tokens == len(ids) + 1  # '<' appended
    assert res.prefill_s > 0 and res.decode_s > 0
    # sampled image decoding is constrained too
    sampled = engines[quant].generate(
        [GenerationRequest(prompt_ids=ids, max_new_tokens=1, mode="image", greedy=False, seed=5)]
    )[0]
    assert sampled.image_codes is not None and len(sampled.image_codes) == CODES_PER_IMAGE


@pytest.mark.slow
def test_constrained_codes_match_transformers_f32(
    engines: dict[str, LlamaCppBackend], hf: TransformersBackend
) -> None:
    ids = hf.tokenizer.encode(report_to_image_prompt("Small right pleural effusion."))
    req = GenerationRequest(prompt_ids=ids, max_new_tokens=1, mode="image")
    got, ref = engines["f32"].generate([req])[0], hf.generate([req])[0]
    assert got.image_codes == ref.image_codes
    assert got.token_ids == ref.token_ids


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_batched_equals_unbatched(
    engines: dict[str, LlamaCppBackend], hf: TransformersBackend, quant: str
) -> None:
    """A batch's greedy tokens are each request's alone, in F16 and in Q8_0, whose steps of
    several rows take other matrix kernels than a one-row step."""
    engine = engines[quant]
    reqs = [
        GenerationRequest(prompt_ids=_report_ids(hf, 11), max_new_tokens=20),
        GenerationRequest(
            prompt_ids=hf.tokenizer.encode("### Instruction:\nSay hi\n\n### Response:\n"),
            max_new_tokens=12,
        ),
        GenerationRequest(
            prompt_ids=hf.tokenizer.encode(report_to_image_prompt("Cardiomegaly.")),
            max_new_tokens=1,
            mode="image",
        ),
        GenerationRequest(prompt_ids=_report_ids(hf, 12), max_new_tokens=5),
        GenerationRequest(prompt_ids=_report_ids(hf, 13), max_new_tokens=7),  # 5th: a second round
    ]
    together = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.new_tokens for r in together] == [20, 12, CODES_PER_IMAGE + 1, 5, 7]


def test_batch_where_a_middle_sequence_ends_first(
    engines: dict[str, LlamaCppBackend], hf: TransformersBackend
) -> None:
    """When the middle one of three studies ends first, the others decode on as they would
    alone, and its slot's cached K/V end at its last fed token."""
    engine = engines["q8_0"]
    llama = engine._llama
    mem = llama.llama_get_memory(engine._ctx)
    prompts = [_report_ids(hf, seed) for seed in (21, 22, 23)]
    for lengths in ((16, 4, 16), (16, 16, 4)):
        engine.clear_cache()  # slots 0, 1, 2 in the requests' order
        reqs = [
            GenerationRequest(prompt_ids=p, max_new_tokens=n)
            for p, n in zip(prompts, lengths, strict=True)
        ]
        together = engine.generate(reqs)
        assert [r.new_tokens for r in together] == list(lengths)
        # the shortest one's K/V end at its last fed token: the prompt and 3 of its 4
        short = lengths.index(4)
        assert llama.llama_memory_seq_pos_max(mem, short) == len(prompts[short]) + 2
        alone = [engine.generate([r])[0] for r in reqs]
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_invalid_requests_fail_alone(engines: dict[str, LlamaCppBackend]) -> None:
    engine = engines["q8_0"]
    reqs = [
        GenerationRequest(prompt_ids=[1, 2, 3], max_new_tokens=2),
        GenerationRequest(prompt_ids=[VOCAB], max_new_tokens=2),
        GenerationRequest(prompt_ids=[5] * 1020, max_new_tokens=10),  # beyond n_ctx 1024
        GenerationRequest(prompt_ids=[], max_new_tokens=2),
    ]
    out = engine.generate(reqs)
    assert [r.stop_reason for r in out] == ["max_new_tokens", "error", "error", "error"]
    assert "outside" in (out[1].error or "") and "exceed" in (out[2].error or "")
    assert out[0].new_tokens == 2 and all(t < IMAGE_TOKEN_OFFSET for t in out[0].token_ids)


def test_seeded_sampling_is_reproducible(engines: dict[str, LlamaCppBackend]) -> None:
    engine = engines["f16"]

    def run(seed: int) -> list[int]:
        req = GenerationRequest(
            prompt_ids=[100, 200, 300], max_new_tokens=16, greedy=False, seed=seed
        )
        return engine.generate([req])[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)
    logits = np.zeros(10, dtype=np.float32)
    logits[3], logits[7] = 5.0, 4.0
    rng = np.random.default_rng(0)
    picks = {
        sample_next(logits, greedy=False, rng=rng, temperature=1.0, top_p=1.0, top_k=2)
        for _ in range(200)
    }
    assert picks == {3, 7}
    picks = {
        sample_next(logits, greedy=False, rng=rng, temperature=1.0, top_p=0.5, top_k=0)
        for _ in range(50)
    }
    assert picks == {3}


def test_stops_at_end_marker(tmp_path: Path) -> None:
    llm = make_tiny_llm(tmp_path / "llm", always_end=True)
    gguf_file: ConversionResult = convert_bundle_llm(llm, tmp_path / "end.gguf", quant="f16")
    engine = LlamaCppBackend(gguf_file.path, threads=THREADS, max_batch=2)
    hf = TransformersBackend(llm, dtype="float32")
    req = GenerationRequest(prompt_ids=[10, 11, 12], max_new_tokens=8)
    got, ref = engine.generate([req])[0], hf.generate([req])[0]
    assert got.stop_reason == ref.stop_reason == "end"
    assert got.token_ids == ref.token_ids == [] and got.text == ""
    # image mode ignores the stop tokens: still 256 codes
    img = engine.generate([GenerationRequest(prompt_ids=[10, 11], max_new_tokens=1, mode="image")])[
        0
    ]
    assert img.image_codes is not None and len(img.image_codes) == CODES_PER_IMAGE
    engine.close()


def test_bf16_file_runs_and_agrees_on_top1(
    tiny_llm: Path, hf: TransformersBackend, tmp_path: Path
) -> None:
    res = convert_bundle_llm(tiny_llm, tmp_path / "bf16.gguf", quant="bf16")
    assert res.tensor_types == {"BF16": 10, "F32": 18}
    engine = LlamaCppBackend(res.path, threads=THREADS, max_batch=1)
    prompts = task_prompts(hf, 16, seed=99)
    agree = sum(
        int(np.argmax(engine.next_token_logits(p)[:IMAGE_TOKEN_OFFSET]))
        == int(np.argmax(hf_next_logits(hf, p)[:IMAGE_TOKEN_OFFSET]))
        for p in prompts
    )
    print(f"\nBF16 top-1 agreement: {agree}/{len(prompts)}")
    assert agree / len(prompts) >= 0.9
    engine.close()


def _cache_rounds(hf: TransformersBackend) -> tuple[list[list[GenerationRequest]], list[int]]:
    """Five rounds of report requests that exercise the prefix cache, and the number of
    prompt ids each round should take from it."""
    a, b, c = _report_ids(hf, 21), _report_ids(hf, 22), _report_ids(hf, 23)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert 20 < shared < len(a) - CODES_PER_IMAGE  # the template, up to and including "<"
    rounds = [
        [GenerationRequest(prompt_ids=a, max_new_tokens=12)],
        [GenerationRequest(prompt_ids=b, max_new_tokens=12)],  # reuses a's template
        [  # b: whole prompt cached in slot 0; a: into the empty slot 1
            GenerationRequest(prompt_ids=b, max_new_tokens=6),
            GenerationRequest(prompt_ids=a, max_new_tokens=5),
        ],
        [  # slots chosen by longest shared prefix: a's start finds slot 1
            GenerationRequest(prompt_ids=c, max_new_tokens=9),
            GenerationRequest(prompt_ids=a[: shared + 5], max_new_tokens=4),
        ],
        [GenerationRequest(prompt_ids=b[:shared], max_new_tokens=3)],  # shorter than cached
    ]
    # round 3 re-runs the last prompt id for its logits
    return rounds, [0, shared, len(b) - 1, shared + shared + 4, shared - 1]


def _same_results_and_reuse(
    engine: LlamaCppBackend, plain: LlamaCppBackend, rounds: list[list[GenerationRequest]]
) -> list[int]:
    """Run each round on both engines, require identical tokens, and return how many prompt
    ids ``engine`` took from its prefix cache per round."""
    reused = []
    for reqs in rounds:
        before = engine.health()["prompt_tokens_reused"]
        got = engine.generate(reqs)
        ref = plain.generate(reqs)
        assert all(r.error is None for r in got)
        assert [r.token_ids for r in got] == [r.token_ids for r in ref]
        reused.append(engine.health()["prompt_tokens_reused"] - before)
    return reused


def test_prefix_cache_reuses_template_and_changes_nothing(
    ggufs: dict[str, ConversionResult], hf: TransformersBackend
) -> None:
    """Report prompts for different studies share the template before the image: the second
    study prefills only from the first differing id, and every result (F32, exact) equals
    what a backend without the cache gives, in batches and with a prompt that is a prefix
    of the cached tokens."""
    cached = LlamaCppBackend(ggufs["f32"].path, threads=THREADS, kv_type="f32", max_batch=2)
    plain = LlamaCppBackend(
        ggufs["f32"].path, threads=THREADS, kv_type="f32", max_batch=2, prefix_cache=False
    )
    rounds, expected_reuse = _cache_rounds(hf)
    a = rounds[0][0].prompt_ids
    try:
        assert _same_results_and_reuse(cached, plain, rounds) == expected_reuse
        assert plain.health()["prompt_tokens_reused"] == 0
        # a direct logits query clears the cache; the next call starts from nothing
        cached.next_token_logits(a)
        before = cached.health()["prompt_tokens_reused"]
        cached.generate([GenerationRequest(prompt_ids=a, max_new_tokens=2)])
        assert cached.health()["prompt_tokens_reused"] == before
    finally:
        cached.close()
        plain.close()


def test_prefix_cache_holds_the_generated_tokens(
    ggufs: dict[str, ConversionResult], hf: TransformersBackend
) -> None:
    """A sequence's cache also holds the tokens it fed while decoding: a prompt that
    continues an earlier prompt and its output reuses every id but the last, and its result
    equals a backend's without the cache. Each token after the first costs one decode
    step."""
    cached = LlamaCppBackend(ggufs["f32"].path, threads=THREADS, kv_type="f32", max_batch=2)
    plain = LlamaCppBackend(
        ggufs["f32"].path, threads=THREADS, kv_type="f32", max_batch=2, prefix_cache=False
    )
    a, new = _report_ids(hf, 61), 24
    try:
        steps = cached.health()["decode_steps"]
        out_a = cached.generate([GenerationRequest(prompt_ids=a, max_new_tokens=new)])[0]
        assert out_a.new_tokens == new
        assert cached.health()["decode_steps"] - steps == new - 1
        cont = [*a, *out_a.token_ids[:10]]
        before = cached.health()["prompt_tokens_reused"]
        req = GenerationRequest(prompt_ids=cont, max_new_tokens=new)
        got = cached.generate([req])[0]
        assert cached.health()["prompt_tokens_reused"] - before == len(cont) - 1
        assert got.token_ids == plain.generate([req])[0].token_ids
    finally:
        cached.close()
        plain.close()


def _two_file_bundle(root: Path, files: dict[str, Path]) -> Path:
    """A folder whose manifest lists converted files by quantisation, as a bundle's does."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    engines = {q: {"path": str(p)} for q, p in files.items()}
    (root / "manifest.json").write_text(json.dumps({"engines": {"llamacpp": engines}}))
    return root


def test_prefill_file_hands_its_kv_to_the_decode_file(
    ggufs: dict[str, ConversionResult], hf: TransformersBackend, tmp_path: Path
) -> None:
    """With the same F32 weights in both contexts, prefilling in one and decoding in the
    other gives exactly what one context gives, through the prefix-cache rounds: the K/V
    arrive whole, the cache lives in the prefill context, and a decode slot's earlier
    content never leaks into the next request."""
    import shutil

    twin = tmp_path / "twin-f32.gguf"  # the same weights under a second name
    shutil.copyfile(ggufs["f32"].path, twin)
    root = _two_file_bundle(tmp_path / "bundle", {"f32": ggufs["f32"].path, "f16": twin})
    hybrid = LlamaCppBackend(
        root, quant="f32", prefill_quant="f16", threads=THREADS, kv_type="f32", max_batch=2
    )
    plain = LlamaCppBackend(
        ggufs["f32"].path, threads=THREADS, kv_type="f32", max_batch=2, prefix_cache=False
    )
    rounds, expected_reuse = _cache_rounds(hf)
    image_req = GenerationRequest(
        prompt_ids=hf.tokenizer.encode(report_to_image_prompt("Cardiomegaly.")),
        max_new_tokens=1,
        mode="image",
    )
    try:
        reused = _same_results_and_reuse(hybrid, plain, [*rounds, [image_req, *rounds[1]]])
        assert reused[:5] == expected_reuse
        health = hybrid.health()
        assert health["prefill_quant"] == "f16" and health["prefill_model_path"] == str(twin)
        assert health["quant"] == "f32"
    finally:
        hybrid.close()
        plain.close()


def test_f32_prefill_q8_0_decode(
    ggufs: dict[str, ConversionResult],
    engines: dict[str, LlamaCppBackend],
    hf: TransformersBackend,
    tmp_path: Path,
) -> None:
    """The hybrid the option is for (a wider prefill file, a smaller decode file): the first
    new token is the prefill file's greedy choice, the second is the decode file's (up to a
    near tie), batches give what single requests give, and image mode still yields 256
    codes."""
    root = _two_file_bundle(
        tmp_path / "bundle", {"q8_0": ggufs["q8_0"].path, "f32": ggufs["f32"].path}
    )
    hybrid = LlamaCppBackend(root, quant="q8_0", prefill_quant="f32", threads=THREADS, max_batch=4)
    prompts = [_report_ids(hf, 40 + k) for k in range(4)]
    try:
        hybrid.load()
        assert hybrid.kv_type == "f16"  # the decode file's KV type, shared by both contexts
        reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=10) for p in prompts]
        together = hybrid.generate(reqs)
        alone = [hybrid.generate([r])[0] for r in reqs]
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]
        for p, r in zip(prompts, together, strict=True):
            assert r.error is None and r.prompt_tokens == len(p)
            first = engines["f32"].generate([GenerationRequest(prompt_ids=p, max_new_tokens=1)])
            assert r.token_ids[0] == first[0].token_ids[0]
        # the decode file continues from the prefill file's K/V: the q8_0 file's own next
        # logits after prompt + first token pick the second token, up to a near tie (this
        # reference computed the prompt's K/V with Q8_0 weights, the hybrid with F32 ones;
        # the Q8_0 logit error on this model is up to 8e-3)
        p, r = prompts[0], together[0]
        if r.new_tokens > 1:
            nxt = engines["q8_0"].next_token_logits([*p, r.token_ids[0]])
            nxt[IMAGE_TOKEN_OFFSET:] = -np.inf
            assert int(np.argmax(nxt)) == r.token_ids[1] or np.isclose(
                np.sort(nxt)[-1], np.sort(nxt)[-2], rtol=0, atol=1e-2
            )
        img = hybrid.generate(
            [
                GenerationRequest(
                    prompt_ids=hf.tokenizer.encode(report_to_image_prompt("Effusion.")),
                    max_new_tokens=1,
                    mode="image",
                )
            ]
        )[0]
        assert img.image_codes is not None and len(img.image_codes) == CODES_PER_IMAGE
    finally:
        hybrid.close()


def test_prefill_file_errors(ggufs: dict[str, ConversionResult], tmp_path: Path) -> None:
    from models.backends.base import GenerationError

    with pytest.raises(GenerationError, match="needs a model bundle"):
        LlamaCppBackend(ggufs["q8_0"].path, prefill_quant="f32", threads=THREADS).load()
    root = _two_file_bundle(tmp_path / "b1", {"q8_0": ggufs["q8_0"].path})
    with pytest.raises(GenerationError, match=r"no llama\.cpp f32 model"):
        LlamaCppBackend(root, quant="q8_0", prefill_quant="f32", threads=THREADS).load()
    root = _two_file_bundle(
        tmp_path / "b2", {"q8_0": ggufs["q8_0"].path, "f16": ggufs["q8_0"].path}
    )
    with pytest.raises(GenerationError, match="is the decode file"):
        LlamaCppBackend(root, quant="q8_0", prefill_quant="f16", threads=THREADS).load()
    narrow = convert_bundle_llm(
        make_tiny_llm(tmp_path / "llm32", hidden=32), tmp_path / "narrow.gguf", quant="f32"
    )
    root = _two_file_bundle(tmp_path / "b3", {"q8_0": ggufs["q8_0"].path, "f32": narrow.path})
    engine = LlamaCppBackend(root, quant="q8_0", prefill_quant="f32", threads=THREADS)
    with pytest.raises(GenerationError, match=r"not the same model: gptneox\.embedding_length"):
        engine.load()
    assert engine.health()["loaded"] is False


def test_settings_are_checked(ggufs: dict[str, ConversionResult]) -> None:
    with pytest.raises(ValueError, match="must hold max_batch"):
        LlamaCppBackend(ggufs["f32"].path, max_batch=8, n_batch=4)
    with pytest.raises(ValueError, match=r"n_ctx must be in 16\.\.32768"):
        LlamaCppBackend(ggufs["f32"].path, n_ctx=8)
