"""The transformers backend: layout checks at load, batching, stops, constrained decoding."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from models.backends import make_backend
from models.backends.base import GenerationBackend, GenerationRequest
from models.backends.constraints import ImageCodeConstraint, TextOnlyConstraint
from models.backends.transformers_backend import TransformersBackend
from models.backends.transformers_support import cpu_supports_bf16, resolve_dtype
from models.layout import END_ID, IMAGE_TOKEN_OFFSET, VOCAB, TokenLayoutError
from models.prompts import report_prompt, report_to_image_prompt, vqa_prompt
from tests.models.llm_fixtures import _tmpdir, write_tiny_llm

CODES = [(5 * i + 1) % 1024 for i in range(256)]


@functools.cache
def _tiny_dir() -> Path:
    return write_tiny_llm(_tmpdir("tiny-llm-") / "llm", seed=3)


@functools.cache
def _backend() -> TransformersBackend:
    b = TransformersBackend(_tiny_dir(), dtype="float32")
    b.load()
    return b


@pytest.fixture
def backend() -> TransformersBackend:
    return _backend()


def _rigged(tmp_path: Path, favourite: int) -> TransformersBackend:
    """A model whose logits always prefer ``favourite`` (final norm -> constant vector)."""
    d = write_tiny_llm(tmp_path / "rigged", seed=1)
    b = TransformersBackend(d, dtype="float32")
    b.load()
    m = b.model
    with torch.no_grad():
        m.gpt_neox.final_layer_norm.weight.zero_()
        m.gpt_neox.final_layer_norm.bias.fill_(1.0)
        m.get_output_embeddings().weight.zero_()
        m.get_output_embeddings().weight[favourite] = 1.0
        m.get_output_embeddings().weight[IMAGE_TOKEN_OFFSET + 17] = 0.5
    return b


def test_backend_satisfies_the_protocol(backend: TransformersBackend) -> None:
    assert isinstance(backend, GenerationBackend)
    h = backend.health()
    assert h["loaded"] is True and h["dtype"] == "float32" and h["parameters"] > 0
    assert isinstance(make_backend("transformers", _tiny_dir()), TransformersBackend)
    with pytest.raises(ValueError, match="unknown"):
        make_backend("nope", _tiny_dir())


def test_dtype_resolution() -> None:
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("auto", "cpu") == (
        torch.bfloat16 if cpu_supports_bf16() else torch.float32
    )
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3", "cpu")


def test_constraint_processors() -> None:
    scores = torch.randn(2, VOCAB)
    scores[:, 5] = 100.0
    proc = ImageCodeConstraint(prompt_len=10, close_id=31)
    for step in (0, 100, 255):
        out = proc(torch.zeros(2, 10 + step, dtype=torch.long), scores.clone())
        assert torch.all(out[:, :IMAGE_TOKEN_OFFSET] == float("-inf"))
        assert torch.all(out.argmax(-1) >= IMAGE_TOKEN_OFFSET)
    out = proc(torch.zeros(2, 10 + 256, dtype=torch.long), scores.clone())
    assert out.argmax(-1).tolist() == [31, 31]
    assert torch.isfinite(out).sum().item() == 2
    text = TextOnlyConstraint()(torch.zeros(2, 3, dtype=torch.long), scores.clone())
    assert torch.all(text[:, IMAGE_TOKEN_OFFSET:] == float("-inf"))
    assert text.argmax(-1).tolist() == [5, 5]


@pytest.mark.slow
def test_constrained_image_decoding_gives_256_codes(backend: TransformersBackend) -> None:
    tok = backend.tokenizer
    ids = tok.encode(report_to_image_prompt("FINDINGS: Small left effusion. IMPRESSION: Effusion."))
    greedy, sampled = backend.generate(
        [
            GenerationRequest(prompt_ids=ids, max_new_tokens=1, mode="image"),
            GenerationRequest(prompt_ids=ids, max_new_tokens=1, mode="image", greedy=False, seed=5),
        ]
    )
    for res in (greedy, sampled):
        assert res.error is None and res.stop_reason == "image_complete"
        assert res.image_codes is not None and len(res.image_codes) == 256
        assert all(0 <= c < 1024 for c in res.image_codes)
        assert res.token_ids[:256] == [IMAGE_TOKEN_OFFSET + c for c in res.image_codes]
        assert res.token_ids[256:] == [tok.image_close_id]
        assert res.prompt_tokens == len(ids) + 1  # "<" appended
    assert len(set(sampled.image_codes or [])) > 1


def test_batched_equals_single_and_bad_request_is_isolated(backend: TransformersBackend) -> None:
    tok = backend.tokenizer
    a = tok.encode_with_image(report_prompt(), CODES)
    b = tok.encode_with_image(vqa_prompt("Is there cardiomegaly?"), CODES[::-1])
    singles = [
        backend.generate([GenerationRequest(prompt_ids=p, max_new_tokens=n)])[0]
        for p, n in ((a, 6), (b, 4))
    ]
    batch = backend.generate(
        [
            GenerationRequest(prompt_ids=a, max_new_tokens=6),
            GenerationRequest(prompt_ids=[VOCAB + 5], max_new_tokens=3),
            GenerationRequest(prompt_ids=b, max_new_tokens=4),
            GenerationRequest(prompt_ids=a, max_new_tokens=0),
            GenerationRequest(prompt_ids=a * 8, max_new_tokens=5),
        ]
    )
    assert [r.token_ids for r in (batch[0], batch[2])] == [s.token_ids for s in singles]
    assert [r.new_tokens for r in (batch[0], batch[2])] == [6, 4]
    assert batch[1].stop_reason == "error" and "outside" in (batch[1].error or "")
    assert batch[3].stop_reason == "error" and "max_new_tokens" in (batch[3].error or "")
    assert batch[4].stop_reason == "error" and "positions" in (batch[4].error or "")
    assert all(t < IMAGE_TOKEN_OFFSET for t in batch[0].token_ids)
    assert batch[0].text is not None and batch[0].prompt_tokens == len(a)
    assert batch[0].prefill_s > 0 and batch[0].decode_s > 0


def test_seeded_sampling_is_reproducible(backend: TransformersBackend) -> None:
    ids = backend.tokenizer.encode(vqa_prompt("Is there a pneumothorax?"))
    req = GenerationRequest(prompt_ids=ids, max_new_tokens=8, greedy=False, seed=11)
    one, two = backend.generate([req, req])
    other = backend.generate(
        [GenerationRequest(prompt_ids=ids, max_new_tokens=8, greedy=False, seed=12)]
    )[0]
    assert one.token_ids == two.token_ids
    assert one.token_ids != other.token_ids


def test_stops_on_end_and_masks_image_ids(tmp_path: Path) -> None:
    ids = [5, 6, 7, 50280]
    stopper = _rigged(tmp_path, END_ID)
    res = stopper.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=20)])[0]
    assert res.stop_reason == "end" and res.token_ids == [] and res.text == ""
    # an image id is the model's favourite second choice: masked in text mode
    talker = _rigged(tmp_path / "b", 42)
    with torch.no_grad():
        talker.model.get_output_embeddings().weight[IMAGE_TOKEN_OFFSET + 17] = 2.0
    res = talker.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=7)])[0]
    assert res.stop_reason == "max_new_tokens" and res.token_ids == [42] * 7
    # image mode overrides the favourite text token; the favourite image id wins
    img = talker.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=1, mode="image")])[0]
    assert img.image_codes == [17] * 256


def test_load_rejects_wrong_rows_and_tied_embeddings(tmp_path: Path) -> None:
    short = write_tiny_llm(tmp_path / "short", vocab=50281)
    with pytest.raises(TokenLayoutError, match="50281 rows"):
        TransformersBackend(short, dtype="float32").load()
    tied = write_tiny_llm(tmp_path / "tied", tie=True)
    with pytest.raises(TokenLayoutError, match="tied"):
        TransformersBackend(tied, dtype="float32").load()


def test_bf16_backend_generates(tmp_path: Path) -> None:
    b = TransformersBackend(_tiny_dir(), dtype="bfloat16")
    b.load()
    assert b.health()["dtype"] == "bfloat16"
    ids = b.tokenizer.encode_with_image(report_prompt(), CODES)
    res = b.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=3)])[0]
    assert res.error is None and res.new_tokens == 3


def test_published_weight_names_load_untied(backend: TransformersBackend) -> None:
    """The checkpoint's ``embed_out.weight`` (dolly/LLM-CXR key) lands in the output layer."""
    from safetensors.torch import load_file

    sd = load_file(str(_tiny_dir() / "model.safetensors"))
    assert "embed_out.weight" in sd and "gpt_neox.embed_in.weight" in sd
    m = backend.model
    assert torch.equal(m.get_output_embeddings().weight, sd["embed_out.weight"])
    assert torch.equal(m.get_input_embeddings().weight, sd["gpt_neox.embed_in.weight"])
    assert not torch.equal(sd["embed_out.weight"], sd["gpt_neox.embed_in.weight"])
