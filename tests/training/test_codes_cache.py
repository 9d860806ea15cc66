"""The codes cache: each image is encoded once, by the bundle's real ONNX encoder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from models.bundle import ModelBundle
from models.image_tokenizer import OnnxImageTokenizer
from models.preprocess import to_model_input
from models.training.codes_cache import (
    CodesCache,
    CodesCacheError,
    encoder_sha256,
    load_gray8_pil,
)
from tests.training.conftest import block_image, write_dataset


class CountingEncoder:
    """The bundle's ONNX encoder, counting the images it is given."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.tok = OnnxImageTokenizer(bundle.encoder_path, bundle.decoder_path)
        self.calls = 0
        self.images = 0

    def encode(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        self.calls += 1
        self.images += len(x)
        return self.tok.encode(x)


def test_second_run_encodes_nothing(tmp_path: Path, base_bundle: ModelBundle) -> None:
    manifest = write_dataset(tmp_path / "data")
    records = list(manifest.records)
    encoder = CountingEncoder(base_bundle)
    db = tmp_path / "work" / "codes.sqlite"
    with CodesCache(db, encoder_sha256(base_bundle)) as cache:
        first = cache.ensure(records, encoder, batch=3)
        assert (cache.encoded, cache.cached) == (4, 0)
    assert (encoder.calls, encoder.images) == (2, 4)  # batches of 3 + 1
    for record in records:  # the codes are the encoder's for the preprocessed image
        expected = encoder.tok.encode(to_model_input(load_gray8_pil(record.image))[None])[0]
        assert np.array_equal(first[record.id], expected) and first[record.id].shape == (256,)
    encoder.calls = encoder.images = 0
    with CodesCache(db, encoder_sha256(base_bundle)) as cache:
        second = cache.ensure(records, encoder)
        assert (cache.encoded, cache.cached) == (0, 4)
    assert encoder.calls == 0
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert db.is_file()


def test_changed_image_or_encoder_is_encoded_again(
    tmp_path: Path, base_bundle: ModelBundle
) -> None:
    records = list(write_dataset(tmp_path / "data").records)
    encoder = CountingEncoder(base_bundle)
    db = tmp_path / "codes.sqlite"
    with CodesCache(db, encoder_sha256(base_bundle)) as cache:
        cache.ensure(records, encoder)
    Image.fromarray(block_image(99), mode="L").save(records[0].image)
    os.utime(records[0].image, ns=(1, 1))  # a new mtime: the file is hashed again
    encoder.images = 0
    with CodesCache(db, encoder_sha256(base_bundle)) as cache:
        cache.ensure(records, encoder)
        assert (cache.encoded, cache.cached) == (1, 3)
    encoder.images = 0
    with CodesCache(db, "0" * 64) as cache:  # another encoder: nothing of the first is used
        cache.ensure(records, encoder)
        assert cache.encoded == 4
    assert encoder.images == 4


def test_unreadable_image(tmp_path: Path, base_bundle: ModelBundle) -> None:
    records = list(write_dataset(tmp_path / "data").records)
    records[1].image.write_bytes(b"not an image")
    encoder = CountingEncoder(base_bundle)
    with CodesCache(tmp_path / "codes.sqlite", encoder_sha256(base_bundle)) as cache:
        with pytest.raises(CodesCacheError, match="record r1: image cannot be read"):
            cache.ensure(records, encoder)
        codes = cache.ensure(records, encoder, skip_unreadable=True)
    assert sorted(codes) == ["r0", "r2", "r3"]
    records[2].image.unlink()
    with (
        CodesCache(tmp_path / "codes.sqlite", encoder_sha256(base_bundle)) as cache,
        pytest.raises(CodesCacheError, match="record r2: image not readable"),
    ):
        cache.ensure(records, encoder)
