"""Dataset manifests for ``cxr-node train`` and ``cxr-node evaluate`` (#28).

A manifest is a JSON Lines file, one study image a line::

    {"id": "s50414267-02aa804e", "image": "files/p10/p10000032/s50414267/02aa804e.jpg",
     "patient_id": "p10000032", "study_id": "s50414267", "view": "PA",
     "study_order": 0, "findings": "...", "impression": "...",
     "vqa": [{"question": "Is there a pleural effusion?", "answer": "no"}],
     "split": "train"}

``id``, ``image`` and ``split`` (``train``, ``validate`` or ``test``) are required; ``image``
is a JPG/PNG or a DICOM file, relative to the manifest's folder or absolute. A record needs
a report section (``findings`` and/or ``impression``) or at least one VQA pair. ``view`` is
the ViewPosition (0018,5101) as given (``PA``, ``AP``, ``LATERAL`` ...); ``study_order``
numbers a patient's studies in time (0 = the first), which stage 2 of the paper's recipe
uses. Unknown keys are kept in :attr:`ManifestRecord.extra` (a site may add its own).

:func:`read_manifest` validates every line and names the line at fault; the manifest's
sha256 is recorded in a trained bundle's manifest so that a model can be traced to its data.
This module reads text only: images are opened by the caller (``models`` never imports
pydicom; the node's CLI passes a loader that converts DICOM as ingest does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.jsonl import json_lines

__all__ = [
    "FRONTAL_VIEWS",
    "SPLITS",
    "Manifest",
    "ManifestError",
    "ManifestRecord",
    "VQAPair",
    "read_manifest",
    "write_manifest",
]

SPLITS = ("train", "validate", "test")
#: ViewPosition (0018,5101) values of frontal views; LLM-CXR evaluated on these only
FRONTAL_VIEWS = ("PA", "AP")
_KNOWN = {
    "id",
    "image",
    "split",
    "patient_id",
    "study_id",
    "view",
    "study_order",
    "findings",
    "impression",
    "vqa",
}


class ManifestError(ValueError):
    """A manifest line is malformed; the message names the file and the line."""


@dataclass(frozen=True)
class VQAPair:
    """A question about the image and its reference answer."""

    question: str
    answer: str


@dataclass(frozen=True)
class ManifestRecord:
    """One image with its report sections and VQA pairs (see the module docstring)."""

    id: str
    image: Path
    split: str
    patient_id: str | None = None
    study_id: str | None = None
    view: str | None = None
    study_order: int | None = None
    findings: str | None = None
    impression: str | None = None
    vqa: tuple[VQAPair, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def frontal(self) -> bool:
        """Whether the view is PA or AP (unknown views count as not frontal)."""
        return (self.view or "").strip().upper() in FRONTAL_VIEWS

    def report(self, sections: Iterable[str] = ("findings", "impression")) -> str | None:
        """The report text of ``sections`` in LLM-CXR's form (``FINDINGS: ...
        IMPRESSION: ...``), leaving out missing sections; ``None`` when all are missing."""
        parts = []
        for name in sections:
            if name not in ("findings", "impression"):
                raise ValueError(f"unknown report section {name!r}")
            text = getattr(self, name)
            if text:
                parts.append(f"{name.upper()}: {text.strip()}")
        return " ".join(parts) if parts else None

    def to_json(self, base: Path | None = None) -> dict[str, Any]:
        """The record as a manifest line's object (``image`` relative to ``base`` if under
        it)."""
        image = self.image
        if base is not None:
            with contextlib.suppress(ValueError):
                image = image.relative_to(base)
        out: dict[str, Any] = {"id": self.id, "image": image.as_posix(), "split": self.split}
        for key in ("patient_id", "study_id", "view", "study_order", "findings", "impression"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.vqa:
            out["vqa"] = [{"question": p.question, "answer": p.answer} for p in self.vqa]
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Manifest:
    """A read manifest: its records in file order and the sha256 of its bytes."""

    path: Path
    sha256: str
    records: tuple[ManifestRecord, ...]

    def split(self, name: str) -> list[ManifestRecord]:
        """The records of split ``name``."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")
        return [r for r in self.records if r.split == name]

    def __iter__(self) -> Iterator[ManifestRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def _text(obj: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ManifestError(f"{where}: {key!r} is required")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise ManifestError(f"{where}: {key!r} must be a non-empty string")
    return value


def _vqa(value: Any, where: str) -> tuple[VQAPair, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ManifestError(f"{where}: 'vqa' must be a list of {{question, answer}}")
    pairs = []
    for i, item in enumerate(value):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("question"), str)
            and isinstance(item.get("answer"), str)
            and item["question"].strip()
            and item["answer"].strip()
        ):
            raise ManifestError(f"{where}: vqa[{i}] needs non-empty 'question' and 'answer'")
        pairs.append(VQAPair(item["question"], item["answer"]))
    return tuple(pairs)


def _record(obj: Any, base: Path, where: str) -> ManifestRecord:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: a line must be a JSON object")
    rid = _text(obj, "id", where, required=True)
    image_text = _text(obj, "image", where, required=True)
    split = _text(obj, "split", where, required=True)
    assert rid is not None and image_text is not None and split is not None
    if split not in SPLITS:
        raise ManifestError(f"{where}: 'split' must be one of {', '.join(SPLITS)}, not {split!r}")
    order = obj.get("study_order")
    if order is not None and (isinstance(order, bool) or not isinstance(order, int) or order < 0):
        raise ManifestError(f"{where}: 'study_order' must be an integer >= 0")
    image = Path(image_text)
    record = ManifestRecord(
        id=rid,
        image=image if image.is_absolute() else base / image,
        split=split,
        patient_id=_text(obj, "patient_id", where),
        study_id=_text(obj, "study_id", where),
        view=_text(obj, "view", where),
        study_order=order,
        findings=_text(obj, "findings", where),
        impression=_text(obj, "impression", where),
        vqa=_vqa(obj.get("vqa"), where),
        extra={k: v for k, v in obj.items() if k not in _KNOWN},
    )
    if record.report() is None and not record.vqa:
        raise ManifestError(f"{where}: needs 'findings', 'impression' or 'vqa'")
    return record


def read_manifest(path: Path | str) -> Manifest:
    """Read and validate a JSON Lines manifest (blank lines are skipped).

    Raises
    ------
    ManifestError
        For a malformed line (naming it), a duplicate ``id``, or an empty manifest.
    OSError
        When the file cannot be read.
    """
    path = Path(path)
    data = path.read_bytes()
    base = path.parent.resolve()
    records: list[ManifestRecord] = []
    seen: dict[str, int] = {}
    for where, number, obj in json_lines(data, path, ManifestError):
        record = _record(obj, base, where)
        if record.id in seen:
            raise ManifestError(f"{where}: id {record.id!r} repeats line {seen[record.id]}")
        seen[record.id] = number
        records.append(record)
    if not records:
        raise ManifestError(f"{path}: no records")
    return Manifest(path=path, sha256=hashlib.sha256(data).hexdigest(), records=tuple(records))


def write_manifest(path: Path | str, records: Iterable[ManifestRecord]) -> Manifest:
    """Write ``records`` as a JSON Lines manifest (atomically; images relative to its
    folder where they lie under it) and read it back."""
    path = Path(path)
    base = path.parent.resolve()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(base), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return read_manifest(path)
