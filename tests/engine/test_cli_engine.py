"""``cxr-node models convert`` and ``models generate --backend ...`` on a demo bundle and a
real DICOM chest CR (RG1, MONOCHROME1 15-bit, from pydicom-data)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from models.bundle import ModelBundle
from models.demo import create_demo_bundle
from node.cli import app
from tests.engine.conftest import require_engine
from tests.helpers import rg1_file

runner = CliRunner()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _generate(bundle: Path, image: Path, *extra: str) -> dict[str, Any]:
    res = runner.invoke(
        app,
        ["models", "generate", str(bundle), "--image", str(image), "--greedy", "--json", *extra],
    )
    assert res.exit_code == 0, res.output
    out = res.stdout
    result: dict[str, Any] = json.loads(out[out.index("{") :])
    return result


def test_convert_records_gguf_with_checksums(converted_bundle: Path) -> None:
    manifest = json.loads((converted_bundle / "manifest.json").read_text(encoding="utf-8"))
    entries = manifest["engines"]["llamacpp"]
    assert set(entries) == {"f32", "q8_0"}
    for quant, entry in entries.items():
        rel = entry["path"]
        assert rel == f"engines/llamacpp/llm-{quant}.gguf"
        path = converted_bundle / rel
        digest = _sha256(path)
        assert entry["sha256"] == digest
        assert manifest["files"][rel] == {"sha256": digest, "size": path.stat().st_size}
    assert entries["q8_0"]["tensor_types"].get("Q8_0", 0) > 0
    assert set(entries["f32"]["tensor_types"]) == {"F32"}
    # the bundle still opens and every listed file (GGUF files included) is checked
    bundle = ModelBundle.open(converted_bundle)
    report = bundle.verify_checksums()
    names = {name for name, _, _ in report.checks}
    assert {f"sha256 {e['path']}" for e in entries.values()} <= names
    assert report.ok, report.failures()


def test_verify_still_passes_after_convert(converted_bundle: Path) -> None:
    res = runner.invoke(app, ["models", "verify", str(converted_bundle), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert report["ok"] is True
    assert any(c["name"] == "sha256 engines/llamacpp/llm-q8_0.gguf" for c in report["checks"])


def test_verify_fails_on_altered_gguf(converted_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(converted_bundle, copy)
    gguf = copy / "engines/llamacpp/llm-f32.gguf"
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    gguf.write_bytes(bytes(data))
    res = runner.invoke(app, ["models", "verify", str(copy), "--shallow", "--json"])
    assert res.exit_code == 1
    report = json.loads(res.stdout[res.stdout.index("{") :])
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    assert failed == ["sha256 engines/llamacpp/llm-f32.gguf"]


def test_convert_rejects_bad_options(demo_bundle: ModelBundle) -> None:
    root = str(demo_bundle.root)
    res = runner.invoke(app, ["models", "convert", root, "--quant", "q3_k"])
    assert res.exit_code == 2
    assert "--quant must be one of" in res.output
    res = runner.invoke(app, ["models", "convert", root, "--engine", "onnx"])
    assert res.exit_code == 2
    assert "--engine must be llamacpp" in res.output


def test_convert_rejects_a_non_bundle(tmp_path: Path) -> None:
    res = runner.invoke(app, ["models", "convert", str(tmp_path)])
    assert res.exit_code == 1
    assert "manifest.json" in res.output


def test_generate_llamacpp_f32_matches_transformers_fp32_on_dicom(converted_bundle: Path) -> None:
    """Same bundle, same DICOM, greedy: the F32 GGUF (F32 KV cache) reproduces the
    transformers fp32 reference for 32 tokens."""
    dcm = rg1_file()
    ref = _generate(
        converted_bundle,
        dcm,
        "--backend",
        "transformers",
        "--dtype",
        "float32",
        "--max-new-tokens",
        "32",
    )
    eng = _generate(
        converted_bundle, dcm, "--backend", "llamacpp", "--quant", "f32", "--max-new-tokens", "32"
    )
    assert ref["backend"]["backend"] == "transformers"
    assert ref["backend"]["dtype"] == "float32"
    assert eng["backend"]["backend"] == "llamacpp"
    assert eng["backend"]["quant"] == "f32"
    assert eng["backend"]["kv_type"] == "f32"
    assert eng["backend"]["model_path"].endswith("llm-f32.gguf")
    # 256 image codes + the report prompt went in; a 32-token report came out of both
    assert ref["timings"]["prompt_tokens"] == eng["timings"]["prompt_tokens"] > 256
    assert ref["timings"]["tokens"] == eng["timings"]["tokens"]
    assert ref["text"].strip()
    assert eng["text"] == ref["text"]
    assert ref["demo"] is True and eng["demo"] is True


def test_dicom_input_follows_the_pixels(tmp_path: Path) -> None:
    """``--image`` DICOM goes through integration.pixels: RG1's JPEG 2000 lossless variant
    gives the same model input as the uncompressed file; another image does not."""
    import numpy as np

    from node.cli.models import _load_input

    x_unc = _load_input(rg1_file("RG1_UNCR.dcm"))
    x_j2k = _load_input(rg1_file("RG1_J2KR.dcm"))
    assert x_unc.shape == (3, 256, 256) and x_unc.dtype == np.float32
    assert -1.0 <= float(x_unc.min()) < 0.0 < float(x_unc.max()) <= 1.0
    np.testing.assert_allclose(x_unc, x_j2k, atol=2 / 255)
    ramp = tmp_path / "ramp.npy"
    np.save(ramp, np.tile(np.arange(256, dtype=np.uint8), (256, 1)))
    assert float(np.abs(_load_input(ramp) - x_unc).mean()) > 0.1


def test_generate_text_output_prints_the_report(converted_bundle: Path) -> None:
    res = runner.invoke(
        app,
        [
            "models",
            "generate",
            str(converted_bundle),
            "--image",
            str(rg1_file()),
            "--backend",
            "llamacpp",
            "--quant",
            "q8_0",
            "--greedy",
            "--max-new-tokens",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "impression: " in res.stdout
    assert "timings: " in res.stdout


def test_generate_llamacpp_without_conversion_is_a_clear_error(tmp_path: Path) -> None:
    require_engine()
    bundle = create_demo_bundle(tmp_path / "plain")
    res = runner.invoke(
        app,
        [
            "models",
            "generate",
            str(bundle.root),
            "--image",
            str(rg1_file()),
            "--backend",
            "llamacpp",
        ],
    )
    assert res.exit_code == 1
    assert "models convert" in res.output


def test_generate_rejects_unknown_backend_and_bad_image(
    demo_bundle: ModelBundle, tmp_path: Path
) -> None:
    res = runner.invoke(
        app,
        [
            "models",
            "generate",
            str(demo_bundle.root),
            "--image",
            str(rg1_file()),
            "--backend",
            "vllm",
        ],
    )
    assert res.exit_code == 2
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    res = runner.invoke(app, ["models", "generate", str(demo_bundle.root), "--image", str(bad)])
    assert res.exit_code == 1
    assert "cannot read" in res.output


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm"])
def test_dicom_detection_by_preamble(name: str, tmp_path: Path) -> None:
    from node.cli.models import _is_dicom

    src = rg1_file(name)
    renamed = tmp_path / "image.bin"
    shutil.copy(src, renamed)
    assert _is_dicom(renamed)
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    assert not _is_dicom(png)
