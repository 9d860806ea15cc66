"""Dataset manifests (models.dataset): validation names the line at fault, report text in
LLM-CXR's form, frontal views, and a write/read round trip with the file's sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from models.dataset import ManifestError, ManifestRecord, VQAPair, read_manifest, write_manifest


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n",
        encoding="utf-8",
    )
    return path


def test_records_read_with_their_report_and_views(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "m.jsonl",
        [
            {
                "id": "a",
                "image": "img/a.png",
                "split": "train",
                "view": "pa",
                "findings": "Clear lungs.",
                "impression": "Normal.",
                "site": "north",
            },
            "",
            {
                "id": "b",
                "image": "/abs/b.dcm",
                "split": "test",
                "view": "LATERAL",
                "vqa": [{"question": "Effusion?", "answer": "no"}],
            },
        ],
    )
    m = read_manifest(path)
    assert m.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    a, b = m.records
    assert a.image == tmp_path.resolve() / "img/a.png" and b.image == Path("/abs/b.dcm")
    assert a.report() == "FINDINGS: Clear lungs. IMPRESSION: Normal."
    assert a.report(("impression",)) == "IMPRESSION: Normal."
    assert b.report() is None and b.vqa == (VQAPair("Effusion?", "no"),)
    assert a.frontal and not b.frontal
    assert a.extra == {"site": "north"}
    assert [r.id for r in m.split("test")] == ["b"]
    with pytest.raises(ValueError, match="split must be one of"):
        m.split("holdout")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"m.jsonl:2: not JSON"),
        ({"image": "x.png", "split": "train", "impression": "x"}, r":2: 'id' is required"),
        ({"id": "z", "image": "x.png", "split": "dev", "impression": "x"}, r":2: 'split' must"),
        ({"id": "z", "image": "x.png", "split": "train"}, r":2: needs 'findings'"),
        ({"id": "a", "image": "x.png", "split": "train", "impression": "x"}, r"repeats line 1"),
        ({"id": "z", "image": "x.png", "split": "train", "vqa": [{"question": "q"}]}, r"vqa\[0\]"),
        (
            {"id": "z", "image": "x.png", "split": "train", "impression": "x", "study_order": -1},
            r"study_order",
        ),
    ],
)
def test_a_bad_line_is_named(tmp_path: Path, line: object, message: str) -> None:
    first = {"id": "a", "image": "a.png", "split": "train", "impression": "Normal."}
    with pytest.raises(ManifestError, match=message):
        read_manifest(_write(tmp_path / "m.jsonl", [first, line]))


def test_empty_and_non_utf8_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no records"):
        read_manifest(_write(tmp_path / "e.jsonl", [""]))
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(bad)


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    records = [
        ManifestRecord(
            id="s1",
            image=tmp_path / "img" / "1.jpg",
            split="train",
            patient_id="p1",
            study_order=0,
            view="AP",
            findings="F.",
            impression="I.",
        ),
        ManifestRecord(
            id="s2", image=Path("/elsewhere/2.jpg"), split="validate", vqa=(VQAPair("Q?", "A."),)
        ),
    ]
    m = write_manifest(tmp_path / "out.jsonl", records)
    assert [r.id for r in m] == ["s1", "s2"] and len(m) == 2
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert first["image"] == "img/1.jpg"  # relative to the manifest's folder
    assert m.records[0].image == (tmp_path / "img" / "1.jpg").resolve()
    assert m.records[1].image == Path("/elsewhere/2.jpg") and m.records[1].vqa[0].answer == "A."
