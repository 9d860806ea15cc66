"""Training examples: labels, image ids as the runtime inserts them, truncation, the
stage's example list and the collator."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from models.bundle import ModelBundle
from models.dataset import ManifestRecord, VQAPair
from models.layout import END_ID, IMAGE_TOKEN_OFFSET, RESPONSE_MARKER_ID, codes_to_ids
from models.prompts import format_prompt, report_prompt, report_to_image_prompt, vqa_prompt
from models.text import LLMCXRTokenizer, build_llmcxr_tokenizer
from models.training.batches import Collator, TrainingExamples, select_records
from models.training.examples import (
    IGNORE_INDEX,
    ExampleError,
    GeneralItem,
    general_example,
    image_example,
    image_spans,
    read_general,
    report_example,
    vqa_example,
)
from models.training.paraphrases import REPORT_PARAPHRASES
from models.training.recipe import load_config, paper_stage

CODES = [int(c) for c in np.random.default_rng(0).integers(0, 1024, 256)]


@pytest.fixture(scope="module")
def tok() -> LLMCXRTokenizer:
    return LLMCXRTokenizer(build_llmcxr_tokenizer())


def test_report_example_prompt_is_the_runtimes(tok: LLMCXRTokenizer) -> None:
    report = "No acute cardiopulmonary process."
    ex = report_example(tok, CODES, report)
    assert ex is not None
    runtime_ids = tok.encode_with_image(report_prompt(), CODES)  # as models.runtime builds it
    n = len(runtime_ids)
    assert ex.input_ids[:n] == runtime_ids and ex.prompt_len == n
    assert ex.input_ids[n - 1] == RESPONSE_MARKER_ID
    assert ex.labels[:n] == [IGNORE_INDEX] * n  # exactly the prompt is masked
    assert ex.labels[n:] == ex.input_ids[n:] and IGNORE_INDEX not in ex.labels[n:]
    assert ex.input_ids[-1] == END_ID
    assert tok.decode(ex.input_ids[n:]) == f"{report}\n\n### End"
    start = ex.input_ids.index(IMAGE_TOKEN_OFFSET + CODES[0])
    assert ex.input_ids[start - 1] == tok.image_open_id
    assert ex.input_ids[start : start + 256] == codes_to_ids(CODES)
    assert ex.input_ids[start + 256] == tok.image_close_id
    assert ex.attention_mask == [1] * len(ex.input_ids)


def test_paraphrased_report_example(tok: LLMCXRTokenizer) -> None:
    rng = random.Random(3)
    seen = set()
    for _ in range(30):
        ex = report_example(tok, CODES, "Normal.", rng=rng)
        assert ex is not None
        seen.add(tok.decode(ex.input_ids[: ex.prompt_len]).split("\n")[3])
    assert seen <= set(REPORT_PARAPHRASES) and len(seen) > 3


def test_image_example_response_is_the_image(tok: LLMCXRTokenizer) -> None:
    report = "Small left effusion."
    ex = image_example(tok, CODES, report)
    assert ex is not None
    prompt_ids = tok.encode(report_to_image_prompt(report))
    n = len(prompt_ids)
    assert ex.input_ids[:n] == prompt_ids and ex.labels[:n] == [IGNORE_INDEX] * n
    response = ex.input_ids[n:]
    assert response[0] == tok.image_open_id  # the prompt the backend extends with '<'
    assert response[1:257] == codes_to_ids(CODES)
    assert response[257] == tok.image_close_id and response[-1] == END_ID
    assert ex.labels[n:] == response
    with pytest.raises(ExampleError):
        image_example(tok, CODES, "see <image>")


def test_vqa_and_general_examples(tok: LLMCXRTokenizer) -> None:
    ex = vqa_example(tok, CODES, "Is there a pneumothorax?", "no")
    assert ex is not None
    n = len(tok.encode_with_image(vqa_prompt("Is there a pneumothorax?"), CODES))
    assert ex.prompt_len == n and tok.decode(ex.input_ids[n:]) == "no\n\n### End"
    item = GeneralItem("Name a colour.", "Blue.", context="Primary colours only.")
    gen = general_example(tok, item)
    assert gen is not None
    assert gen.input_ids[: gen.prompt_len] == tok.encode(
        format_prompt("Name a colour.", "Primary colours only.")
    )
    assert not any(i >= IMAGE_TOKEN_OFFSET for i in gen.input_ids)
    with pytest.raises(ExampleError):
        general_example(tok, GeneralItem("Describe <image>", "x"))


def test_truncation_never_cuts_inside_an_image(tok: LLMCXRTokenizer) -> None:
    long_report = " ".join(["Stable postoperative changes of the chest."] * 40)
    full = report_example(tok, CODES, long_report)
    assert full is not None and len(full.input_ids) > 400
    cut = report_example(tok, CODES, long_report, max_length=400)
    assert cut is not None and len(cut.input_ids) == 400
    assert cut.input_ids == full.input_ids[:400] and cut.labels == full.labels[:400]
    image = image_example(tok, CODES, "Normal.")
    assert image is not None
    n = image.prompt_len
    # a cut inside the image's span moves before its '<': nothing left to learn -> None
    for max_length in (n + 1, n + 100, n + 257):
        assert image_example(tok, CODES, "Normal.", max_length=max_length) is None
    kept = image_example(tok, CODES, "Normal.", max_length=n + 258)  # '<' + 256 + '>'
    assert kept is not None and kept.input_ids == image.input_ids[: n + 258]
    spans = image_spans(image.input_ids, tok.image_open_id, tok.image_close_id)
    assert spans == [(n, n + 258)]


def test_read_general(tmp_path: Path) -> None:
    path = tmp_path / "dolly.jsonl"
    lines = [
        {"instruction": "Say hi.", "context": "", "response": "Hi.", "category": "open_qa"},
        {"instruction": "Sum 2 and 2.", "context": "Arithmetic.", "response": "4"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    items = read_general(path)
    assert items == [
        GeneralItem("Say hi.", "Hi.", None),
        GeneralItem("Sum 2 and 2.", "4", "Arithmetic."),
    ]
    path.write_text('{"instruction": "x", "response": "y"}\n{"instruction": "x"}\n')
    with pytest.raises(ExampleError, match=r"dolly.jsonl:2: 'response'"):
        read_general(path)
    path.write_text("not json\n")
    with pytest.raises(ExampleError, match=r"dolly.jsonl:1: not JSON"):
        read_general(path)


def _record(
    i: int, *, view: str = "PA", order: int | None = 0, split: str = "train"
) -> ManifestRecord:
    return ManifestRecord(
        id=f"r{i}",
        image=Path(f"/nonexistent/{i}.png"),
        split=split,
        view=view,
        study_order=order,
        findings=f"Finding {i}.",
        impression=f"Impression {i}.",
        vqa=(VQAPair("Is it normal?", "yes"),),
    )


def test_stage_selection_and_alternation(tok: LLMCXRTokenizer) -> None:
    records = [
        _record(0),
        _record(1, view="LATERAL"),
        _record(2, order=1),
        _record(3, split="test"),
        _record(4, order=None),
    ]
    assert [r.id for r in select_records(records, paper_stage(1))] == ["r0", "r1", "r2", "r4"]
    assert [r.id for r in select_records(records, paper_stage(2))] == ["r0"]
    codes = {r.id: np.asarray(CODES) for r in records if r.id != "r4"}
    one = TrainingExamples(tok, select_records(records, paper_stage(1)), codes, paper_stage(1))
    assert [(s.kind, s.index) for s in one.specs] == [
        ("report", 0),
        ("image", 0),
        ("report", 1),
        ("image", 1),
        ("report", 2),
        ("image", 2),
    ]  # r4 has no codes (e.g. an unreadable image skipped)
    assert one.counts == {"report": 3, "image": 3, "vqa": 0, "general": 0}
    first = one[0]
    text = tok.decode(first["input_ids"][first["labels"].count(-100) :])
    assert text == "FINDINGS: Finding 0. IMPRESSION: Impression 0.\n\n### End"
    general = [GeneralItem(f"Task {i}.", f"Answer {i}.") for i in range(3)]
    two = TrainingExamples(
        tok, select_records(records, paper_stage(2)), codes, paper_stage(2), general
    )
    kinds = [s.kind for s in two.specs]
    assert kinds == ["report", "image", "vqa", "general"]  # 3 * 0.2 / 0.8 rounds to 1
    stage2_report = two[0]
    n = stage2_report["labels"].count(-100)
    assert tok.decode(stage2_report["input_ids"][n:]) == "Impression 0.\n\n### End"
    assert tok.decode(two[3]["input_ids"]).startswith("Below is an instruction")
    only_reports = TrainingExamples(
        tok, records[:1], codes, load_config(stage=2, tasks=("report",))
    )
    assert [s.kind for s in only_reports.specs] == ["report"]


def test_paraphrases_change_with_the_epoch(tok: LLMCXRTokenizer) -> None:
    records = [_record(i) for i in range(4)]
    codes = {r.id: np.asarray(CODES) for r in records}
    ds = TrainingExamples(tok, records, codes, paper_stage(1))
    epoch0 = [ds[i]["input_ids"] for i in range(len(ds))]
    assert epoch0 == [ds[i]["input_ids"] for i in range(len(ds))]  # reproducible
    ds.set_epoch(1)
    assert epoch0 != [ds[i]["input_ids"] for i in range(len(ds))]


def test_collator_pads_right() -> None:
    batch = Collator(pad_to_multiple_of=8, trim_prompt=False)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
            {"input_ids": [9], "labels": [9], "attention_mask": [1]},
        ]
    )
    assert batch["input_ids"].shape == (2, 8) and "logits_to_keep" not in batch
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [9] + [-100] * 7
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 1]


def test_trimmed_prompt_logits_give_the_same_loss(
    tok: LLMCXRTokenizer, base_bundle: ModelBundle
) -> None:
    import torch
    from transformers import GPTNeoXForCausalLM

    features = [
        e.to_features()
        for e in (
            report_example(tok, CODES, "Normal chest."),
            vqa_example(tok, CODES, "Is there an effusion?", "A small one on the left."),
        )
        if e is not None
    ]
    full = Collator(trim_prompt=False)(features)
    trimmed = Collator()(features)
    first = min(f["labels"].count(-100) for f in features)  # the earliest response token
    assert trimmed["logits_to_keep"] == full["input_ids"].shape[1] - (first - 1)
    assert torch.equal(trimmed["labels"], full["labels"][:, first - 1 :])
    assert torch.equal(trimmed["input_ids"], full["input_ids"])
    model = GPTNeoXForCausalLM.from_pretrained(str(base_bundle.llm_dir)).eval()
    with torch.no_grad():
        a = model(**full)
        b = model(**trimmed)
    assert b.logits.shape[1] == trimmed["logits_to_keep"] < a.logits.shape[1] / 10
    assert torch.allclose(a.loss, b.loss, atol=1e-5)
