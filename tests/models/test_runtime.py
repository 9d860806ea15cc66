"""LLMCXR facade: report, VQA, report->CXR on the demo bundle, with provenance."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from models.backends.base import GenerationRequest, GenerationResult
from models.bundle import ModelBundle
from models.layout import IMAGE_TOKEN_OFFSET
from models.preprocess import to_model_input
from models.results import ModelInputError, split_sections
from models.runtime import LLMCXR
from tests.helpers import require_nih_pngs
from tests.models.llm_fixtures import demo_bundle_dir


class RecordingBackend:
    """Delegates to the real backend and keeps the requests it saw (a spy, not a mock)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.seen: list[GenerationRequest] = []

    def load(self) -> None:
        self.inner.load()

    def warmup(self) -> None:
        self.inner.warmup()

    def health(self) -> dict[str, Any]:
        return dict(self.inner.health())

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.seen.extend(requests)
        return list(self.inner.generate(requests))


@functools.cache
def _model() -> LLMCXR:
    m = LLMCXR.from_bundle(demo_bundle_dir(), backend_options={"dtype": "float32"})
    return LLMCXR(m.bundle, RecordingBackend(m.backend), m.image_tokenizer)


@pytest.fixture
def model() -> LLMCXR:
    return _model()


@functools.cache
def _cxr() -> npt.NDArray[np.float32]:
    from PIL import Image

    with Image.open(require_nih_pngs()[0]) as im:
        gray = np.asarray(im.convert("L"), dtype=np.uint8)
    return to_model_input(gray)


def test_split_sections() -> None:
    assert split_sections("FINDINGS: Lungs clear.\nIMPRESSION: Normal.") == (
        "Lungs clear.",
        "Normal.",
    )
    assert split_sections("No acute process.") == (None, "No acute process.")
    assert split_sections("impression: small effusion") == (None, "small effusion")
    assert split_sections("Portable view. FINDINGS: Clear.") == ("Portable view. Clear.", "")


def test_report_injects_the_encoder_codes_and_records_provenance(model: LLMCXR) -> None:
    x = _cxr()
    backend = model.backend
    assert isinstance(backend, RecordingBackend)
    backend.seen.clear()
    draft = model.report(x, max_new_tokens=6)
    codes = model.image_tokenizer.encode(x[None])[0]
    ids = backend.seen[0].prompt_ids
    image_ids = [i for i in ids if i >= IMAGE_TOKEN_OFFSET]
    assert image_ids == [IMAGE_TOKEN_OFFSET + int(c) for c in codes]
    assert draft.demo is True and draft.model_name == model.bundle.model_name
    assert draft.model_version == model.bundle.model_version
    assert draft.prompt.endswith("Input:\n<image>\n\n### Response:\n")
    assert draft.settings["greedy"] is True and draft.settings["max_new_tokens"] == 6
    assert draft.settings["backend"] == "transformers"
    assert set(draft.timings) >= {"encode_s", "prefill_s", "decode_s", "tokens"}
    assert 1 <= draft.timings["tokens"] <= 6
    assert draft.impression == draft.text or draft.findings is not None
    again = model.report(x, max_new_tokens=6)
    assert again.text == draft.text  # greedy is deterministic


def test_vqa_and_input_validation(model: LLMCXR) -> None:
    x = _cxr()
    ans = model.vqa(x, "Is there a pleural effusion?", max_new_tokens=4)
    assert ans.question == "Is there a pleural effusion?"
    assert ans.prompt.startswith("Below is an instruction")
    assert "### Instruction:\nIs there a pleural effusion?\n\nInput:\n<image>" in ans.prompt
    assert ans.timings["tokens"] <= 4
    with pytest.raises(ModelInputError, match="question"):
        model.vqa(x, "  ")
    with pytest.raises(ModelInputError, match="float32"):
        model.report(x[:, :128])
    with pytest.raises(ModelInputError, match=r"\[-1, 1\]"):
        model.report(x * 3)


@pytest.mark.slow
def test_report_to_image(model: LLMCXR) -> None:
    codes, image = model.report_to_image(
        "FINDINGS: Clear lungs. IMPRESSION: Normal chest.", seed=2, greedy=False
    )
    assert codes.shape == (256,) and codes.dtype == np.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 1024
    assert image.shape == (256, 256) and image.dtype == np.uint8
    with pytest.raises(ModelInputError, match="empty"):
        model.report_to_image("")


def test_report_batch(model: LLMCXR) -> None:
    x = _cxr()
    drafts = model.report_batch([x, np.flip(x, axis=2).copy()], max_new_tokens=3)
    assert len(drafts) == 2 and all(d.timings["tokens"] <= 3 for d in drafts)
    assert isinstance(model.bundle, ModelBundle)
    assert model.health()["backend"]["loaded"] is True
