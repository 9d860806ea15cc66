"""The default backend: in-process transformers ``GPTNeoXForCausalLM`` with KV cache.

On CPU it decodes with transformers' dynamic KV cache. On CUDA (``device="cuda"``, bf16 by
default) it uses a static KV cache (preallocated, fixed shapes) and ``torch.compile`` of the
decode step with CUDA graphs (``compile_mode="reduce-overhead"``), so that a decode step is
one graph replay; prefill stays eager.

Greedy requests on CUDA run this backend's own decode loop (``decode_loop="graph"``) rather
than ``generate``: one compiled function does the forward, the constraint mask and the
argmax, the attention mask is fixed-size, and the host waits for the GPU only once every
:data:`STOP_CHECK_EVERY` steps, so the CPU queues steps ahead of the GPU (``generate`` does
per-step host work: 4-D mask building, logits processors, a stop check that waits for the
GPU; docs/performance.md compares the two). Each option runs on CPU too (tests), and the
loop gives the same tokens as ``generate``.
"""

from __future__ import annotations

import inspect
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
DECODE_LOOPS = ("auto", "generate", "graph")
STOP_CHECK_EVERY = 16
"""The own decode loop looks for ``### End``/EOS in every row once per this many steps (the
only times it waits for the GPU); up to this many - 1 extra steps run after the last row ends."""
MAX_STATIC_CACHES = 8
"""Static caches kept for reuse, one per (batch, length) shape: the same tensors on every call
keep compiled graphs and CUDA graphs valid."""
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


def batch_bucket(n: int) -> int:
    """The smallest power of two >= ``n``: the batch size the own decode loop runs ``n`` at."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return 1 << (n - 1).bit_length()


def takes_cache_kwarg(model: Any) -> bool:
    """Whether the model's ``forward`` takes ``cache=`` (transformers 5.2x; earlier releases
    take ``past_key_values=`` and ``cache_position=``), which the own decode loop speaks."""
    return "cache" in inspect.signature(model.forward).parameters


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
        if first.greedy and self.decode_loop == "graph":
            return self._run_graph(batch, prompts, input_ids, attention)
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
        """One greedy step: forward one token per row, add the constraint bias, argmax.

        Compiled (``compile``) as one function, so that mask building, the bias and the argmax
        are inside the captured graph instead of being host work on every step.
        """
        if self._step_fn is None:

            def step(
                model: Any,
                cache: Any,
                tok: torch.Tensor,
                attn: torch.Tensor,
                pos: torch.Tensor,
                bias: torch.Tensor,
            ) -> torch.Tensor:
                kw = {"attention_mask": attn, "position_ids": pos, "cache": cache}
                out = model(input_ids=tok, use_cache=True, **kw)
                return (out.logits[:, -1, :].float() + bias).argmax(dim=-1)

            if self.compile:
                self._step_fn = torch.compile(
                    step,
                    mode=self.compile_mode,
                    backend=self.compile_backend,
                    fullgraph=False,
                    dynamic=False,
                )
            else:
                self._step_fn = step
        return self._step_fn

    def _run_graph(
        self,
        batch: list[GenerationRequest],
        prompts: list[list[int]],
        input_ids: torch.Tensor,
        attention: torch.Tensor,
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
        dev = self.device
        on_cuda = dev.startswith("cuda")
        real, width = input_ids.shape
        # batch sizes go up to powers of two with copies of the first row (their tokens are
        # dropped): one compiled step and CUDA graph per bucket instead of per batch size, so
        # a worker batching up to N jobs compiles log2(N) + 1 times and never reaches Dynamo's
        # recompile limit (8), after which the step would run eagerly
        bsz = batch_bucket(real)
        if bsz > real:
            input_ids = torch.cat([input_ids, input_ids[:1].expand(bsz - real, -1)])
            attention = torch.cat([attention, attention[:1].expand(bsz - real, -1)])
        max_new = CODES_PER_IMAGE + 1 if image else max(r.max_new_tokens for r in batch)
        max_pos = int(getattr(model.config, "max_position_embeddings", 2048))
        length = static_cache_len(width + max_new, max_pos)
        attn = torch.ones((bsz, length), dtype=torch.long, device=dev)
        attn[:, :width] = attention.to(dev)
        positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0).to(dev)
        out = torch.empty((bsz, max_new), dtype=torch.long, device=dev)
        stop_ids = torch.tensor([END_ID, EOS_ID], device=dev)
        step = self._decode_step()
        t0 = time.perf_counter()
        with torch.inference_mode():  # the cache's tensors are made and reset in this mode
            cache = self._static_cache(bsz, length)
            logits = model(
                input_ids=input_ids.to(dev),
                attention_mask=attn[:, :width],
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits
            biases = self._biases(logits.shape[-1], image)
            out[:, 0] = (logits[:, -1, :].float() + biases[0]).argmax(dim=-1)
            if on_cuda:
                torch.cuda.synchronize(dev)
            t1 = time.perf_counter()
            # fresh contiguous (B, 1) tensors: a slice's strides would differ with the prompt
            # width or max_new_tokens, and torch.compile would recompile for each
            tok = torch.empty((bsz, 1), dtype=torch.long, device=dev)
            tok.copy_(out[:, :1])
            pos = torch.empty((bsz, 1), dtype=torch.long, device=dev)
            pos.copy_(positions[:, -1:] + 1)
            done, waited = 1, 0.0
            for i in range(1, max_new):
                if self.compile:
                    torch.compiler.cudagraph_mark_step_begin()
                bias = biases[1] if image and i >= CODES_PER_IMAGE else biases[0]
                nxt = step(model, cache, tok, attn, pos, bias)
                out[:, i].copy_(nxt)  # before the next replay reuses the graph's output memory
                tok.copy_(nxt[:, None])
                pos += 1
                done = i + 1
                if not image and done % STOP_CHECK_EVERY == 0:
                    tw = time.perf_counter()
                    ended = bool(torch.isin(out[:real, :done], stop_ids).any(dim=-1).all())
                    waited += time.perf_counter() - tw
                    if ended:
                        break
            tw = time.perf_counter()
            generated = out[:, :done].tolist()  # waits for the GPU
        t2 = time.perf_counter()
        # where the decode time goes: a host that mostly waits means the GPU is the limit
        log.debug(
            "graph loop: batch %d, %d steps, decode %.4f s, host waited for the GPU %.4f s",
            bsz,
            done - 1,
            t2 - t1,
            waited + t2 - tw,
        )
        close_id = self.tokenizer.image_close_id
        return [
            self._result(req, generated[row], len(prompts[row]), t1 - t0, t2 - t1, close_id)
            for row, req in enumerate(batch)
        ]

    def _biases(self, width: int, image: bool) -> list[torch.Tensor]:
        """Additive logit masks: text mode, one (no image ids); image mode, two (image ids
        only for the 256 codes, then ``>`` only), as the logits processors of ``generate``."""
        neg = float("-inf")
        if not image:
            text = torch.zeros(width, device=self.device)
            text[IMAGE_TOKEN_OFFSET:] = neg
            return [text]
        codes = torch.full((width,), neg, device=self.device)
        codes[IMAGE_TOKEN_OFFSET:VOCAB] = 0.0
        close = torch.full((width,), neg, device=self.device)
        close[self.tokenizer.image_close_id] = 0.0
        return [codes, close]

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
