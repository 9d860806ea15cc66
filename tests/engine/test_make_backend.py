"""``make_backend`` / ``LLMCXR.from_bundle`` take the node's setting names for both backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.backends import OPTION_ALIASES, backend_options, make_backend
from models.backends.base import GenerationRequest
from models.backends.llamacpp import LlamaCppBackend
from models.backends.transformers_backend import TransformersBackend
from models.bundle import ModelBundle
from node.runtime.modelhost import ModelHost
from node.settings import Settings

SETTING_NAMES = (
    "backend_dtype",
    "backend_quant",
    "backend_prefill_quant",
    "backend_threads",
    "backend_device",
)


def _from_settings(settings: Settings) -> dict[str, object]:
    """What the model host passes: the settings' backend fields, as named there."""
    return {name: getattr(settings, name) for name in SETTING_NAMES}


def test_aliases_cover_the_settings_fields() -> None:
    for name in SETTING_NAMES:
        assert name in Settings.model_fields
        assert name in OPTION_ALIASES


def test_backend_options_mapping() -> None:
    opts = {
        "backend_dtype": "bfloat16",
        "backend_quant": "q8_0",
        "backend_prefill_quant": "f16",
        "backend_threads": 3,
        "backend_device": "cpu",
        "worker_batch_size": 4,
        "cache": "static",
    }
    assert backend_options("transformers", opts) == {
        "dtype": "bfloat16",
        "threads": 3,
        "device": "cpu",
        "max_batch": 4,
        "cache": "static",
    }
    assert backend_options("llamacpp", {**opts, "cache": None, "kv_type": "f16"}) == {
        "quant": "q8_0",
        "prefill_quant": "f16",
        "threads": 3,
        "device": "cpu",
        "max_batch": 4,
        "kv_type": "f16",
    }
    # None means "the backend's default"; both spellings of one option must agree
    assert backend_options("llamacpp", {"backend_quant": None, "threads": None}) == {}
    assert backend_options("transformers", {"dtype": "float32", "backend_dtype": "float32"}) == {
        "dtype": "float32"
    }
    with pytest.raises(ValueError, match="given twice"):
        backend_options("transformers", {"dtype": "float32", "backend_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="unknown generation backend"):
        backend_options("vllm", {})


def test_make_backend_transformers_from_settings(demo_bundle: ModelBundle) -> None:
    settings = Settings(
        backend="transformers", backend_dtype="float32", backend_quant="q8_0", backend_threads=1
    )
    backend = make_backend(settings.backend, demo_bundle.llm_dir, **_from_settings(settings))
    assert isinstance(backend, TransformersBackend)
    assert backend.health()["dtype"] == "float32"
    assert (backend.threads, backend.device, backend.cache) == (1, "cpu", "dynamic")


def test_node_backend_options_pass_the_worker_batch_as_warmup_batch(
    demo_bundle: ModelBundle,
) -> None:
    """The node warms up (compiles, on a GPU) the batch buckets its worker will send."""
    from node.runtime.modelhost import backend_options as node_backend_options

    opts = node_backend_options(Settings(backend="transformers", worker_batch_size=3))
    assert (opts["max_batch"], opts["warmup_batch"]) == (8, 3)
    backend = make_backend("transformers", demo_bundle.llm_dir, **opts)
    assert isinstance(backend, TransformersBackend) and backend.warmup_batch == 3
    assert "warmup_batch" not in node_backend_options(Settings(backend="llamacpp"))


def test_make_backend_rejects_unknown_options(demo_bundle: ModelBundle) -> None:
    with pytest.raises(ValueError, match="transformers"):
        make_backend("transformers", demo_bundle.llm_dir, kv_type="f16")
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_backend("vllm", demo_bundle.llm_dir)
    with pytest.raises(ValueError, match="dtype must be"):
        make_backend("transformers", demo_bundle.llm_dir, backend_dtype="int4")


def test_make_backend_llamacpp_from_settings(converted_bundle: Path) -> None:
    bundle = ModelBundle.open(converted_bundle)
    settings = Settings(backend="llamacpp", backend_quant="f32", backend_threads=1)
    assert settings.backend_dtype == "auto"  # a transformers option: dropped for llama.cpp
    backend = make_backend(settings.backend, bundle.llm_dir, **_from_settings(settings))
    assert isinstance(backend, LlamaCppBackend)
    backend.load()
    try:
        health = backend.health()
        assert health["quant"] == "f32" and health["threads"] == 1 and health["kv_type"] == "f32"
        assert health["model_path"].endswith("engines/llamacpp/llm-f32.gguf")
    finally:
        backend.close()
    # without a quantisation the bundle's preferred file (q8_0) is chosen
    default = make_backend("llamacpp", bundle.llm_dir, backend_quant=None, backend_threads=1)
    default.load()
    try:
        assert default.health()["quant"] == "q8_0"
        assert default.health()["kv_type"] == "f16"
    finally:
        default.close()  # type: ignore[attr-defined]


def test_node_settings_select_a_prefill_file(converted_bundle: Path) -> None:
    """CXR_NODE_BACKEND_PREFILL_QUANT: the node prefills with one converted file and
    decodes with another; a transformers node ignores the setting."""
    from node.runtime.modelhost import backend_options as node_backend_options

    settings = Settings(
        backend="llamacpp", backend_quant="q8_0", backend_prefill_quant="f32", backend_threads=1
    )
    opts = node_backend_options(settings)
    assert (opts["quant"], opts["prefill_quant"]) == ("q8_0", "f32")
    backend = make_backend("llamacpp", ModelBundle.open(converted_bundle).llm_dir, **opts)
    assert isinstance(backend, LlamaCppBackend)
    backend.load()
    try:
        health = backend.health()
        assert health["prefill_model_path"].endswith("engines/llamacpp/llm-f32.gguf")
        assert health["model_path"].endswith("engines/llamacpp/llm-q8_0.gguf")
        res = backend.generate([GenerationRequest(prompt_ids=[5, 6, 7], max_new_tokens=4)])[0]
        assert res.error is None and res.new_tokens >= 1
    finally:
        backend.close()
    hf_opts = node_backend_options(
        Settings(backend="transformers", backend_prefill_quant="f32", backend_threads=1)
    )
    assert "prefill_quant" not in hf_opts


def test_from_bundle_with_setting_names_runs_both_backends(converted_bundle: Path) -> None:
    """What the model host does: same bundle, both backends, options named as in settings."""
    import numpy as np

    from models.runtime import LLMCXR

    x = np.zeros((3, 256, 256), dtype=np.float32)
    texts = {}
    for name, quant in (("transformers", None), ("llamacpp", "f32")):
        settings = Settings(
            backend=name, backend_dtype="float32", backend_quant=quant, backend_threads=1
        )
        model = LLMCXR.from_bundle(
            converted_bundle, backend=settings.backend, backend_options=_from_settings(settings)
        )
        draft = model.report(x, greedy=True, max_new_tokens=16)
        assert draft.settings["backend"] == name
        # the draft records the precision that produced it
        if name == "llamacpp":
            assert draft.settings["quant"] == "f32" and "prefill_quant" not in draft.settings
        else:
            assert draft.settings["dtype"] == "float32" and "quant" not in draft.settings
        assert draft.timings["tokens"] == 16
        texts[name] = draft.text
    assert texts["llamacpp"] == texts["transformers"]


def test_model_host_reports_the_llamacpp_build(converted_bundle: Path, tmp_path: Path) -> None:
    """``/ready`` (``ModelHost.info``) names the engine build and the CPU kernels in use."""
    import llama_cpp

    from node.settings import load_settings

    settings = load_settings(
        None,
        database_url=f"sqlite:///{tmp_path / 'x.sqlite3'}",
        spool_dir=tmp_path,
        model_dir=converted_bundle,
        backend="llamacpp",
        backend_quant="q8_0",
        backend_threads=1,
        min_free_disk_mb=0,
        api_enabled=False,
    )
    host = ModelHost(settings)
    host.start()
    try:
        assert host.wait_ready(60), host.error
        info = host.info()
        assert info["backend"] == "llamacpp" and info["quant"] == "q8_0"
        assert info["engine_version"] == f"llama-cpp-python {llama_cpp.__version__}"
        assert info["cpu_features"] and "LLAMAFILE" in info["cpu_features"]
        assert info["cpu_features"] == host.runtime.backend.health()["cpu_features"]
    finally:
        host.stop()


def test_removed_speculation_setting_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configuration that still sets backend_speculative (speculative decoding was removed)
    is refused with a message that names the setting and says so, from the TOML file as
    from the environment."""
    from node.settings import CONFIG_ENV, ConfigError, load_settings

    monkeypatch.delenv(CONFIG_ENV, raising=False)
    toml = tmp_path / "node.toml"
    toml.write_text('backend = "llamacpp"\nbackend_speculative = 4\n')
    with pytest.raises(ConfigError, match=r"^backend_speculative: removed"):
        load_settings(toml)
    with pytest.raises(ValueError, match=r"backend_speculative: removed"):
        Settings(backend="llamacpp", backend_speculative=0)
    monkeypatch.setenv("CXR_NODE_BACKEND_SPECULATIVE", "4")
    with pytest.raises(ConfigError, match=r"CXR_NODE_BACKEND_SPECULATIVE"):
        load_settings(None)
    assert "backend_speculative" not in Settings.model_fields
