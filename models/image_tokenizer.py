"""The VQ-GAN image tokenizer at run time: the two exported ONNX graphs on onnxruntime.

``encode``: float32 ``[B, 3, 256, 256]`` in [-1, 1] -> int64 codes ``[B, 256]``;
``decode``: int64 codes ``[B, 256]`` -> float32 ``[B, 3, 256, 256]``. Inputs are
validated before they reach onnxruntime; large batches are split into chunks of
``max_batch``. The CUDA execution provider is used first when onnxruntime offers it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.onnx_export import DECODER_INPUT, ENCODER_INPUT

__all__ = [
    "ImageTokenizerError",
    "OnnxImageTokenizer",
    "batch_slices",
    "check_codes",
    "check_images",
    "default_providers",
    "run_in_batches",
]

log = logging.getLogger(__name__)

#: Slack allowed beyond [-1, 1] for float rounding in the caller's scaling.
RANGE_SLACK = 1e-3


class ImageTokenizerError(ValueError):
    """Bad input to the image tokenizer, or ONNX graphs that do not fit together."""


def default_providers() -> list[str]:
    """onnxruntime execution providers to use: CUDA first when available, then CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def check_images(
    x: npt.NDArray[np.float32], *, channels: int, resolution: int
) -> npt.NDArray[np.float32]:
    """Validate encoder input ``float32[B, channels, resolution, resolution]`` in [-1, 1];
    return it contiguous and clipped to [-1, 1].

    Raises
    ------
    ImageTokenizerError
        Wrong type, dtype, shape, empty batch, non-finite values or values outside
        [-1, 1] (beyond a 1e-3 slack).
    """
    r, c = resolution, channels
    if not isinstance(x, np.ndarray):
        raise ImageTokenizerError(f"images must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ImageTokenizerError(f"images must be float32, got {x.dtype}")
    if x.ndim != 4 or tuple(x.shape[1:]) != (c, r, r):
        hint = " (add a batch axis: x[None])" if x.ndim == 3 else ""
        raise ImageTokenizerError(
            f"images must be [batch, {c}, {r}, {r}], got {list(x.shape)}{hint}"
        )
    if x.shape[0] == 0:
        raise ImageTokenizerError("images batch is empty")
    if not np.all(np.isfinite(x)):
        raise ImageTokenizerError("images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.0 - RANGE_SLACK or hi > 1.0 + RANGE_SLACK:
        raise ImageTokenizerError(
            f"images must be scaled to [-1, 1] (models.preprocess.to_model_input), "
            f"got [{lo:.4g}, {hi:.4g}]"
        )
    return np.ascontiguousarray(np.clip(x, -1.0, 1.0))


def check_codes(
    codes: npt.NDArray[np.integer], *, codes_per_image: int, n_embed: int
) -> npt.NDArray[np.int64]:
    """Validate decoder input ``[B, codes_per_image]`` integers in ``[0, n_embed)``; return
    them as contiguous int64.

    Raises
    ------
    ImageTokenizerError
        Not an integer array, wrong shape, empty batch, or codes out of range.
    """
    n = codes_per_image
    if not isinstance(codes, np.ndarray):
        raise ImageTokenizerError(f"codes must be a numpy array, got {type(codes).__name__}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ImageTokenizerError(f"codes must be integers (int64), got {codes.dtype}")
    if codes.ndim != 2 or codes.shape[1] != n:
        hint = " (add a batch axis: codes[None])" if codes.ndim == 1 else ""
        raise ImageTokenizerError(f"codes must be [batch, {n}], got {list(codes.shape)}{hint}")
    if codes.shape[0] == 0:
        raise ImageTokenizerError("codes batch is empty")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= n_embed:
        raise ImageTokenizerError(
            f"codes must be in [0, {n_embed}) (image token id minus 50281), got [{lo}, {hi}]"
        )
    return np.ascontiguousarray(codes, dtype=np.int64)


def batch_slices(n: int, max_batch: int) -> list[slice]:
    """Slices of ``range(n)`` of at most ``max_batch`` items, in order."""
    return [slice(i, min(n, i + max_batch)) for i in range(0, n, max_batch)]


def run_in_batches(
    x: npt.NDArray[Any],
    max_batch: int,
    step: Callable[[npt.NDArray[Any]], npt.NDArray[Any]],
) -> npt.NDArray[Any]:
    """``step`` on the rows of ``x`` in chunks of at most ``max_batch`` (:func:`batch_slices`),
    in order.

    Parameters
    ----------
    x
        A non-empty batch (axis 0).
    max_batch
        The most rows one ``step`` call gets.
    step
        Maps a chunk of rows to one output row each.

    Returns
    -------
    numpy.ndarray
        The outputs of every chunk, joined along axis 0.
    """
    return np.concatenate([step(x[s]) for s in batch_slices(len(x), max_batch)], axis=0)


def _meta(session: ort.InferenceSession) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


class OnnxImageTokenizer:
    """Encode CXRs to VQ-GAN codes and decode codes to images with onnxruntime.

    Parameters
    ----------
    encoder_path, decoder_path : str or Path
        Graphs written by :func:`models.onnx_export.export_encoder` /
        :func:`~models.onnx_export.export_decoder`.
    providers : sequence of str, optional
        onnxruntime execution providers; default :func:`default_providers`.
    max_batch : int
        Largest batch sent to onnxruntime at once; bigger inputs are chunked.
    intra_op_threads : int, optional
        onnxruntime intra-op thread count (default: onnxruntime's choice).

    Raises
    ------
    ImageTokenizerError
        A file is missing, or the graphs' inputs / metadata disagree.
    """

    def __init__(
        self,
        encoder_path: str | Path,
        decoder_path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        max_batch: int = 8,
        intra_op_threads: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ImageTokenizerError(f"max_batch must be >= 1, got {max_batch}")
        self.encoder_path = Path(encoder_path)
        self.decoder_path = Path(decoder_path)
        for p in (self.encoder_path, self.decoder_path):
            if not p.is_file():
                raise ImageTokenizerError(f"ONNX graph {p} does not exist")
        self.max_batch = max_batch
        opts = ort.SessionOptions()
        if intra_op_threads is not None:
            opts.intra_op_num_threads = intra_op_threads
        provs = list(providers) if providers is not None else default_providers()
        self._enc = ort.InferenceSession(str(self.encoder_path), sess_options=opts, providers=provs)
        self._dec = ort.InferenceSession(str(self.decoder_path), sess_options=opts, providers=provs)
        if "CUDAExecutionProvider" in provs and (
            "CUDAExecutionProvider" not in self._enc.get_providers()
        ):
            # onnxruntime falls back to CPU when the CUDA/cuDNN libraries fail to load
            log.warning(
                "CUDAExecutionProvider was requested but the VQ-GAN runs on %s "
                "(CUDA 12 / cuDNN 9 libraries not found?)",
                self._enc.get_providers(),
            )
        self._enc_in = self._enc.get_inputs()
        self._dec_in = self._dec.get_inputs()
        if len(self._enc_in) != 1 or self._enc_in[0].name != ENCODER_INPUT:
            raise ImageTokenizerError(
                f"{self.encoder_path}: expected one input {ENCODER_INPUT!r}, got "
                f"{[i.name for i in self._enc_in]}"
            )
        if len(self._dec_in) != 1 or self._dec_in[0].name != DECODER_INPUT:
            raise ImageTokenizerError(
                f"{self.decoder_path}: expected one input {DECODER_INPUT!r}, got "
                f"{[i.name for i in self._dec_in]}"
            )
        enc_meta, dec_meta = _meta(self._enc), _meta(self._dec)
        if enc_meta.get("vqgan_config") != dec_meta.get("vqgan_config"):
            raise ImageTokenizerError(
                "encoder and decoder ONNX graphs were exported from different VQ-GAN configs"
            )
        self.config: dict[str, Any] = json.loads(enc_meta.get("vqgan_config", "{}"))
        shape = self._enc_in[0].shape  # ['batch', 3, 256, 256]
        self.channels = int(shape[1])
        self.resolution = int(shape[2])
        self.codes_per_image = int(self._dec_in[0].shape[1])
        self.n_embed = int(enc_meta.get("n_embed", self.config.get("n_embed", 1024)))
        log.info(
            "VQ-GAN ONNX tokenizer ready: providers=%s, %d codes per image, codebook %d",
            self._enc.get_providers(),
            self.codes_per_image,
            self.n_embed,
        )

    @property
    def providers(self) -> list[str]:
        """Execution providers the encoder session actually uses."""
        return list(self._enc.get_providers())

    def encode(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """Images ``float32[B, 3, 256, 256]`` in [-1, 1] -> codes ``int64[B, 256]``.

        Raises
        ------
        ImageTokenizerError
            Wrong type, dtype, shape, empty batch, non-finite values or values outside
            [-1, 1] (beyond a 1e-3 slack).
        """
        x = check_images(x, channels=self.channels, resolution=self.resolution)
        codes = run_in_batches(
            x, self.max_batch, lambda b: self._enc.run(None, {ENCODER_INPUT: b})[0]
        )
        return codes.astype(np.int64, copy=False)

    def decode(self, codes: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
        """Codes ``int64[B, 256]`` in ``[0, n_embed)`` -> images ``float32[B, 3, 256, 256]``.

        Other integer dtypes are widened to int64. The output is the raw decoder
        output (about [-1, 1]); see :func:`models.preprocess.to_uint8_image`.

        Raises
        ------
        ImageTokenizerError
            Not an integer array, wrong shape, empty batch, or codes out of range.
        """
        c64 = check_codes(codes, codes_per_image=self.codes_per_image, n_embed=self.n_embed)
        images = run_in_batches(
            c64, self.max_batch, lambda b: self._dec.run(None, {DECODER_INPUT: b})[0]
        )
        return images.astype(np.float32, copy=False)
