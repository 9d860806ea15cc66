"""Model bundles: demo creation, manifest validation, checksums, import of the published layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from models.bundle import MANIFEST, BundleError, ModelBundle, sha256_file
from models.demo import create_demo_bundle
from models.importer import import_llmcxr
from models.layout import CODES_PER_IMAGE, TokenLayoutError
from models.prompts import report_prompt
from models.runtime import LLMCXR
from models.text import LLMCXRTokenizer
from models.vqgan import VQGANConfig
from node.cli.models import app
from tests.models.llm_fixtures import (
    demo_bundle,
    demo_bundle_dir,
    with_placeholders,
    write_taming_ckpt,
    write_tiny_llm,
)

__all__ = ["demo_bundle"]


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(demo_bundle_dir(), dst)
    return dst


def test_demo_bundle_manifest(demo_bundle: ModelBundle) -> None:
    m = json.loads((demo_bundle.root / MANIFEST).read_text())
    assert m["demo"] is True and "DEMO" in m["model_name"]
    assert m["token_layout"]["vocab_size"] == 51305
    assert m["image"]["size"] == 256
    assert {
        "vqgan/encoder.onnx",
        "vqgan/decoder.onnx",
        "llm/config.json",
        "llm/tokenizer.json",
        "llm/model.safetensors",
    } <= set(m["files"])
    for rel, meta in m["files"].items():
        assert sha256_file(demo_bundle.root / rel) == meta["sha256"]
    cfg = json.loads((demo_bundle.root / "llm" / "config.json").read_text())
    assert cfg["vocab_size"] == 51305 and cfg["tie_word_embeddings"] is False
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert len(LLMCXRTokenizer.from_dir(demo_bundle.llm_dir)) == 50281


@pytest.mark.slow
def test_verify_deep_passes_on_demo(demo_bundle: ModelBundle) -> None:
    report = demo_bundle.verify(deep=True)
    assert report.ok, report.failures()
    names = {n for n, _, _ in report.checks}
    assert {
        "smoke generation (text)",
        "smoke generation (image)",
        "onnx encoder",
        "llm load",
    } <= names


def test_corruption_and_missing_pieces_are_named(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    cfg = root / "llm" / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("2048", "4096"))  # same size, other bytes
    report = ModelBundle.open(root).verify(deep=False)
    assert not report.ok
    assert any("llm/tokenizer_config.json" in f for f in report.failures())
    with pytest.raises(BundleError, match=r"tokenizer_config\.json"):
        report.raise_for_failures()
    (root / "llm" / "stray.txt").write_text("x")
    assert any("stray.txt" in f for f in ModelBundle.open(root).verify(deep=False).failures())
    (root / "vqgan" / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"decoder\.onnx"):
        ModelBundle.open(root)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("model_version", None, "model_version"),
        ("demo", "yes", "demo"),
        ("format_version", 99, "format_version"),
        ("token_layout", {"text_vocab": 50281}, "token_layout"),
    ],
)
def test_manifest_validation_names_the_field(
    tmp_path: Path, field: str, value: object, match: str
) -> None:
    root = _copy(tmp_path)
    m = json.loads((root / MANIFEST).read_text())
    if value is None:
        del m[field]
    else:
        m[field] = value
    (root / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match):
        ModelBundle.open(root)
    with pytest.raises(BundleError, match=r"manifest\.json"):
        ModelBundle.open(tmp_path)


@pytest.mark.slow
def test_demo_bundle_is_deterministic_with_the_real_tokenizer(tmp_path: Path) -> None:
    args = ["create-demo", "--out", str(tmp_path / "a"), "--seed", "3", "--hidden", "32"]
    res = CliRunner().invoke(app, [*args, "--layers", "1"])
    assert res.exit_code == 0, res.output
    assert "DEMO" in res.output
    a = ModelBundle.open(tmp_path / "a")
    b = create_demo_bundle(tmp_path / "b", seed=3, hidden=32, layers=1, heads=4)
    assert a.manifest["llm"]["tokenizer"] == "gpt-neox-20b"
    for rel in ("llm/model.safetensors", "llm/tokenizer.json"):
        assert a.files[rel]["sha256"] == b.files[rel]["sha256"]
    with pytest.raises(FileExistsError):
        create_demo_bundle(tmp_path / "a")
    report = a.verify(deep=True)
    assert report.ok, report.failures()


def test_demo_bundle_tokenizer_is_gpt_neox_with_the_image_ids(demo_bundle: ModelBundle) -> None:
    """The demo's tokenizer is the real one: its noise is GPT-NeoX word pieces, never
    placeholders, and image code c is id 50281 + c after the 50,281 text entries."""
    tok = LLMCXRTokenizer.from_dir(demo_bundle.llm_dir)
    assert len(tok) == 50281
    assert tok.encode("No pleural effusion.") == [2302, 46388, 3098, 2035, 15]
    assert tok.decode(range(2000, 2010)) == tok.raw.decode(list(range(2000, 2010)))
    assert "<|" not in tok.decode(range(2, 50277), skip_special_tokens=True)
    ids = tok.encode_with_image(report_prompt(), list(range(CODES_PER_IMAGE)))
    start = ids.index(50281)
    assert ids[start : start + CODES_PER_IMAGE] == list(range(50281, 50281 + CODES_PER_IMAGE))
    assert ids[start - 1] == tok.image_open_id
    assert ids[start + CODES_PER_IMAGE] == tok.image_close_id
    assert tok.decode([*ids[:start], 51304]) == tok.decode(ids[:start])  # image ids are not text
    assert demo_bundle.manifest["token_layout"]["image_token_offset"] == 50281
    assert demo_bundle.manifest["token_layout"]["vocab_size"] == 50281 + 1024


def test_a_bundle_with_a_wrong_tokenizer_is_refused_at_load(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    tok_file = root / "llm" / "tokenizer.json"
    tok_file.write_text(with_placeholders(tok_file.read_text(), range(40000, 40010)))
    m = json.loads((root / MANIFEST).read_text())
    m["files"]["llm/tokenizer.json"]["sha256"] = sha256_file(tok_file)
    m["files"]["llm/tokenizer.json"]["size"] = tok_file.stat().st_size
    (root / MANIFEST).write_text(json.dumps(m))
    bundle = ModelBundle.open(root)
    report = bundle.verify()
    assert not report.ok
    assert any("not GPT-NeoX-20B's vocabulary" in f for f in report.failures())
    with pytest.raises(TokenLayoutError, match=f"{tok_file}: ids 0..50276 are not GPT-NeoX"):
        LLMCXR.from_bundle(bundle, backend_options={"dtype": "float32"})
    tok_file.unlink()
    with pytest.raises((BundleError, TokenLayoutError), match=r"tokenizer\.json"):
        LLMCXR.from_bundle(ModelBundle.open(root), backend_options={"dtype": "float32"})


@pytest.mark.slow
def test_import_published_layout_round_trip(tmp_path: Path, tiny_vqgan_config: VQGANConfig) -> None:
    src = tmp_path / "published"
    llm = write_tiny_llm(src / "llm", seed=9)
    ckpt, yml = write_taming_ckpt(src, tiny_vqgan_config)
    result = CliRunner().invoke(
        app,
        [
            "import-llmcxr",
            "--llm",
            str(llm),
            "--vqgan-ckpt",
            str(ckpt),
            "--vqgan-config",
            str(yml),
            "--out",
            str(tmp_path / "bundle"),
        ],
    )
    assert result.exit_code == 0, result.output
    bundle = ModelBundle.open(tmp_path / "bundle")
    assert bundle.demo is False and bundle.model_name == "LLM-CXR"
    assert bundle.model_version.startswith("sha-")
    assert "vqgan/vqgan.ckpt" in bundle.files and bundle.vqgan_info["config"]["n_embed"] == 1024
    report = bundle.verify(deep=True, image_smoke=False)
    assert report.ok, report.failures()

    model = LLMCXR.from_bundle(bundle, backend_options={"dtype": "float32"})
    x = np.random.default_rng(1).uniform(-1, 1, (3, 256, 256)).astype(np.float32)
    draft = model.report(x, max_new_tokens=5)
    assert draft.model_version == bundle.model_version and draft.demo is False
    assert draft.timings["tokens"] <= 5 and "<image>" in draft.prompt
    answer = model.vqa(x, "Is there a pleural effusion?", max_new_tokens=3)
    assert answer.timings["tokens"] <= 3
    codes, image = model.report_to_image("IMPRESSION: No acute cardiopulmonary process.")
    assert codes.shape == (CODES_PER_IMAGE,) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 1024
    assert image.shape == (256, 256) and image.dtype == np.uint8


def test_import_rejects_wrong_vocab(tmp_path: Path, tiny_vqgan_config: VQGANConfig) -> None:
    llm = write_tiny_llm(tmp_path / "llm", vocab=50432)
    ckpt, yml = write_taming_ckpt(tmp_path, tiny_vqgan_config)
    with pytest.raises(BundleError, match="vocab_size 50432"):
        import_llmcxr(llm, ckpt, yml, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_info_and_verify(demo_bundle: ModelBundle, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["info", str(demo_bundle.root), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["demo"] is True and info["token_layout"]["vocab_size"] == 51305
    res = runner.invoke(app, ["info", str(demo_bundle.root)])
    assert res.exit_code == 0 and "DEMO" in res.output
    res = runner.invoke(app, ["verify", str(demo_bundle.root), "--shallow", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["ok"] is True
    res = runner.invoke(app, ["info", str(tmp_path)])
    assert res.exit_code == 1 and "manifest.json" in res.output


def test_cli_generate(demo_bundle: ModelBundle, tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "cxr.png"
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (300, 1))).save(png)
    runner = CliRunner()

    def generate(*options: str) -> Result:
        """``generate BUNDLE --image PNG OPTIONS --json --dtype float32``."""
        command = ["generate", str(demo_bundle.root), "--image", str(png), *options]
        return runner.invoke(app, [*command, "--json", "--dtype", "float32"])

    res = generate("--max-new-tokens", "3")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["demo"] is True and out["timings"]["tokens"] <= 3
    res = generate("--question", "Is it normal?", "--max-new-tokens", "2")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["question"] == "Is it normal?"
    res = runner.invoke(app, ["generate", str(demo_bundle.root)])
    assert res.exit_code == 2
