"""LLM-CXR token layout, prompt template, image injection and extraction."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from models.layout import (
    CODES_PER_IMAGE,
    END_ID,
    IMAGE_TOKEN_OFFSET,
    LLMCXR_LAYOUT,
    RESPONSE_MARKER_ID,
    VOCAB,
    TokenLayout,
    TokenLayoutError,
    codes_to_ids,
    ids_to_codes,
)
from models.prompts import (
    PromptError,
    extract_response,
    format_prompt,
    report_prompt,
    report_to_image_prompt,
    training_text,
    vqa_prompt,
)
from models.text import (
    NEOX_VOCAB_SHA256,
    LLMCXRTokenizer,
    base_vocab_fingerprint,
    build_llmcxr_tokenizer,
    extract_image_codes,
    neox_tokenizer_json,
    save_tokenizer_dir,
)
from tests.models.llm_fixtures import llmcxr_tokenizer, with_placeholders

CODES = [(7 * i + 3) % 1024 for i in range(CODES_PER_IMAGE)]


@pytest.fixture(scope="module")
def real_tok() -> LLMCXRTokenizer:
    return LLMCXRTokenizer(build_llmcxr_tokenizer())


def test_layout_constants() -> None:
    assert LLMCXR_LAYOUT.to_dict() == {
        "text_vocab": 50281,
        "image_token_offset": 50281,
        "n_image_codes": 1024,
        "codes_per_image": 256,
        "vocab_size": 51305,
    }
    assert codes_to_ids([0] * 255 + [1023]) == [50281] * 255 + [51304]
    assert ids_to_codes(codes_to_ids(CODES)) == CODES
    with pytest.raises(TokenLayoutError, match="1024"):
        codes_to_ids([1024] * 256)
    with pytest.raises(TokenLayoutError, match="255"):
        codes_to_ids([0] * 255)
    with pytest.raises(TokenLayoutError, match="vocab_size"):
        TokenLayout(vocab_size=51306)
    with pytest.raises(TokenLayoutError, match="codes_per_image"):
        TokenLayout.from_dict(
            {k: v for k, v in LLMCXR_LAYOUT.to_dict().items() if k != "codes_per_image"}
        )


def test_real_tokenizer_ids_match_the_published_layout(real_tok: LLMCXRTokenizer) -> None:
    raw = real_tok.raw
    assert len(real_tok) == 50281
    assert raw.token_to_id("<|endoftext|>") == 0
    assert raw.token_to_id("<|padding|>") == 1
    assert raw.token_to_id("### End") == 50277 == END_ID
    assert raw.token_to_id("### Instruction:") == 50278
    assert raw.token_to_id("### Response:") == 50279
    assert raw.token_to_id("### Response:\n") == 50280 == RESPONSE_MARKER_ID
    # the longer special wins: the prompt's final "### Response:\n" is one token
    assert real_tok.encode("### Response:\n") == [50280]
    assert real_tok.encode("x\n\n### End")[-1] == 50277
    base = Tokenizer.from_str(neox_tokenizer_json())
    assert base.get_vocab_size(with_added_tokens=True) == 50277
    assert base_vocab_fingerprint(base) == NEOX_VOCAB_SHA256
    # real GPT-NeoX word pieces, no placeholder entries
    assert raw.id_to_token(50276) == "  " and raw.id_to_token(1000) == "err"
    assert not [t for t in raw.get_vocab() if t.startswith("<|unused")]


def test_image_placeholder_is_three_tokens_in_context(real_tok: LLMCXRTokenizer) -> None:
    enc = real_tok.raw.encode("Input:\n<image>\n\n### Response:\n")
    assert enc.tokens[:6] == ["Input", ":", "Ċ", "<", "image", ">"]
    assert real_tok.encode("<image>") == [29, 5695, 31]
    ids = real_tok.encode(report_prompt())
    assert ids.count(5695) == 1
    k = ids.index(5695)
    assert ids[k - 1] == real_tok.image_open_id == 29
    assert ids[k + 1] == real_tok.image_close_id == 31


def test_image_injection(real_tok: LLMCXRTokenizer) -> None:
    tok = real_tok
    prompt = report_prompt()
    plain = tok.encode(prompt)
    ids = tok.encode_with_image(prompt, CODES)
    image_ids = [IMAGE_TOKEN_OFFSET + c for c in CODES]
    start = ids.index(IMAGE_TOKEN_OFFSET + CODES[0])
    assert ids[start : start + 256] == image_ids
    assert ids[start - 1] == tok.image_open_id
    assert ids[start + 256] == tok.image_close_id
    assert sum(1 for i in ids if i >= IMAGE_TOKEN_OFFSET) == 256
    # everything around the image is the plain tokenization of the prompt
    k_open = plain.index(tok.image_open_id, len(plain) - 12)
    n_mid = len(plain) - (len(ids) - 256)
    assert ids[:start] == plain[: k_open + 1]
    assert ids[start + 256 :] == plain[k_open + 1 + n_mid :]
    assert ids[-1] == RESPONSE_MARKER_ID
    assert tok.render(ids) == prompt
    assert max(ids) < VOCAB


def test_injection_errors(real_tok: LLMCXRTokenizer) -> None:
    with pytest.raises(TokenLayoutError, match="255"):
        real_tok.encode_with_image(report_prompt(), CODES[:255])
    with pytest.raises(TokenLayoutError, match="outside"):
        real_tok.encode_with_image(report_prompt(), [1024] * 256)
    with pytest.raises(TokenLayoutError, match="once"):
        real_tok.encode_with_image(report_prompt() + "<image>", CODES)
    with pytest.raises(TokenLayoutError, match="once"):
        real_tok.encode_with_image("no image here", CODES)
    with pytest.raises(TokenLayoutError, match="no image codes"):
        real_tok.encode_with_image(report_prompt(), None)


def _padded_tokenizer(real: LLMCXRTokenizer) -> Tokenizer:
    """The right length and special ids, but entries 50000.. replaced by placeholders."""
    return Tokenizer.from_str(with_placeholders(real.raw.to_str(), range(50000, 50254)))


def test_wrong_tokenizers_are_refused_with_the_file_and_the_layout(
    real_tok: LLMCXRTokenizer, tmp_path: Path
) -> None:
    needs = r"layout needs 50281 text entries .* followed by 1024 image ids \(50281\.\.51304\)"
    # GPT-NeoX-20B without the specials: wrong length, the file named
    base_file = tmp_path / "neox" / "tokenizer.json"
    base_file.parent.mkdir()
    base_file.write_text(neox_tokenizer_json())
    wrong_length = f"{base_file}: .*50277 entries; the LLM-CXR {needs}"
    with pytest.raises(TokenLayoutError, match=wrong_length):
        LLMCXRTokenizer.from_dir(base_file.parent)
    # one entry too many
    extra = Tokenizer.from_str(real_tok.raw.to_str())
    extra.add_special_tokens(["<extra>"])
    with pytest.raises(TokenLayoutError, match="50282 entries"):
        LLMCXRTokenizer(extra)
    # the right length and ids, padded with placeholders: refused, never decoded into a report
    padded = _padded_tokenizer(real_tok)
    assert padded.get_vocab_size(with_added_tokens=True) == 50281
    padded_dir = tmp_path / "padded"
    padded_dir.mkdir()
    padded.save(str(padded_dir / "tokenizer.json"))
    with pytest.raises(TokenLayoutError, match=r"not GPT-NeoX-20B's vocabulary.*<\|unused_50"):
        LLMCXRTokenizer.from_dir(padded_dir)
    # not a tokenizer at all
    (padded_dir / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    with pytest.raises(TokenLayoutError, match=f"{padded_dir}/tokenizer.json: not a readable"):
        LLMCXRTokenizer.from_dir(padded_dir)
    # no tokenizer.json at all
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenLayoutError, match=f"no tokenizer.json .*empty; the LLM-CXR {needs}"):
        LLMCXRTokenizer.from_dir(tmp_path / "empty")


def test_saved_tokenizer_loads_with_transformers_offline(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = llmcxr_tokenizer()
    save_tokenizer_dir(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(hf) == 50281
    assert hf.eos_token_id == 0 and hf.pad_token_id == 0
    text = vqa_prompt("Is there a pneumothorax?")
    assert hf(text)["input_ids"] == LLMCXRTokenizer.from_dir(tmp_path).encode(text)


def test_prompt_template_is_dollys() -> None:
    assert report_prompt() == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nGenerate free-text radiology reports for "
        "the entered chest X-ray images.\n\nInput:\n<image>\n\n### Response:\n"
    )
    assert format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert vqa_prompt("Is the heart enlarged?").endswith(
        "### Instruction:\nIs the heart enlarged?\n\nInput:\n<image>\n\n### Response:\n"
    )
    p = report_to_image_prompt("No effusion.")
    assert "Input:\nNo effusion.\n\n### Response:\n" in p and "<image>" not in p
    with pytest.raises(PromptError):
        report_to_image_prompt("  ")
    with pytest.raises(PromptError):
        vqa_prompt("what about <image>?")
    full = training_text(report_prompt(), "IMPRESSION: normal.")
    assert full.endswith("### Response:\nIMPRESSION: normal.\n\n### End")
    assert extract_response(full) == "IMPRESSION: normal."
    assert extract_response("No acute process.\n\n### End junk") == "No acute process."


def test_extract_image_codes() -> None:
    ids = [IMAGE_TOKEN_OFFSET + c for c in CODES]
    assert extract_image_codes([29, *ids, 31, END_ID], open_id=29, close_id=31) == CODES
    assert extract_image_codes([50280, *ids, END_ID, 5, 6]) == CODES
    with pytest.raises(TokenLayoutError, match="255 codes"):
        extract_image_codes(ids[:255])
    with pytest.raises(TokenLayoutError, match="257 codes"):
        extract_image_codes([*ids, 50281])
    with pytest.raises(TokenLayoutError, match="non-image"):
        extract_image_codes([*ids[:100], 187, *ids[100:]])
    with pytest.raises(TokenLayoutError, match="non-image"):
        extract_image_codes([29, *ids, 31])  # brackets only allowed when named
    with pytest.raises(TokenLayoutError, match="non-image"):
        extract_image_codes([*ids[:255], VOCAB])


def test_report_to_image_training_text_starts_response_with_open_bracket(
    real_tok: LLMCXRTokenizer,
) -> None:
    """The backend appends ``<`` after the response marker: the same ids training saw."""
    full = training_text(report_to_image_prompt("No effusion."), "<image>")
    ids = real_tok.encode(full)
    k = ids.index(RESPONSE_MARKER_ID)
    assert ids[k + 1 : k + 4] == [real_tok.image_open_id, 5695, real_tok.image_close_id]
    assert ids[-1] == END_ID
