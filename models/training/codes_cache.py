"""Each manifest image's 256 VQ-GAN codes, encoded once and kept in a SQLite file.

Training reads every image once per run through ``load_gray8`` ->
:func:`models.preprocess.to_model_input` -> the bundle's VQ-GAN encoder; the codes are
stored keyed by the record id, the image file's sha256 and the encoder's sha256, so a
second run (or a resumed one) encodes nothing, while a changed image or another encoder
is encoded anew. A file's sha256 is remembered with its size and modification time, so
an unchanged image is not even re-hashed.

Images are read by a caller-supplied ``load_gray8(path) -> uint8[rows, columns]``:
:func:`load_gray8_pil` (the default) reads JPG/PNG; the node's CLI passes one that also
converts DICOM as ingest does (this package never imports pydicom). The SQLite file is
created with the process umask.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from models.bundle import ENCODER_FILE, ModelBundle, sha256_file
from models.dataset import ManifestRecord
from models.layout import CODES_PER_IMAGE, N_IMAGE_CODES
from models.preprocess import to_model_input

__all__ = [
    "CodesCache",
    "CodesCacheError",
    "GrayLoader",
    "ImageEncoder",
    "encoder_sha256",
    "load_gray8_pil",
]

log = logging.getLogger(__name__)

#: ``load_gray8(path) -> uint8[rows, columns]``
GrayLoader = Callable[[Path], npt.NDArray[np.uint8]]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS files (record_id TEXT PRIMARY KEY, path TEXT NOT NULL,"
    " size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS codes (record_id TEXT NOT NULL, image_sha256 TEXT NOT NULL,"
    " encoder_sha256 TEXT NOT NULL, codes BLOB NOT NULL,"
    " PRIMARY KEY (record_id, image_sha256, encoder_sha256))",
)


class CodesCacheError(ValueError):
    """An image cannot be read or encoded (the message names the record id)."""


class ImageEncoder(Protocol):
    """The VQ-GAN encoder (``models.image_tokenizer.OnnxImageTokenizer``)."""

    def encode(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """Images ``float32[B, 3, 256, 256]`` in [-1, 1] -> codes ``int64[B, 256]``."""
        ...


def load_gray8_pil(path: Path) -> npt.NDArray[np.uint8]:
    """A JPG or PNG file as 8-bit grey (``uint8[rows, columns]``) with PIL.

    Raises
    ------
    OSError
        The file cannot be opened or decoded (PIL's ``UnidentifiedImageError`` included).
    """
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def encoder_sha256(bundle: ModelBundle) -> str:
    """The sha256 of the bundle's ``vqgan/encoder.onnx`` as its manifest records it."""
    return str(bundle.files[ENCODER_FILE]["sha256"])


class CodesCache:
    """The SQLite store of image codes for one encoder.

    Parameters
    ----------
    path
        The SQLite file (created with its folder when absent).
    encoder_sha
        The encoder's sha256 (:func:`encoder_sha256`): codes of other encoders are ignored.
    """

    def __init__(self, path: Path | str, encoder_sha: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.encoder_sha = encoder_sha
        self._db = sqlite3.connect(str(self.path))
        for statement in _SCHEMA:
            self._db.execute(statement)
        self._db.commit()
        #: images encoded / found in the cache by the last :meth:`ensure`
        self.encoded = 0
        self.cached = 0

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> CodesCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def image_sha256(self, record: ManifestRecord) -> str:
        """The sha256 of ``record.image`` (re-hashed only when its size or mtime changed)."""
        try:
            st = record.image.stat()
        except OSError as exc:
            raise CodesCacheError(
                f"record {record.id}: image not readable ({exc.strerror})"
            ) from None
        key = (str(record.image), st.st_size, st.st_mtime_ns)
        row = self._db.execute(
            "SELECT path, size, mtime_ns, sha256 FROM files WHERE record_id = ?", (record.id,)
        ).fetchone()
        if row is not None and tuple(row[:3]) == key:
            return str(row[3])
        digest = sha256_file(record.image)
        self._db.execute(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", (record.id, *key, digest)
        )
        return digest

    def get(self, record: ManifestRecord) -> npt.NDArray[np.int64] | None:
        """The cached codes of ``record`` (``int64[256]``), or ``None``."""
        row = self._db.execute(
            "SELECT codes FROM codes WHERE record_id = ? AND image_sha256 = ?"
            " AND encoder_sha256 = ?",
            (record.id, self.image_sha256(record), self.encoder_sha),
        ).fetchone()
        if row is None:
            return None
        return np.frombuffer(row[0], dtype="<i2").astype(np.int64)

    def put(self, record: ManifestRecord, codes: npt.NDArray[np.integer]) -> None:
        """Store the 256 codes of ``record`` (committed by :meth:`ensure` per batch)."""
        flat = np.asarray(codes).reshape(-1)
        if flat.shape != (CODES_PER_IMAGE,) or flat.min() < 0 or flat.max() >= N_IMAGE_CODES:
            raise CodesCacheError(f"record {record.id}: the encoder gave invalid codes")
        self._db.execute(
            "INSERT OR REPLACE INTO codes VALUES (?, ?, ?, ?)",
            (record.id, self.image_sha256(record), self.encoder_sha, flat.astype("<i2").tobytes()),
        )

    def ensure(
        self,
        records: Iterable[ManifestRecord],
        encoder: ImageEncoder,
        load_gray8: GrayLoader = load_gray8_pil,
        *,
        batch: int = 8,
        workers: int = 2,
        skip_unreadable: bool = False,
    ) -> dict[str, npt.NDArray[np.int64]]:
        """Codes of every record, encoding (and storing) only those not cached.

        Parameters
        ----------
        records
            The records (their ``image`` paths are read).
        encoder
            The VQ-GAN encoder, called once per ``batch`` missing images.
        load_gray8
            Reads an image file as ``uint8[rows, columns]``.
        batch, workers
            Images an encoder call; threads reading images.
        skip_unreadable
            Leave out (and count in the log) images that cannot be read, rather than raise.

        Returns
        -------
        dict
            Record id -> ``int64[256]`` codes.

        Raises
        ------
        CodesCacheError
            An image cannot be read (unless ``skip_unreadable``) or encoded.
        """
        out: dict[str, npt.NDArray[np.int64]] = {}
        missing: list[ManifestRecord] = []
        for record in records:
            try:
                codes = self.get(record)
            except CodesCacheError:
                if not skip_unreadable:
                    raise
                continue
            if codes is None:
                missing.append(record)
            else:
                out[record.id] = codes
        self.cached, self.encoded = len(out), 0
        if missing:
            log.info("encoding %d image(s) with the VQ-GAN (%d cached)", len(missing), len(out))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for start in range(0, len(missing), batch):
                chunk = missing[start : start + batch]
                self._encode_chunk(chunk, encoder, load_gray8, pool, skip_unreadable, out)
                if (start // batch) % 100 == 99:
                    log.info("encoded %d of %d image(s)", self.encoded, len(missing))
        self._db.commit()
        return out

    def _encode_chunk(
        self,
        chunk: Sequence[ManifestRecord],
        encoder: ImageEncoder,
        load_gray8: GrayLoader,
        pool: ThreadPoolExecutor,
        skip_unreadable: bool,
        out: dict[str, npt.NDArray[np.int64]],
    ) -> None:
        def prepare(record: ManifestRecord) -> npt.NDArray[np.float32] | None:
            try:
                return to_model_input(load_gray8(record.image))
            except (OSError, ValueError, TypeError) as exc:
                if skip_unreadable:
                    log.warning("skipping an unreadable image (%s)", type(exc).__name__)
                    return None
                raise CodesCacheError(
                    f"record {record.id}: image cannot be read ({type(exc).__name__})"
                ) from None

        inputs = list(pool.map(prepare, chunk))
        ready = [(r, x) for r, x in zip(chunk, inputs, strict=True) if x is not None]
        if not ready:
            return
        codes = encoder.encode(np.stack([x for _r, x in ready]))
        if codes.shape != (len(ready), CODES_PER_IMAGE):
            raise CodesCacheError(f"the encoder returned codes of shape {codes.shape}")
        for (record, _x), row in zip(ready, codes, strict=True):
            self.put(record, row)
            out[record.id] = np.asarray(row, dtype=np.int64)
        self.encoded += len(ready)
        self._db.commit()
