"""Fixtures for the generation-engine tests: one demo bundle per session, converted to GGUF
through the CLI (``cxr-node models convert``) by the tests that need it."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.bundle import ModelBundle
from models.demo import create_demo_bundle


def engine_available() -> str | None:
    """Why llama.cpp cannot run here (``None`` when ``llama_cpp`` and ``gguf`` import)."""
    for name in ("llama_cpp", "gguf"):
        try:
            __import__(name)
        except Exception as exc:  # a missing package, or a build whose library fails to load
            return f"{name} cannot be imported ({exc}): pip install 'llm-cxr-node[llamacpp]'"
    return None


def require_engine() -> None:
    """Skip the calling test unless llama-cpp-python and gguf import."""
    reason = engine_available()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """A demo bundle (hidden 64, 2 layers, GPT-NeoX-20B tokenizer when present)."""
    return create_demo_bundle(tmp_path_factory.mktemp("engine") / "bundle")


@pytest.fixture(scope="session")
def converted_bundle(demo_bundle: ModelBundle) -> Path:
    """The demo bundle with F32 and Q8_0 GGUF files added by ``cxr-node models convert``."""
    require_engine()
    from typer.testing import CliRunner

    from node.cli import app

    runner = CliRunner()
    for quant in ("f32", "q8_0"):
        res = runner.invoke(
            app,
            ["models", "convert", str(demo_bundle.root), "--engine", "llamacpp", "--quant", quant],
        )
        assert res.exit_code == 0, res.output
    return demo_bundle.root
