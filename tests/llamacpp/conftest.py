"""Fixtures for the llama.cpp engine tests: a tiny GPT-NeoX in the LLM-CXR layout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.backends.llamacpp import LlamaCppBackend
from models.backends.transformers_backend import TransformersBackend
from models.gguf_convert import ConversionResult, convert_bundle_llm
from models.layout import END_ID


def require_engine() -> None:
    """Skip the calling test module unless llama-cpp-python and gguf import."""
    for name in ("llama_cpp", "gguf"):
        try:
            __import__(name)
        except Exception as exc:  # a missing package, or a build whose library fails to load
            pytest.skip(
                f"{name} cannot be imported ({exc}): pip install 'llm-cxr-node[llamacpp]'",
                allow_module_level=True,
            )


# The CI machine has 2 shared cores: one llama.cpp thread avoids spin-wait contention.
THREADS = 1


def make_tiny_llm(out: Path, *, seed: int = 0, hidden: int = 64, always_end: bool = False) -> Path:
    """Save a tiny random ``GPTNeoXForCausalLM`` (vocab 51305, untied, rotary 0.25) with the
    LLM-CXR tokenizer at ``out``.

    ``always_end`` rigs the final layer norm and ``embed_out`` so that ``### End`` is the
    argmax at every position (to test stopping).
    """
    import torch
    from transformers import GPTNeoXForCausalLM

    from models.demo import demo_gpt_neox_config
    from models.text import build_llmcxr_tokenizer, save_tokenizer_dir

    cfg = demo_gpt_neox_config(hidden=hidden, layers=2, heads=4)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(cfg).eval()
    if always_end:
        with torch.no_grad():
            direction = torch.randn(hidden)
            direction = 10 * direction / direction.norm()
            model.gpt_neox.final_layer_norm.weight.zero_()
            model.gpt_neox.final_layer_norm.bias.copy_(direction)
            model.get_output_embeddings().weight[END_ID].copy_(direction)
    model.save_pretrained(str(out))
    save_tokenizer_dir(build_llmcxr_tokenizer(), out)
    return out


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLM folder (hidden 64, 2 layers, 4 heads, demo initialisation)."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="session")
def ggufs(tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ConversionResult]:
    """The tiny LLM converted to F32, F16 and Q8_0."""
    out = tmp_path_factory.mktemp("gguf")
    return {
        q: convert_bundle_llm(tiny_llm, out / f"tiny-{q}.gguf", quant=q)
        for q in ("f32", "f16", "q8_0")
    }  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def hf(tiny_llm: Path) -> TransformersBackend:
    """The transformers fp32 reference backend."""
    backend = TransformersBackend(tiny_llm, dtype="float32")
    backend.load()
    return backend


@pytest.fixture(scope="session")
def engines(ggufs: dict[str, ConversionResult]) -> Iterator[dict[str, LlamaCppBackend]]:
    """llama.cpp backends per quantisation (F32 with an F32 KV cache for exact agreement)."""
    out = {
        q: LlamaCppBackend(r.path, threads=THREADS, kv_type="f32" if q == "f32" else "f16")
        for q, r in ggufs.items()
    }
    for b in out.values():
        b.load()
    yield out
    for b in out.values():
        b.close()


def hf_next_logits(hf: TransformersBackend, ids: list[int]) -> np.ndarray:
    """Reference next-token logits (fp32) of ``ids``."""
    import torch

    with torch.inference_mode():
        out: Any = hf.model(torch.tensor([ids], dtype=torch.long))
    return np.asarray(out.logits[0, -1].float().numpy())


def task_prompts(hf: TransformersBackend, n: int, *, seed: int = 1234) -> list[list[int]]:
    """A fixed prompt set: CXR->report and VQA prompts with random image codes, and random
    text-token sequences of random length."""
    from models.prompts import report_prompt, vqa_prompt

    rng = np.random.default_rng(seed)
    tok = hf.tokenizer
    questions = ["Is there a pleural effusion?", "Is the heart enlarged?", "Any pneumothorax?"]
    prompts: list[list[int]] = []
    for i in range(n):
        if i % 2 == 0:
            codes = rng.integers(0, 1024, 256).tolist()
            text = report_prompt() if i % 4 == 0 else vqa_prompt(questions[i % 3])
            prompts.append(tok.encode_with_image(text, codes))
        else:
            prompts.append(rng.integers(2, 50281, int(rng.integers(8, 200))).tolist())
    return prompts


def start_engine(gguf: Path, port: int) -> subprocess.Popen[bytes]:
    """``cxr-node engine`` (llama_cpp.server's app) on ``gguf`` (a file or a converted
    bundle): F32 KV cache, one thread; returns once it answers ``GET /v1/models``."""
    cmd = [
        sys.executable,
        "-m",
        "node.cli",
        "engine",
        str(gguf),
        "--port",
        str(port),
        "--threads",
        "1",
        "--kv-type",
        "f32",  # as the in-process reference
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"cxr-node engine exited {proc.returncode}: {err[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("cxr-node engine did not answer within 90 s")
