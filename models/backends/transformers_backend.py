"""The default backend: in-process transformers ``GPTNeoXForCausalLM`` with KV cache.

On CPU it decodes with transformers' dynamic KV cache. On CUDA (``device="cuda"``, bf16 by
default) it uses a static KV cache (``cache_implementation="static"``: preallocated, fixed
shapes) and ``torch.compile`` of the decode step (transformers compiles the single-token
forward; prefill stays eager), with CUDA graphs (``compile_mode="reduce-overhead"``) so that a
decode step is one graph launch. Both choices are options and run on CPU too (tests).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.backends.base import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    error_result,
)
from models.backends.constraints import FirstStepTimer, ImageCodeConstraint, TextOnlyConstraint
from models.layout import (
    CODES_PER_IMAGE,
    END_ID,
    EOS_ID,
    IMAGE_TOKEN_OFFSET,
    VOCAB,
    TokenLayoutError,
    id_to_code,
)
from models.text import LLMCXRTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger(__name__)

CACHES = ("auto", "dynamic", "static")
STATIC_CACHE_BUCKET = 256
"""Static caches are sized up to a multiple of this, so that prompts of nearby lengths reuse
one cache shape (and one compiled graph)."""

WARMUP_PROMPT_TOKENS = 302  # a CXR->report prompt: instruction text + < 256 codes >

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``"auto"``: bf16 on CUDA with bf16 support or a bf16-capable CPU, else fp32."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}") from None


def static_cache_len(needed: int, max_positions: int) -> int:
    """Static-cache length for ``needed`` positions: rounded up to :data:`STATIC_CACHE_BUCKET`,
    at most ``max_positions``."""
    if needed < 1:
        raise ValueError(f"needed must be >= 1, got {needed}")
    bucketed = -(-needed // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
    return max(needed, min(bucketed, max_positions))


def check_model_layout(model: Any) -> None:
    """Raise :class:`TokenLayoutError` unless input and output embeddings have 51305 rows
    and are untied (the LLM-CXR layout on dolly-v2-3b)."""
    emb_in = model.get_input_embeddings().weight
    emb_out = model.get_output_embeddings().weight
    if emb_in.shape[0] != VOCAB:
        raise TokenLayoutError(f"input embedding has {emb_in.shape[0]} rows, need {VOCAB}")
    if emb_out.shape[0] != VOCAB:
        raise TokenLayoutError(
            f"output embedding (embed_out) has {emb_out.shape[0]} rows, need {VOCAB}"
        )
    if (
        getattr(model.config, "tie_word_embeddings", False)
        or emb_in.data_ptr() == emb_out.data_ptr()
    ):
        raise TokenLayoutError("input and output embeddings are tied; LLM-CXR's are untied")


class _SyncedTimer(FirstStepTimer):
    """:class:`FirstStepTimer` that waits for the GPU first (CUDA kernels run asynchronously)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.FloatTensor:  # type: ignore[override]
        if self.first is None:  # pragma: no cover - CUDA only (tests marked gpu)
            torch.cuda.synchronize(self.device)
        return super().__call__(input_ids, scores)


