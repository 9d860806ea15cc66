"""Model bundles: a directory with ``manifest.json``, the VQ-GAN as ONNX and the LLM folder.

Layout::

    manifest.json
    vqgan/encoder.onnx    image float32 [B,3,256,256] in [-1,1] -> codes int64 [B,256]
    vqgan/decoder.onnx    codes int64 [B,256] -> image float32 [B,3,256,256]
    vqgan/*.ckpt, *.yaml  (optional: the source checkpoint and its config; the PyTorch
                          tokenizer on a GPU needs them, models.torch_image_tokenizer)
    llm/                  Hugging Face layout: config.json, weights, tokenizer files

The manifest records the format version, model name and version, the demo flag, the token
layout, the image size, generation defaults and the sha256 of every other file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.layout import (
    CODES_PER_IMAGE,
    IMAGE_SIZE,
    LLMCXR_LAYOUT,
    VOCAB,
    TokenLayout,
    TokenLayoutError,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ENCODER_FILE = "vqgan/encoder.onnx"
DECODER_FILE = "vqgan/decoder.onnx"
LLM_DIR = "llm"
REQUIRED_FILES = (ENCODER_FILE, DECODER_FILE, f"{LLM_DIR}/config.json", f"{LLM_DIR}/tokenizer.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")

DEFAULT_GENERATION: dict[str, Any] = {
    "greedy": True,
    "seed": None,
    "temperature": 1.0,
    "top_p": 0.92,
    "top_k": 0,
    "report_max_new_tokens": 128,
    "vqa_max_new_tokens": 64,
}


class BundleError(ValueError):
    """A model bundle is missing, malformed or fails verification (HTTP 500 / 503 upstream).

    The message names the manifest field or the bundle file at fault.
    """

    http_status = 503


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _bundle_files(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append(p.relative_to(root).as_posix())
    return out


def write_manifest(
    root: Path,
    *,
    model_name: str,
    model_version: str,
    demo: bool,
    llm: Mapping[str, Any],
    vqgan: Mapping[str, Any],
    generation: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    created_by: str = "llm-cxr-node",
) -> Path:
    """Hash every file under ``root`` and write ``manifest.json`` (atomically).

    Parameters
    ----------
    root
        The bundle directory, already holding ``vqgan/`` and ``llm/``.
    model_name, model_version
        Recorded as the algorithm name and version (the SR names them).
    demo
        ``True`` for randomly initialised demo models (never clinical output).
    llm, vqgan
        Descriptions (architecture, shapes, config) stored as is.
    generation
        Generation defaults (see :data:`DEFAULT_GENERATION`).
    source
        Provenance (e.g. paths and hashes the bundle was imported from).
    """
    root = Path(root)
    files = {}
    for rel in _bundle_files(root):
        p = root / rel
        files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_version": model_version,
        "demo": bool(demo),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "created_by": created_by,
        "token_layout": LLMCXR_LAYOUT.to_dict(),
        "image": {"size": IMAGE_SIZE, "channels": 3, "codes_per_image": CODES_PER_IMAGE},
        "generation": {**DEFAULT_GENERATION, **(generation or {})},
        "llm": {"dir": LLM_DIR, **llm},
        "vqgan": {"encoder": ENCODER_FILE, "decoder": DECODER_FILE, **vqgan},
        "source": dict(source or {}),
        "files": files,
    }
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return root / MANIFEST


@dataclass
class VerifyReport:
    """Outcome of :meth:`ModelBundle.verify`: named checks with details."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """All checks passed."""
        return all(ok for _, ok, _ in self.checks)

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        """Record one check."""
        self.checks.append((name, ok, detail))

    def failures(self) -> list[str]:
        """``"name: detail"`` of every failed check."""
        return [f"{n}: {d}" for n, ok, d in self.checks if not ok]

    def raise_for_failures(self) -> None:
        """Raise :class:`BundleError` listing the failed checks, if any."""
        if not self.ok:
            raise BundleError("model bundle verification failed: " + "; ".join(self.failures()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "ok": self.ok,
            "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
        }


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise BundleError(f"{where}: manifest field {key!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(
            f"{where}: manifest field {key!r} has the wrong type {type(value).__name__}"
        )
    return value


class ModelBundle:
    """An opened, structurally valid model bundle (use :meth:`open`)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest
        where = str(self.root / MANIFEST)
        version = _require(manifest, "format_version", int, where)
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where}: format_version {version} is not supported ({FORMAT_VERSION})"
            )
        self.model_name: str = _require(manifest, "model_name", str, where)
        self.model_version: str = _require(manifest, "model_version", str, where)
        self.demo: bool = _require(manifest, "demo", bool, where)
        if not self.model_name.strip() or not self.model_version.strip():
            raise BundleError(f"{where}: model_name and model_version must not be empty")
        try:
            self.layout = TokenLayout.from_dict(_require(manifest, "token_layout", dict, where))
            self.layout.check_published()
        except TokenLayoutError as exc:
            raise BundleError(f"{where}: token_layout: {exc}") from exc
        image = _require(manifest, "image", dict, where)
        size = _require(image, "size", int, f"{where} image")
        if size != IMAGE_SIZE:
            raise BundleError(f"{where}: image.size {size} != {IMAGE_SIZE}")
        gen = _require(manifest, "generation", dict, where)
        self.generation: dict[str, Any] = {**DEFAULT_GENERATION, **gen}
        self.llm_info: dict[str, Any] = _require(manifest, "llm", dict, where)
        self.vqgan_info: dict[str, Any] = _require(manifest, "vqgan", dict, where)
        files = _require(manifest, "files", dict, where)
        self.files: dict[str, dict[str, Any]] = {}
        for rel, meta in files.items():
            if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
                raise BundleError(f"{where}: files[{rel!r}] lacks a sha256")
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise BundleError(
                    f"{where}: files[{rel!r}] is not a relative path inside the bundle"
                )
            self.files[rel] = meta
        for rel in REQUIRED_FILES:
            if rel not in self.files:
                raise BundleError(f"{where}: required file {rel} is not listed in 'files'")
        if not any(r.startswith(f"{LLM_DIR}/") and r.endswith(WEIGHT_SUFFIXES) for r in self.files):
            raise BundleError(f"{where}: no LLM weights (llm/*.safetensors or *.bin) in 'files'")
        for rel, meta in self.files.items():
            p = self.root / rel
            if not p.is_file():
                raise BundleError(f"bundle file {p} listed in the manifest is missing")
            if "size" in meta and p.stat().st_size != meta["size"]:
                raise BundleError(
                    f"bundle file {p} has {p.stat().st_size} bytes, manifest says {meta['size']}"
                )

    @classmethod
    def open(cls, root: Path | str) -> ModelBundle:
        """Read and validate ``root/manifest.json`` (no hashing; see :meth:`verify`).

        Raises
        ------
        BundleError
            Naming the missing/bad manifest field or the missing file.
        """
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"model bundle {root} is not a directory")
        if not path.is_file():
            raise BundleError(f"model bundle {root} has no {MANIFEST}")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict):
            raise BundleError(f"{path} is not a JSON object")
        return cls(root, manifest)

    @property
    def llm_dir(self) -> Path:
        """The Hugging Face LLM folder."""
        return self.root / LLM_DIR

    @property
    def encoder_path(self) -> Path:
        """``vqgan/encoder.onnx``."""
        return self.root / ENCODER_FILE

    @property
    def decoder_path(self) -> Path:
        """``vqgan/decoder.onnx``."""
        return self.root / DECODER_FILE

    @property
    def vqgan_checkpoint(self) -> tuple[Path, Path] | None:
        """The VQ-GAN's source checkpoint and YAML in ``vqgan/`` (the importer's
        ``keep_source``, the demo's), or ``None`` unless there is exactly one of each; the
        PyTorch tokenizer (:mod:`models.torch_image_tokenizer`) needs them."""
        folder = self.root / "vqgan"
        ckpts = sorted(folder.glob("*.ckpt"))
        yamls = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
        if len(ckpts) != 1 or len(yamls) != 1:
            return None
        return ckpts[0], yamls[0]

    def summary(self) -> dict[str, Any]:
        """Name, version, demo flag, layout, LLM shape and total size (for ``info``)."""
        return {
            "root": str(self.root),
            "model_name": self.model_name,
            "model_version": self.model_version,
            "demo": self.demo,
            "format_version": self.manifest["format_version"],
            "created_at": self.manifest.get("created_at"),
            "created_by": self.manifest.get("created_by"),
            "token_layout": self.layout.to_dict(),
            "image_size": IMAGE_SIZE,
            "llm": self.llm_info,
            "vqgan": self.vqgan_info,
            "generation": self.generation,
            "files": len(self.files),
            "total_bytes": int(sum(int(m.get("size", 0)) for m in self.files.values())),
        }

    def verify_checksums(self, report: VerifyReport | None = None) -> VerifyReport:
        """sha256 of every listed file, and no unlisted file in the bundle."""
        report = report or VerifyReport()
        for rel, meta in sorted(self.files.items()):
            got = sha256_file(self.root / rel)
            report.add(
                f"sha256 {rel}",
                got == meta["sha256"],
                "" if got == meta["sha256"] else f"got {got}",
            )
        extra = sorted(set(_bundle_files(self.root)) - set(self.files))
        report.add("no unlisted files", not extra, ", ".join(extra[:5]))
        return report

    def verify(self, *, deep: bool = True, image_smoke: bool | None = None) -> VerifyReport:
        """Check checksums, the tokenizer and model layout, and (``deep``) run the models.

        Parameters
        ----------
        deep
            Also load the LLM (embedding rows 51305, untied), run the ONNX encoder and
            decoder on a grey image and generate a few text tokens.
        image_smoke
            Also run one constrained report->image generation (257 decode steps); default:
            only for demo bundles (a full-size model takes a while on CPU).

        Returns
        -------
        VerifyReport
            Never raises for a failed check; ``report.ok`` says whether all passed.
        """
        report = self.verify_checksums()
        from models.text import LLMCXRTokenizer

        try:
            LLMCXRTokenizer.from_dir(self.llm_dir)
            report.add("tokenizer layout", True, "len 50281, special ids as published")
        except (TokenLayoutError, OSError, ValueError) as exc:
            report.add("tokenizer layout", False, str(exc))
        try:
            cfg = json.loads((self.llm_dir / "config.json").read_text(encoding="utf-8"))
            ok = cfg.get("vocab_size") == VOCAB and not cfg.get("tie_word_embeddings", False)
            report.add(
                "llm config",
                ok,
                f"model_type={cfg.get('model_type')} vocab_size={cfg.get('vocab_size')} "
                f"tie_word_embeddings={cfg.get('tie_word_embeddings', False)}",
            )
        except (OSError, json.JSONDecodeError) as exc:
            report.add("llm config", False, str(exc))
        if not deep or not report.ok:
            return report
        self._deep_checks(report, self.demo if image_smoke is None else image_smoke)
        return report

    def _deep_checks(self, report: VerifyReport, image_smoke: bool) -> None:
        import numpy as np

        from models.backends.base import GenerationRequest
        from models.backends.transformers_backend import TransformersBackend
        from models.image_tokenizer import OnnxImageTokenizer
        from models.prompts import report_prompt, report_to_image_prompt

        codes: list[int] = []
        try:
            tok = OnnxImageTokenizer(self.encoder_path, self.decoder_path)
            x = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
            c = tok.encode(x)
            ok = c.shape == (1, CODES_PER_IMAGE) and int(c.min()) >= 0 and int(c.max()) < 1024
            report.add("onnx encoder", ok, f"codes shape {tuple(c.shape)}")
            y = tok.decode(c)
            report.add(
                "onnx decoder",
                y.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE),
                f"image shape {tuple(y.shape)}",
            )
            codes = [int(v) for v in c[0]]
        except Exception as exc:  # any onnxruntime failure is a failed check
            report.add("onnx image tokenizer", False, f"{type(exc).__name__}: {exc}")
            return
        try:
            backend = TransformersBackend(self.llm_dir, dtype="auto")
            t0 = time.perf_counter()
            backend.load()
            report.add(
                "llm load", True, f"{time.perf_counter() - t0:.1f} s, embeddings 51305 untied"
            )
            ids = backend.tokenizer.encode_with_image(report_prompt(), codes)
            reqs = [GenerationRequest(prompt_ids=ids, max_new_tokens=4)]
            if image_smoke:
                img_ids = backend.tokenizer.encode(report_to_image_prompt("No acute findings."))
                reqs.append(GenerationRequest(prompt_ids=img_ids, max_new_tokens=1, mode="image"))
            res = backend.generate(reqs)
            report.add(
                "smoke generation (text)",
                res[0].error is None and res[0].new_tokens >= 1,
                res[0].error or f"{res[0].new_tokens} token(s), stop={res[0].stop_reason}",
            )
            if image_smoke:
                n = len(res[1].image_codes or [])
                report.add(
                    "smoke generation (image)", n == CODES_PER_IMAGE, res[1].error or f"{n} codes"
                )
        except Exception as exc:  # load or generation failure is a failed check
            report.add("llm", False, f"{type(exc).__name__}: {exc}")


def copy_tree(src: Path, dst: Path, *, link: bool = False, skip: Iterable[str] = ()) -> None:
    """Copy (or hard-link where possible) the files of ``src`` into ``dst``."""
    import shutil

    skip_set = set(skip)
    for p in sorted(Path(src).rglob("*")):
        rel = p.relative_to(src)
        if not p.is_file() or rel.parts[0] in skip_set or any(s.startswith(".") for s in rel.parts):
            continue
        target = Path(dst) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(p, target)
                continue
            except OSError:
                pass
        shutil.copy2(p, target)
