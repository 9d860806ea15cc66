"""The default backend: in-process transformers ``GPTNeoXForCausalLM`` with KV cache.

On CPU it decodes with transformers' dynamic KV cache. On CUDA (``device="cuda"``, bf16 by
default) it uses a static KV cache (preallocated, fixed shapes) and ``torch.compile`` of the
decode step with CUDA graphs (``compile_mode="reduce-overhead"``), so that a decode step is
one graph replay; prefill stays eager.

Greedy requests on CUDA run this backend's own decode loop (``decode_loop="graph"``) rather
than ``generate``: one compiled function does the forward, the constraint mask and the
argmax, the attention mask is fixed-size, and the host waits for the GPU only once every
:data:`~models.backends.transformers_support.STOP_CHECK_EVERY` steps, so the CPU queues
steps ahead of the GPU (``generate`` does per-step host work: 4-D mask building, logits
processors, a stop check that waits for the GPU; docs/performance.md compares the two).
Each option runs on CPU too (tests), and the loop gives the same tokens as ``generate``.

A request's ``on_token`` (streaming, cancellation) is honoured on both paths: in
``generate`` as a stopping criterion that stops only its row, in the own loop at checks
every :data:`~models.backends.transformers_decode.STREAM_CHECK_EVERY` step(s) while a
request of the batch streams.

The option values, dtype resolution and cache sizing are
:mod:`models.backends.transformers_support`; the decoding pieces (the own loop, left
padding, results) :mod:`models.backends.transformers_decode`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.backends.base import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    TokenFeed,
    error_result,
)
from models.backends.constraints import FirstStepTimer, ImageCodeConstraint, TextOnlyConstraint
from models.backends.transformers_decode import (
    GraphBatch,
    StreamStopping,
    SyncedTimer,
    greedy_step,
    left_pad,
    run_generate,
    run_graph_loop,
    streamed_result,
)
from models.backends.transformers_support import (
    CACHES,
    DECODE_LOOPS,
    MAX_STATIC_CACHES,
    WARMUP_PROMPT_TOKENS,
    batch_bucket,
    check_model_layout,
    resolve_dtype,
    static_cache_len,
    takes_cache_kwarg,
)
from models.layout import CODES_PER_IMAGE, END_ID, EOS_ID
from models.text import LLMCXRTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger(__name__)


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
        plus new tokens, rounded up to
        :data:`~models.backends.transformers_support.STATIC_CACHE_BUCKET`; fixed shapes for
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
    decode_loop
        Greedy decoding with ``"generate"`` (transformers) or ``"graph"`` (this backend's loop,
        see the module docstring; needs the static cache and transformers' ``cache=`` model
        API, 5.2x). ``"auto"``: ``"graph"`` on CUDA where it can run, else ``"generate"``.
        Sampling always uses ``generate``.
    warmup_batch
        The largest batch ``warmup`` prepares: with the own loop and a compiled step, it
        compiles every power-of-two batch bucket up to this (the node passes its worker batch
        size), so that no study waits for a compile. Larger batches compile on first use.
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
        decode_loop: str = "auto",
        warmup_batch: int = 1,
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
        if decode_loop not in DECODE_LOOPS:
            raise ValueError(f"decode_loop must be one of {', '.join(DECODE_LOOPS)}")
        if decode_loop == "graph" and self.cache != "static":
            raise ValueError("decode_loop='graph' needs cache='static'")
        self._decode_loop_option = decode_loop
        if warmup_batch < 1:
            raise ValueError("warmup_batch must be >= 1")
        self.warmup_batch = min(warmup_batch, max_batch)
        self._caches: dict[tuple[int, int], Any] = {}
        self._step_fn: Any = None
        self._takes_cache = False  # the loaded model's forward takes cache= (set with it)
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

        ``options``: ``cache``, ``compile``, ``compile_mode``, ``compile_backend``,
        ``decode_loop``, ``warmup_batch`` as in the constructor.
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
        backend._takes_cache = takes_cache_kwarg(model)
        backend._tokenizer = tokenizer
        return backend

    @property
    def decode_loop(self) -> str:
        """The greedy decode loop: ``"graph"`` or ``"generate"`` (``"auto"`` until loaded)."""
        opt = self._decode_loop_option
        if opt != "auto":
            return opt
        if not (self.device.startswith("cuda") and self.cache == "static"):
            return "generate"
        if self._model is None:
            return "auto"
        return "graph" if self._takes_cache else "generate"

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
        self._takes_cache = takes_cache_kwarg(model)
        log.info(
            "transformers backend loaded (dtype=%s, device=%s, cache=%s, compile=%s)",
            self.dtype,
            self.device,
            self.cache,
            self.compile,
        )

    def warmup(self) -> None:
        """One tiny greedy generation (per batch-size bucket up to ``warmup_batch`` when the
        own loop runs a compiled step).

        With a static cache the prompt is report-sized (~300 tokens), so that the cache shape
        (and, with ``compile``, the compiled decode graph) is the one reports use.
        """
        ids = self.tokenizer.encode("### Instruction:\nHello\n\n### Response:\n")
        if self.cache == "static":
            ids = (ids * (WARMUP_PROMPT_TOKENS // len(ids) + 1))[-WARMUP_PROMPT_TOKENS:]
        sizes = [1]
        if self.decode_loop == "graph" and self.compile:
            # every batch-size bucket the worker can send, compiled now rather than on a
            # study's time
            sizes = sorted({batch_bucket(n) for n in range(1, self.warmup_batch + 1)})
        for n in sizes:
            self.generate([GenerationRequest(prompt_ids=ids, max_new_tokens=4)] * n)

    def health(self) -> dict[str, Any]:
        """Loaded flag, device, dtype, model folder, library versions and counters."""
        import transformers

        out: dict[str, Any] = {
            "backend": self.name,
            "engine_version": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "loaded": self._model is not None,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "cache": self.cache,
            "compile": self.compile,
            "decode_loop": self.decode_loop,
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
        one by one so that a seed gives the same output whatever else is queued. A request's
        ``on_token`` gets its ids as they are generated; one that cancels ends only its own
        row (see :class:`~models.backends.base.GenerationRequest`).
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
                    failed = False
                    try:
                        outs = self._run([requests[j] for j in chunk])
                    except (RuntimeError, ValueError) as exc:  # one failing batch, not all
                        failed = True
                        log.exception("generation failed")
                        outs = [
                            error_result(requests[j], f"generation failed: {exc}") for j in chunk
                        ]
                        self._counters["errors"] += len(chunk)
                    for j, res in zip(chunk, outs, strict=True):
                        results[j] = res
                        self._counters["new_tokens"] += res.new_tokens
                        if res.error is not None and not failed:
                            self._counters["errors"] += 1  # its token callback raised
        return [r for r in results if r is not None]

    def _run(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        """One batch of same-mode requests: left-padded, then the own loop (greedy with
        ``decode_loop="graph"``) or ``generate``."""
        tok = self.tokenizer
        open_id = tok.image_open_id
        prompts = [list(map(int, r.prompt_ids)) for r in batch]
        if batch[0].mode == "image":
            prompts = [p if p[-1] == open_id else [*p, open_id] for p in prompts]
        if batch[0].greedy and self.decode_loop == "graph":
            return self._run_graph(batch, prompts)
        return self._run_generate(batch, prompts)

    def _run_generate(
        self, batch: list[GenerationRequest], prompts: list[list[int]]
    ) -> list[GenerationResult]:
        """Decoding with transformers' ``generate``: constraints as logits processors, a
        sampling request seeded with its own ``seed`` (the global RNG restored after)."""
        from transformers import LogitsProcessorList

        first = batch[0]
        image = first.mode == "image"
        input_ids, attention = left_pad(prompts)
        width = input_ids.shape[1]
        close_id = self.tokenizer.image_close_id
        timer = SyncedTimer(self.device) if self.device.startswith("cuda") else FirstStepTimer()
        processors = LogitsProcessorList()
        if image:
            processors.append(ImageCodeConstraint(prompt_len=width, close_id=close_id))
            max_new = CODES_PER_IMAGE + 1
        else:
            processors.append(TextOnlyConstraint())
            max_new = max(r.max_new_tokens for r in batch)
        processors.append(timer)
        feeds = [TokenFeed(r) for r in batch]
        streaming = any(not f.ended for f in feeds)
        generated, prefill, decode = run_generate(
            self.model,
            input_ids,
            attention,
            config=self._generation_config(first, width=width, max_new=max_new),
            processors=processors,
            timer=timer,
            seed=None if first.greedy else first.seed,
            device=self.device,
            stopping=StreamStopping(feeds) if streaming else None,
        )
        tok = self.tokenizer
        return [
            streamed_result(
                req, feed, generated[row], len(prompts[row]), prefill, decode, tokenizer=tok
            )
            for row, (req, feed) in enumerate(zip(batch, feeds, strict=True))
        ]

    def _generation_config(self, first: GenerationRequest, *, width: int, max_new: int) -> Any:
        """The ``GenerationConfig`` of a batch led by ``first``: its sampling settings, stop
        ids, and the cache and compile options of this backend."""
        from transformers import GenerationConfig

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
        return GenerationConfig(
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

    def _static_cache(self, batch: int, length: int) -> Any:
        """The static cache for this (batch, length), reset; the same object (and tensors) on
        every call, so that compiled code and CUDA graphs stay valid. At most
        :data:`MAX_STATIC_CACHES` are kept (the oldest is dropped)."""
        from transformers import StaticCache

        key = (batch, length)
        cache = self._caches.pop(key, None)
        if cache is None:
            while len(self._caches) >= MAX_STATIC_CACHES:
                self._caches.pop(next(iter(self._caches)))
            cache = StaticCache(config=self.model.config, max_cache_len=length)
        else:
            cache.reset()
        self._caches[key] = cache  # most recently used last
        return cache

    def _decode_step(self) -> Any:
        """:func:`greedy_step`, compiled once (``compile``) and kept, so that every call of
        the own loop reuses the compiled graphs."""
        if self._step_fn is None:
            if self.compile:
                self._step_fn = torch.compile(
                    greedy_step,
                    mode=self.compile_mode,
                    backend=self.compile_backend,
                    fullgraph=False,
                    dynamic=False,
                )
            else:
                self._step_fn = greedy_step
        return self._step_fn

    def _run_graph(
        self, batch: list[GenerationRequest], prompts: list[list[int]]
    ) -> list[GenerationResult]:
        """Greedy decoding with this backend's loop (``decode_loop="graph"``).

        The same inputs as ``generate`` gives the model: left padding, positions counted over
        each row's real tokens, a static cache sized to the prompt plus new tokens. The 2-D
        attention mask spans the whole cache (ones after the prompt: the causal mask, built from
        the cache's own position, hides what is not written yet), so its shape never changes.
        """
        model = self.model
        if not self._takes_cache:
            raise ValueError(
                "decode_loop='graph' needs a transformers whose models take cache= (5.2x); "
                "use decode_loop='generate'"
            )
        image = batch[0].mode == "image"
        max_new = CODES_PER_IMAGE + 1 if image else max(r.max_new_tokens for r in batch)
        max_pos = int(getattr(model.config, "max_position_embeddings", 2048))
        input_ids, attention = left_pad(prompts)
        padded = GraphBatch(
            input_ids, attention, max_new=max_new, max_pos=max_pos, device=self.device
        )
        step = self._decode_step()
        feeds = [TokenFeed(r) for r in batch]
        generated, times = run_graph_loop(
            model,
            step,
            self._static_cache,
            padded,
            image=image,
            close_id=self.tokenizer.image_close_id,
            compile=self.compile,
            feeds=feeds if any(not f.ended for f in feeds) else None,
        )
        # where the decode time goes: a host that mostly waits means the GPU is the limit
        log.debug(
            "graph loop: batch %d, %d steps, decode %.4f s, host waited for the GPU %.4f s",
            padded.size,
            times.steps,
            times.decode_s,
            times.waited_s,
        )
        tok = self.tokenizer
        prefill, decode = times.prefill_s, times.decode_s
        return [
            streamed_result(
                req, feed, generated[row], len(prompts[row]), prefill, decode, tokenizer=tok
            )
            for row, (req, feed) in enumerate(zip(batch, feeds, strict=True))
        ]