class TransformersBackend:
    """Generation with ``transformers`` (greedy or seeded sampling, batched, left padding).

    Parameters
    ----------
    model_dir
        A Hugging Face folder (``config.json``, weights, ``tokenizer.json``).
    dtype
        ``"auto"`` (bf16 where the CPU/GPU supports it, else fp32), ``"float32"``,
        ``"bfloat16"`` or ``"float16"``.
    device
        ``"cpu"`` or ``"cuda[:n]"``.
    threads
        ``torch.set_num_threads`` value, or ``None`` to leave it.
    max_batch
        Largest batch given to one ``generate`` call.
    cache
        KV cache: ``"dynamic"`` (grows per token), ``"static"`` (preallocated to the prompt
        plus new tokens, rounded up to :data:`STATIC_CACHE_BUCKET`; fixed shapes for
        ``torch.compile``) or ``"auto"`` (static on CUDA, dynamic on CPU).
    compile
        ``torch.compile`` the decode step (needs the static cache). ``None``: on CUDA with a
        static cache, else off. On CPU this is for tests (inductor needs a C++ compiler and
        compiles for minutes at full size).
    compile_mode
        ``torch.compile`` mode; ``None``: ``"reduce-overhead"`` (CUDA graphs) on CUDA,
        ``"default"`` on CPU.
    compile_backend
        ``torch.compile`` backend (``"inductor"``; ``"eager"`` traces without code generation).
    """

    name = "transformers"

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        threads: int | None = None,
        max_batch: int = 8,
        cache: str = "auto",
        compile: bool | None = None,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
    ) -> None:
        self.model_dir = Path(model_dir)
        if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        self.device = device
        self.dtype = resolve_dtype(dtype, device)
        self.threads = threads
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
        on_cuda = device.startswith("cuda")
        self.cache = ("static" if on_cuda else "dynamic") if cache == "auto" else cache
        self.compile = (on_cuda and self.cache == "static") if compile is None else bool(compile)
        if self.compile and self.cache != "static":
            raise ValueError("compile=True needs cache='static' (fixed shapes for torch.compile)")
        self.compile_mode = compile_mode or ("reduce-overhead" if on_cuda else "default")
        self.compile_backend = compile_backend
        self._model: Any = None
        self._tokenizer: LLMCXRTokenizer | None = None
        self._lock = threading.Lock()
        self._counters = {"requests": 0, "errors": 0, "new_tokens": 0}

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: LLMCXRTokenizer,
        *,
        device: str = "cpu",
        max_batch: int = 8,
        **options: Any,
    ) -> TransformersBackend:
        """Wrap an already built ``GPTNeoXForCausalLM`` (benchmarks, tests); layout checked.

        ``options``: ``cache``, ``compile``, ``compile_mode``, ``compile_backend`` as in the
        constructor.
        """
        check_model_layout(model)
        names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        dtype = next(model.parameters()).dtype
        backend = cls(
            Path("<in-memory>"),
            dtype=names[dtype],
            device=device,
            max_batch=max_batch,
            **options,
        )
        backend._model = model.to(device).eval()
        backend._tokenizer = tokenizer
        return backend

    @property
    def tokenizer(self) -> LLMCXRTokenizer:
        """The loaded tokenizer (``load`` first)."""
        if self._tokenizer is None:
            self.load()
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def model(self) -> Any:
        """The loaded ``GPTNeoXForCausalLM`` (``load`` first)."""
        if self._model is None:
            self.load()
        return self._model

    def load(self) -> None:
        """Load tokenizer and model from ``model_dir`` offline and check the layout."""
        if self._model is not None:
            return
        from transformers import GPTNeoXForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        if self.threads:
            torch.set_num_threads(self.threads)
        tokenizer = LLMCXRTokenizer.from_dir(self.model_dir)
        load: Any = GPTNeoXForCausalLM.from_pretrained
        model = load(str(self.model_dir), dtype=self.dtype, local_files_only=True)
        check_model_layout(model)
        model.to(self.device)
        model.eval()
        self._tokenizer = tokenizer
        self._model = model
        log.info(
            "transformers backend loaded (dtype=%s, device=%s, cache=%s, compile=%s)",
            self.dtype,
            self.device,
            self.cache,
            self.compile,
        )

    def warmup(self) -> None:
        """One tiny greedy generation.

        With a static cache the prompt is report-sized (~300 tokens), so that the cache shape
        (and, with ``compile``, the compiled decode graph) is the one reports use.
        """
        ids = self.tokenizer.encode("### Instruction:\nHello\n\n### Response:\n")
        if self.cache == "static":
            ids = (ids * (WARMUP_PROMPT_TOKENS // len(ids) + 1))[-WARMUP_PROMPT_TOKENS:]
        self.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=4)])

    def health(self) -> dict[str, Any]:
        """Loaded flag, device, dtype, model folder and counters."""
        out: dict[str, Any] = {
            "backend": self.name,
            "loaded": self._model is not None,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "cache": self.cache,
            "compile": self.compile,
            "model_dir": str(self.model_dir),
            **self._counters,
        }
        if self._model is not None:
            out["parameters"] = int(sum(p.numel() for p in self._model.parameters()))
        return out

    def _validate(self, req: GenerationRequest) -> str | None:
        try:
            req.validate()
        except GenerationError as exc:
            return str(exc)
        max_pos = int(getattr(self.model.config, "max_position_embeddings", 2048))
        new = CODES_PER_IMAGE + 2 if req.mode == "image" else req.max_new_tokens
        if len(req.prompt_ids) + new > max_pos:
            return f"prompt ({len(req.prompt_ids)}) + new tokens ({new}) exceed {max_pos} positions"
        return None

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run requests; invalid ones get a ``stop_reason="error"`` result, others run.

        Greedy requests of the same mode are batched (left padding); sampling requests run
        one by one so that a seed gives the same output whatever else is queued.
        """
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[tuple[str, bool], list[int]] = {}
        with self._lock:
            for i, req in enumerate(requests):
                self._counters["requests"] += 1
                err = self._validate(req)
                if err is not None:
                    self._counters["errors"] += 1
                    results[i] = error_result(req, err)
                elif req.greedy:
                    groups.setdefault((req.mode, True), []).append(i)
                else:
                    groups.setdefault((f"sample-{i}", False), []).append(i)
            for idxs in groups.values():
                for k in range(0, len(idxs), self.max_batch):
                    chunk = idxs[k : k + self.max_batch]
                    try:
                        outs = self._run([requests[j] for j in chunk])
                    except (RuntimeError, ValueError) as exc:  # one failing batch, not all
                        log.exception("generation failed")
                        outs = [
                            error_result(requests[j], f"generation failed: {exc}") for j in chunk
                        ]
                        self._counters["errors"] += len(chunk)
                    for j, res in zip(chunk, outs, strict=True):
                        results[j] = res
                        self._counters["new_tokens"] += res.new_tokens
        return [r for r in results if r is not None]

    def _run(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        from transformers import GenerationConfig, LogitsProcessorList

        tok = self.tokenizer
        first = batch[0]
        image = first.mode == "image"
        open_id, close_id = tok.image_open_id, tok.image_close_id
        prompts = [list(map(int, r.prompt_ids)) for r in batch]
        if image:
            prompts = [p if p[-1] == open_id else [*p, open_id] for p in prompts]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), EOS_ID, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[row, width - len(p) :] = 1
        timer = _SyncedTimer(self.device) if self.device.startswith("cuda") else FirstStepTimer()
        processors = LogitsProcessorList()
        if image:
            processors.append(ImageCodeConstraint(prompt_len=width, close_id=close_id))
            max_new = CODES_PER_IMAGE + 1
        else:
            processors.append(TextOnlyConstraint())
            max_new = max(r.max_new_tokens for r in batch)
        processors.append(timer)
        cache_kw: dict[str, Any] = {"disable_compile": not self.compile}
        if self.cache == "static":
            from transformers import CompileConfig

            max_pos = int(getattr(self.model.config, "max_position_embeddings", 2048))
            cache_kw["cache_implementation"] = "static"
            cache_kw["max_cache_len"] = static_cache_len(width + max_new, max_pos)
            if self.compile:
                compile_cfg = CompileConfig(
                    fullgraph=False, backend=self.compile_backend, mode=self.compile_mode
                )
                if not self.device.startswith("cuda"):
                    # transformers auto-compiles on CUDA only; this flag allows CPU (tests)
                    compile_cfg._compile_all_devices = True  # type: ignore[assignment]
                cache_kw["compile_config"] = compile_cfg
        cfg = GenerationConfig(
            **cache_kw,
            max_new_tokens=max_new,
            do_sample=not first.greedy,
            temperature=first.temperature if not first.greedy else None,
            top_p=first.top_p if not first.greedy else None,
            top_k=first.top_k if not first.greedy else None,
            eos_token_id=[END_ID, EOS_ID],
            pad_token_id=EOS_ID,
            use_cache=True,
        )
        generator_state = None
        if not first.greedy and first.seed is not None:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(first.seed)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    generation_config=cfg,
                    logits_processor=processors,
                )
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)
        finally:
            if generator_state is not None:
                torch.random.set_rng_state(generator_state)
        t1 = time.perf_counter()
        prefill = (timer.first or t1) - t0
        decode = t1 - (timer.first or t1)
        results = []
        for row, req in enumerate(batch):
            gen = [int(x) for x in out[row, width:].tolist()]
            results.append(self._result(req, gen, len(prompts[row]), prefill, decode, close_id))
        return results

    def _result(
        self,
        req: GenerationRequest,
        gen: list[int],
        prompt_tokens: int,
        prefill: float,
        decode: float,
        close_id: int,
    ) -> GenerationResult:
        stop = "max_new_tokens"
        if req.mode == "text":
            gen = gen[: req.max_new_tokens]  # a batch runs to its longest request's bound
        for j, t in enumerate(gen):
            if t in (END_ID, EOS_ID):
                stop = "end" if t == END_ID else "eos"
                gen = gen[:j]
                break
        if req.mode == "image":
            codes_ids = gen[:CODES_PER_IMAGE]
            if len(codes_ids) != CODES_PER_IMAGE or any(t < IMAGE_TOKEN_OFFSET for t in codes_ids):
                raise RuntimeError(f"constrained decoding produced {len(codes_ids)} image ids")
            return GenerationResult(
                token_ids=gen,
                text=None,
                image_codes=[id_to_code(t) for t in codes_ids],
                prompt_tokens=prompt_tokens,
                new_tokens=len(gen),
                prefill_s=prefill,
                decode_s=decode,
                stop_reason="image_complete",
            )
        return GenerationResult(
            token_ids=gen,
            text=self.tokenizer.decode(gen, skip_special_tokens=True).strip(),
            image_codes=None,
            prompt_tokens=prompt_tokens,
            new_tokens=len(gen),
            prefill_s=prefill,
            decode_s=decode,
            stop_reason=stop,
        )
