"""High-level LLM-CXR tasks: CXR -> report, CXR-VQA, report -> CXR.

``LLMCXR`` ties a :class:`~models.bundle.ModelBundle`, a generation backend and the ONNX
image tokenizer together: the image goes through the VQ-GAN encoder, its 256 codes are
injected into the prompt in place of ``<image>``, the backend generates, and the response is
returned with provenance (model name and version, demo flag, prompt, settings, timings).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from models.backends.base import (
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
)
from models.bundle import ModelBundle
from models.layout import CODES_PER_IMAGE, TokenLayoutError
from models.prompts import (
    extract_response,
    report_prompt,
    report_to_image_prompt,
    vqa_prompt,
)
from models.results import (
    Answer,
    GeneratedImage,
    InferenceError,
    ModelInputError,
    ReportDraft,
    check_model_input,
    split_sections,
    timings_of,
)
from models.text import LLMCXRTokenizer

log = logging.getLogger(__name__)


class ImageTokenizer(Protocol):
    """What :class:`LLMCXR` needs from the image tokenizer (``OnnxImageTokenizer``)."""

    def encode(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """Images ``[B,3,256,256]`` in [-1, 1] -> codes ``[B,256]``."""
        ...

    def decode(self, codes: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
        """Codes ``[B,256]`` -> images ``[B,3,256,256]``."""
        ...


def _image_tokenizer(
    bundle: ModelBundle, device: str | None, providers: Sequence[str] | None
) -> ImageTokenizer:
    """The PyTorch VQ-GAN on ``device`` when one is asked for and the bundle keeps its
    checkpoint, else the ONNX graphs (see :meth:`LLMCXR.from_bundle`)."""
    from models.image_tokenizer import OnnxImageTokenizer

    if device is not None:
        source = bundle.vqgan_checkpoint
        if source is not None:
            from models.torch_image_tokenizer import TorchImageTokenizer

            return TorchImageTokenizer.from_checkpoint(*source, device=device)
        log.warning(
            "the VQ-GAN stays on onnxruntime, not on %s: the bundle keeps no vqgan/*.ckpt "
            "and YAML (import it with the source kept)",
            device,
        )
    return OnnxImageTokenizer(bundle.encoder_path, bundle.decoder_path, providers=providers)


class LLMCXR:
    """The LLM-CXR model: VQ-GAN (ONNX, or PyTorch on the LLM's GPU) + LLM backend + prompts.

    Parameters
    ----------
    bundle
        The opened model bundle (name, version, demo flag, generation defaults).
    backend
        A loaded or loadable :class:`~models.backends.base.GenerationBackend`.
    image_tokenizer
        ``OnnxImageTokenizer`` of the bundle (or anything with ``encode``/``decode``).
    tokenizer
        The text tokenizer; default: read from ``bundle.llm_dir``.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        backend: GenerationBackend,
        image_tokenizer: ImageTokenizer,
        *,
        tokenizer: LLMCXRTokenizer | None = None,
    ) -> None:
        self.bundle = bundle
        self.backend = backend
        self.image_tokenizer = image_tokenizer
        self.tokenizer = tokenizer or LLMCXRTokenizer.from_dir(bundle.llm_dir)
        self.defaults = dict(bundle.generation)

    @classmethod
    def from_bundle(
        cls,
        bundle: ModelBundle | Path | str,
        *,
        backend: str = "transformers",
        backend_options: dict[str, Any] | None = None,
        providers: Sequence[str] | None = None,
        load: bool = True,
        image_device: str | None = None,
    ) -> LLMCXR:
        """Open a bundle, build its backend and image tokenizer, optionally load the LLM.

        The image tokenizer is the bundle's ONNX graphs on onnxruntime (``providers``),
        unless ``image_device`` names a PyTorch device (by default the backend's
        ``device`` option when it is CUDA) and the bundle keeps the VQ-GAN's checkpoint
        (:attr:`ModelBundle.vqgan_checkpoint`): then the PyTorch VQ-GAN on that device
        (:mod:`models.torch_image_tokenizer`), beside the LLM rather than on the host's CPU.
        """
        from models.backends import make_backend

        b = bundle if isinstance(bundle, ModelBundle) else ModelBundle.open(Path(bundle))
        be = make_backend(backend, b.llm_dir, **(backend_options or {}))
        if load:
            be.load()
        if image_device is None:
            device = str((backend_options or {}).get("device") or "cpu")
            image_device = device if device.startswith("cuda") else None
        return cls(b, be, _image_tokenizer(b, image_device, providers))

    @property
    def model_name(self) -> str:
        """The bundle's model name."""
        return self.bundle.model_name

    @property
    def model_version(self) -> str:
        """The bundle's model version."""
        return self.bundle.model_version

    def _request(
        self,
        ids: list[int],
        *,
        mode: str,
        max_new_tokens: int | None,
        default_key: str,
        greedy: bool | None,
        seed: int | None,
    ) -> GenerationRequest:
        d = self.defaults
        return GenerationRequest(
            prompt_ids=ids,
            max_new_tokens=int(max_new_tokens or d.get(default_key, 128)),
            mode="image" if mode == "image" else "text",
            greedy=bool(d.get("greedy", True) if greedy is None else greedy),
            seed=d.get("seed") if seed is None else seed,
            temperature=float(d.get("temperature", 1.0)),
            top_p=float(d.get("top_p", 0.92)),
            top_k=int(d.get("top_k", 0)),
        )

    def encode_images(self, images: Sequence[npt.NDArray[np.float32]]) -> npt.NDArray[np.int64]:
        """VQ-GAN codes ``[B, 256]`` of model inputs ``[3,256,256]`` (validated)."""
        batch = np.stack([check_model_input(x) for x in images])
        codes = self.image_tokenizer.encode(batch)
        if codes.shape != (len(images), CODES_PER_IMAGE):
            raise InferenceError(f"image tokenizer returned codes of shape {codes.shape}")
        return codes

    def _generate_one(self, req: GenerationRequest) -> GenerationResult:
        return self._generate([req])[0]

    def _generate(self, reqs: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """The backend's results for ``reqs`` in one batch.

        Raises
        ------
        InferenceError
            A request failed (the first failed one is named).
        """
        results = self.backend.generate(reqs)
        for res in results:
            if res.error is not None or res.stop_reason == "error":
                raise InferenceError(f"generation failed: {res.error}")
        return results

    def _read_images(
        self,
        prompt: str,
        images: Sequence[npt.NDArray[np.float32]],
        *,
        default_key: str,
        max_new_tokens: int | None,
        greedy: bool | None,
        seed: int | None,
    ) -> tuple[list[tuple[GenerationRequest, GenerationResult]], float]:
        """Encode ``images`` and answer ``prompt`` with each one's codes at ``<image>``, in
        one backend batch (``"text"`` mode; ``default_key`` names the default
        ``max_new_tokens``).

        Returns
        -------
        list of (GenerationRequest, GenerationResult), float
            Each image's request and result, in order, and the encode time per image (s).

        Raises
        ------
        ModelInputError
            An input is not a valid model input.
        InferenceError
            The image tokenizer or a generation failed.
        """
        t0 = time.perf_counter()
        codes = self.encode_images(images)
        encode_s = (time.perf_counter() - t0) / max(1, len(images))
        reqs = [
            self._request(
                self.tokenizer.encode_with_image(prompt, [int(c) for c in row]),
                mode="text",
                max_new_tokens=max_new_tokens,
                default_key=default_key,
                greedy=greedy,
                seed=seed,
            )
            for row in codes
        ]
        return list(zip(reqs, self._generate(reqs), strict=True)), encode_s

    def _provenance(self, prompt: str, req: GenerationRequest) -> dict[str, Any]:
        """The :class:`Provenance` fields of a result of ``req``."""
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "demo": self.bundle.demo,
            "prompt": prompt,
            "settings": self._settings(req),
        }

    def _settings(self, req: GenerationRequest) -> dict[str, Any]:
        """The request's settings and what computed it: the backend and its precision
        (transformers ``dtype``; llama.cpp ``quant`` and, when set, ``prefill_quant``),
        since the greedy text depends on them."""
        out: dict[str, Any] = {
            **req.settings(),
            "backend": getattr(self.backend, "name", type(self.backend).__name__),
        }
        for key in ("dtype", "quant", "prefill_quant"):
            value = getattr(self.backend, key, None)
            if value is not None:
                out[key] = str(value).removeprefix("torch.")
        return out

    def generate_text(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int | None = None,
        default_key: str = "vqa_max_new_tokens",
        greedy: bool | None = None,
        seed: int | None = None,
        on_token: Callable[[int], bool] | None = None,
    ) -> tuple[str, GenerationResult]:
        """Free text for a prompt already tokenized (``"text"`` mode): the response text and
        the backend's result. ``on_token`` streams the ids and may cancel
        (:class:`models.backends.base.GenerationRequest`); the bundle's defaults apply to
        what is not given (``default_key`` names the default ``max_new_tokens``).

        Raises
        ------
        InferenceError
            The backend failed.
        """
        req = replace(
            self._request(
                prompt_ids,
                mode="text",
                max_new_tokens=max_new_tokens,
                default_key=default_key,
                greedy=greedy,
                seed=seed,
            ),
            on_token=on_token,
        )
        res = self._generate_one(req)
        return self._text(res), res

    def _text(self, res: GenerationResult) -> str:
        text = res.text if res.text is not None else self.tokenizer.decode(res.token_ids)
        return extract_response(text)

    def report(
        self,
        image_in: npt.NDArray[np.float32],
        *,
        greedy: bool | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
    ) -> ReportDraft:
        """Draft a report for one model input (``models.preprocess.to_model_input`` output)."""
        return self.report_batch(
            [image_in], greedy=greedy, seed=seed, max_new_tokens=max_new_tokens
        )[0]

    def report_batch(
        self,
        images: Sequence[npt.NDArray[np.float32]],
        *,
        greedy: bool | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
    ) -> list[ReportDraft]:
        """Draft reports for several inputs in one backend batch (all inputs validated first)."""
        prompt = report_prompt()
        done, encode_s = self._read_images(
            prompt,
            images,
            default_key="report_max_new_tokens",
            max_new_tokens=max_new_tokens,
            greedy=greedy,
            seed=seed,
        )
        drafts = []
        for req, res in done:
            text = self._text(res)
            findings, impression = split_sections(text)
            drafts.append(
                ReportDraft(
                    text=text,
                    findings=findings,
                    impression=impression,
                    **self._provenance(prompt, req),
                    timings=timings_of(encode_s, res),
                    stop_reason=res.stop_reason,
                )
            )
        return drafts

    def vqa(
        self,
        image_in: npt.NDArray[np.float32],
        question: str,
        *,
        greedy: bool | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
    ) -> Answer:
        """Answer ``question`` about one CXR (the question is the instruction)."""
        if not isinstance(question, str) or not question.strip():
            raise ModelInputError("the question is empty")
        try:
            prompt = vqa_prompt(question)
        except ValueError as exc:
            raise ModelInputError(str(exc)) from exc
        [(req, res)], encode_s = self._read_images(
            prompt,
            [image_in],
            default_key="vqa_max_new_tokens",
            max_new_tokens=max_new_tokens,
            greedy=greedy,
            seed=seed,
        )
        return Answer(
            question=question,
            text=self._text(res),
            **self._provenance(prompt, req),
            timings=timings_of(encode_s, res),
            stop_reason=res.stop_reason,
        )

    def generate_image(
        self, text: str, *, greedy: bool | None = None, seed: int | None = None
    ) -> GeneratedImage:
        """Report -> CXR with constrained decoding (always exactly 256 codes), decoded (ONNX)."""
        try:
            prompt = report_to_image_prompt(text)
        except ValueError as exc:
            raise ModelInputError(str(exc)) from exc
        req = self._request(
            self.tokenizer.encode(prompt),
            mode="image",
            max_new_tokens=CODES_PER_IMAGE + 2,
            default_key="image_max_new_tokens",
            greedy=greedy,
            seed=seed,
        )
        res = self._generate_one(req)
        codes_list = res.image_codes or []
        if len(codes_list) != CODES_PER_IMAGE:
            raise TokenLayoutError(f"backend returned {len(codes_list)} image codes")
        codes = np.asarray(codes_list, dtype=np.int64)
        from models.preprocess import to_uint8_image

        t0 = time.perf_counter()
        decoded = self.image_tokenizer.decode(codes[None])[0]
        decode_img_s = time.perf_counter() - t0
        timings = timings_of(0.0, res)
        timings["image_decode_s"] = decode_img_s
        return GeneratedImage(
            codes=codes,
            image=to_uint8_image(decoded),
            **self._provenance(prompt, req),
            timings=timings,
        )

    def report_to_image(
        self, text: str, *, greedy: bool | None = None, seed: int | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        """Report -> CXR: ``(codes int64[256], image uint8[256, 256])``."""
        out = self.generate_image(text, greedy=greedy, seed=seed)
        return out.codes, out.image

    def health(self) -> dict[str, Any]:
        """Model identity plus the backend's health."""
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "demo": self.bundle.demo,
            "backend": self.backend.health(),
        }
