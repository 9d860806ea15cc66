"""The VQ-GAN image tokenizer in PyTorch, on the device the LLM runs on.

Same contract as :class:`models.image_tokenizer.OnnxImageTokenizer` (``encode``: float32
``[B, 3, 256, 256]`` in [-1, 1] -> int64 codes ``[B, 256]``; ``decode``: codes -> float32
images; the same input checks), computed by :class:`models.vqgan.VQModel` loaded from the
bundle's source checkpoint (``vqgan/*.ckpt`` and its YAML,
:attr:`models.bundle.ModelBundle.vqgan_checkpoint`). On a GPU it keeps the VQ-GAN beside the
LLM instead of on the host's CPU cores; :meth:`models.runtime.LLMCXR.from_bundle` chooses it
when the backend runs on CUDA and the bundle has the checkpoint. Codes agree with the ONNX
graphs' exactly or nearly (a latent equidistant from two codebook entries may round either
way in another kernel); ``benchmarks/bench_image_tokenizer.py`` measures the agreement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.image_tokenizer import (
    ImageTokenizerError,
    check_codes,
    check_images,
    run_in_batches,
)
from models.vqgan import VQModel, load_taming_checkpoint

__all__ = ["TorchImageTokenizer"]

log = logging.getLogger(__name__)


class TorchImageTokenizer:
    """Encode CXRs to VQ-GAN codes and decode codes to images with PyTorch.

    Parameters
    ----------
    model
        The VQ-GAN (fp32, eval mode); moved to ``device``.
    device
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    max_batch
        Largest batch computed at once; bigger inputs are chunked.

    Raises
    ------
    ImageTokenizerError
        ``max_batch`` below 1, or a CUDA device that this PyTorch cannot use.
    """

    def __init__(self, model: VQModel, *, device: str = "cpu", max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ImageTokenizerError(f"max_batch must be >= 1, got {max_batch}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ImageTokenizerError(f"device {device!r}: this PyTorch has no usable CUDA GPU")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.max_batch = max_batch
        cfg = model.cfg
        self.config: dict[str, Any] = cfg.to_dict()
        self.channels = int(cfg.in_channels)
        self.resolution = int(cfg.resolution)
        self.codes_per_image = int(cfg.codes_per_image)
        self.n_embed = int(cfg.n_embed)
        log.info(
            "VQ-GAN PyTorch tokenizer ready on %s: %d codes per image, codebook %d",
            self.device,
            self.codes_per_image,
            self.n_embed,
        )

    @classmethod
    def from_checkpoint(
        cls, ckpt: Path | str, yaml: Path | str, *, device: str = "cpu", max_batch: int = 8
    ) -> TorchImageTokenizer:
        """Load a taming checkpoint and its YAML (:func:`models.vqgan.load_taming_checkpoint`,
        which runs no code from the file)."""
        return cls(load_taming_checkpoint(ckpt, yaml), device=device, max_batch=max_batch)

    @property
    def providers(self) -> list[str]:
        """Where it runs, in the form of onnxruntime's provider list (``["torch:cuda"]``)."""
        return [f"torch:{self.device}"]

    def encode(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """Images ``float32[B, 3, 256, 256]`` in [-1, 1] -> codes ``int64[B, 256]``.

        Raises
        ------
        ImageTokenizerError
            As :func:`models.image_tokenizer.check_images`.
        """
        x = check_images(x, channels=self.channels, resolution=self.resolution)
        return self._run(x, self.model.encode_to_codes).astype(np.int64, copy=False)

    def decode(self, codes: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
        """Codes ``int64[B, 256]`` in ``[0, n_embed)`` -> images ``float32[B, 3, 256, 256]``
        (the raw decoder output, about [-1, 1]).

        Raises
        ------
        ImageTokenizerError
            As :func:`models.image_tokenizer.check_codes`.
        """
        c64 = check_codes(codes, codes_per_image=self.codes_per_image, n_embed=self.n_embed)
        images = self._run(c64, lambda b: self.model.decode_codes(b).float())
        return images.astype(np.float32, copy=False)

    def _run(
        self, x: npt.NDArray[Any], step: Callable[[torch.Tensor], torch.Tensor]
    ) -> npt.NDArray[Any]:
        """``step`` on ``x`` on the device without autograd, in chunks of at most
        :attr:`max_batch` rows (:func:`models.image_tokenizer.run_in_batches`), back on the
        host as one array."""
        with torch.inference_mode():
            return run_in_batches(
                x, self.max_batch, lambda b: step(torch.from_numpy(b).to(self.device)).cpu().numpy()
            )
