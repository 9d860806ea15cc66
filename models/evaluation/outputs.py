"""The evaluation's files: ``results.json``, ``results.md`` and ``per_study.csv``.

``results.json`` and ``results.md`` hold aggregates and provenance only. ``per_study.csv``
holds report texts and record ids, patient data: it is created with mode 0600 whatever the
umask, and nothing of it is logged.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from models.evaluation.common import Skipped
from models.evaluation.scoring import PAPER_COLUMNS, EvaluationResult

__all__ = ["RESULT_FILES", "format_value", "per_study_rows", "results_markdown", "write_results"]

RESULT_FILES = ("results.json", "results.md", "per_study.csv")

_POLICY_TEXT = {
    "u_ones": "uncertain counts as positive (U-ones)",
    "u_zeros": "uncertain counts as negative (U-zeros)",
    "u_ignore": "uncertain labels are left out (U-ignore)",
}


def format_value(key: str, value: float | Skipped | None) -> str:
    """A summary value as ``results.md`` shows it (``–`` undefined, ``skipped: ...``)."""
    if isinstance(value, Skipped):
        return str(value).replace("|", "\\|")
    if value is None:
        return "– (undefined)"
    if key == "vqa_accuracy":
        return f"{value:.3f} ({100 * value:.1f}%)"
    if key == "fid":
        return f"{value:.2f}"
    return f"{value:.3f}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _header(result: EvaluationResult) -> list[str]:
    m = result.meta
    demo = m.get("demo")
    title = f"# Evaluation: {m.get('model_name', 'predictions')} {m.get('model_version', '')}"
    lines = [title.rstrip() + (" (DEMO)" if demo else ""), ""]
    if demo:
        lines += ["> **DEMO model**: its outputs are meaningless; these numbers test the", ">"]
        lines += ["> pipeline only.", ""]
    if m.get("source") == "predictions":
        source = (
            f"predictions `{m.get('predictions_file')}` (sha256 `{m.get('predictions_sha256')}`)"
        )
    else:
        source = "model, greedy decoding with the bundle's defaults"
    views = "frontal views only (PA/AP)" if m.get("frontal_only") else "all views"
    limit = m.get("limit")
    counts = (
        f"{m.get('n_selected')} selected; {result.n_reports} reports scored; "
        f"{result.n_failed} generation failures"
    )
    rows = [
        ("source", source),
        ("model", f"{m.get('model_name', '–')} {m.get('model_version', '')}".strip()),
        ("DEMO", "–" if demo is None else ("yes" if demo else "no")),
        ("manifest", f"`{m.get('manifest_file')}`, sha256 `{m.get('manifest_sha256')}`"),
        ("selection", f"split {m.get('split')}, {views}" + (f", first {limit}" if limit else "")),
        ("n", counts),
        ("reference", " + ".join(m.get("reference_sections", ()))),
        ("labeler", f"{m.get('labeler')}; {_POLICY_TEXT.get(m.get('uncertain_policy', ''), '')}"),
        ("tasks", ", ".join(m.get("tasks", ()))),
    ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    return lines


def _summary(result: EvaluationResult) -> list[str]:
    values = result.summary()
    lines = ["## Summary (the paper's columns)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {title} | {format_value(key, values[key])} |" for key, title in PAPER_COLUMNS]
    return [*lines, ""]


def _classes(result: EvaluationResult) -> list[str]:
    c = result.classification
    if isinstance(c, Skipped):
        return ["## CheXpert classes", "", str(c), ""]
    lines = [
        f"## CheXpert classes (n = {c.n_studies})",
        "",
        "| class | n | support | predicted | precision | recall | F1 | AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in c.classes:
        lines.append(
            f"| {r.name} | {r.n} | {r.support} | {r.predicted} | {_num(r.precision)} "
            f"| {_num(r.recall)} | {_num(r.f1)} | {_num(r.auroc)} |"
        )
    for name in ("micro", "macro", "weighted"):
        a = getattr(c, name)
        lines.append(
            f"| *{name}* | | | | {_num(a.precision)} | {_num(a.recall)} | {_num(a.f1)} "
            f"| {_num(a.auroc)} |"
        )
    lines.append("")
    lines += [f"- {note}" for note in c.notes]
    return [*lines, ""] if c.notes else lines


def _vqa(result: EvaluationResult) -> list[str]:
    v = result.vqa
    if isinstance(v, Skipped):
        return ["## VQA", "", str(v), ""]
    return [
        "## VQA",
        "",
        "| pairs | accuracy | closed (yes/no) | open |",
        "|---|---|---|---|",
        f"| {v.n} | {_num(v.accuracy)} | {_num(v.closed_accuracy)} (n = {v.n_closed}) "
        f"| {_num(v.open_accuracy)} (n = {v.n - v.n_closed}) |",
        "",
    ]


def results_markdown(result: EvaluationResult) -> str:
    """``results.md``: provenance, the summary in the paper's columns, classes, VQA."""
    lines = _header(result) + _summary(result) + _classes(result) + _vqa(result)
    fid = result.meta.get("fid")
    if fid:
        lines += ["## Report -> CXR", "", f"FID {format_value('fid', result.fid)}; {fid}", ""]
    return "\n".join(lines)


def _bit(value: bool | None) -> str:
    return "" if value is None else str(int(value))


def per_study_rows(result: EvaluationResult) -> tuple[list[str], list[list[str]]]:
    """The header and rows of ``per_study.csv`` (labels: 1, 0, or empty when left out)."""
    keys = [c.key for c in result.classes]
    header = ["id", "view", "reference_report", "generated_report", "error"]
    header += [f"generated_{k}" for k in keys] + [f"reference_{k}" for k in keys]
    header += ["bleu4", "rouge_l", "vqa_n", "vqa_correct", "vqa"]
    rows = []
    for s in result.studies:
        o = s.output
        gen = s.generated_labels or (None,) * len(keys)
        ref = s.reference_labels or (None,) * len(keys)
        vqa = [
            {"question": q.question, "reference": q.reference, "answer": q.answer, "correct": c}
            for q, c in zip(o.vqa, s.vqa_correct, strict=True)
        ]
        rows.append(
            [o.id, o.view or "", o.reference or "", o.generated or "", o.error or ""]
            + [_bit(b) for b in gen]
            + [_bit(b) for b in ref]
            + ["" if s.bleu4 is None else f"{s.bleu4:.6f}"]
            + ["" if s.rouge_l is None else f"{s.rouge_l:.6f}"]
            + [str(len(vqa)), str(sum(s.vqa_correct))]
            + [json.dumps(vqa, ensure_ascii=False) if vqa else ""]
        )
    return header, rows


def _write_private_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file was there before with a wider mode
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def write_results(result: EvaluationResult, out_dir: Path | str) -> dict[str, Path]:
    """Write the three files into ``out_dir`` (created if missing); their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in RESULT_FILES}
    data: dict[str, Any] = result.to_json()
    paths["results.json"].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    paths["results.md"].write_text(results_markdown(result), encoding="utf-8")
    header, rows = per_study_rows(result)
    _write_private_csv(paths["per_study.csv"], header, rows)
    return paths
