"""A generation backend that runs on inference servers speaking the OpenAI-compatible
completions API (``POST /v1/completions``), so that node workers without GPUs share
servers run by an existing engine.

Two dialects:

``"llamacpp"``
    llama-cpp-python's server (``python -m llama_cpp.server``) on the bundle's GGUF
    (:mod:`models.gguf_convert`). Its completions API takes text, so a prompt goes as the
    text of its text ids (the bundle's own tokenizer, decoded) with each image id as its
    GGUF placeholder ``<img_0042>``: the GGUF lists the placeholders as USER_DEFINED tokens,
    which llama.cpp's tokenizer maps back to exactly those ids and renders as that text in
    the answer. Each text run is checked to tokenize back to its own ids, and a prompt whose
    text holds a placeholder is refused, so the server sees exactly the node's ids.
``"vllm"``
    vLLM's server: the prompt goes as token ids, the constraint as ``allowed_token_ids``,
    and the answer comes back as ids (``return_tokens_as_token_ids`` with ``logprobs``).

Constraints are the in-process backends': in ``"text"`` mode image ids are forbidden (a
``logit_bias`` of -1e6, or ``allowed_token_ids`` of the text ids), the answer ends at
``### End`` or ``<|endoftext|>`` (the GGUF's EOT and EOS); in ``"image"`` mode ``<`` is
appended to the prompt and exactly 256 ids are drawn from the 1,024 image ids, then ``>``.
Greedy requests are sent with temperature 0 and every other sampler neutral (repeat
penalty 1, min-p 0), so that greedy output equals the in-process backend's.

Streaming: ``on_token`` gets the ids of each streamed piece of text as the server sends it
(the text re-tokenized by the bundle's tokenizer; their decoded text always adds up to the
answer); returning ``False`` closes the connection, which ends the server's generation.

Load spreading and failures: requests go round-robin over ``urls``; a connection error, a
timeout or a 5xx answer moves the request to the next server, up to ``retries`` more
tries; a 4xx answer fails the request at once. :meth:`RemoteBackend.health` probes each
server (``GET /v1/models``).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from models.backends.base import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    TokenFeed,
    error_result,
)
from models.gguf_layout import image_token_text
from models.layout import (
    CODES_PER_IMAGE,
    END_ID,
    EOS_ID,
    IMAGE_TOKEN_OFFSET,
    TEXT_VOCAB,
    VOCAB,
    code_to_id,
    id_to_code,
)

__all__ = ["DIALECTS", "RemoteBackend", "RemoteError"]

log = logging.getLogger(__name__)

DIALECTS = ("llamacpp", "vllm")
Dialect = Literal["llamacpp", "vllm"]
_MASK = -1.0e6
_PLACEHOLDER = re.compile(r"<img_(\d{4})>")
_IMAGE_IDS = range(IMAGE_TOKEN_OFFSET, VOCAB)


class RemoteError(GenerationError):
    """A server could not be reached or answered with an error."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class _NoServer(RemoteError):
    """No server answered the layout check."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry=True)


@dataclass
class _Answer:
    """What one completion produced."""

    text: str
    ids: list[int]
    finish: str | None
    server_tokens: int | None
    cancelled: bool = False


class RemoteBackend:
    """Generation on OpenAI-compatible inference servers (see the module docstring).

    Parameters
    ----------
    model_dir
        The bundle's ``llm/`` folder: its ``tokenizer.json`` turns ids into the prompt text
        (``"llamacpp"``) and answers back into ids.
    urls
        Base URLs of the servers (``http://engine:8080``); ``/v1/completions`` is added.
    dialect
        ``"llamacpp"`` or ``"vllm"``.
    model
        The ``model`` field of each request (a vLLM server checks it); default: none sent.
    timeout
        Seconds to connect, and between two streamed pieces of an answer.
    retries
        Further tries on other servers after a connection error, a timeout or a 5xx.
    max_batch
        Requests of one batch sent at the same time.
    api_key
        Sent as ``Authorization: Bearer`` when set.
    device, threads, dtype
        Ignored (the servers' own); accepted so the node can pass its usual options.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        urls: Sequence[str],
        dialect: Dialect = "llamacpp",
        model: str | None = None,
        timeout: float = 120.0,
        retries: int = 2,
        max_batch: int = 8,
        api_key: str | None = None,
        device: str | None = None,
        threads: int | None = None,
        dtype: str | None = None,
    ) -> None:
        del device, threads, dtype
        if not urls:
            raise ValueError("urls: at least one inference server URL is needed")
        bad = [u for u in urls if not re.match(r"^https?://[^/\s]+", u)]
        if bad:
            raise ValueError(f"urls: {bad[0]!r} is not an http(s) URL")
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, got {dialect!r}")
        if timeout <= 0 or retries < 0 or max_batch < 1:
            raise ValueError("timeout must be > 0, retries >= 0 and max_batch >= 1")
        self.model_dir = Path(model_dir)
        self.urls = [u.rstrip("/") for u in urls]
        self.dialect: Dialect = dialect
        self.model = model
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.max_batch = int(max_batch)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._client: httpx.Client | None = None
        self._counters = {"requests": 0, "errors": 0, "retries": 0, "new_tokens": 0}
        self._lt_id = -1
        self._checked = False

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Read the tokenizer and check the servers' layout (``"llamacpp"``).

        When no server answers yet, the check is left to the first request (each request
        before it gets an error result): a worker started before its engine needs no
        restart.

        Raises
        ------
        GenerationError
            The tokenizer cannot be read, or (``"llamacpp"``) an answering server's
            vocabulary does not map ``<img_0000>`` to id 50281 and back (a GGUF converted
            before the placeholders were USER_DEFINED: convert the bundle again).
        """
        if self._client is not None:
            return
        from tokenizers import Tokenizer

        path = self.model_dir / "tokenizer.json"
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise GenerationError(f"{path}: cannot read the tokenizer: {exc}") from exc
        self._lt_id = self._ids("<")[0]
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout), headers=self._headers, follow_redirects=False
        )
        try:
            self._check_layout()
        except _NoServer as exc:
            log.warning("%s: the layout is checked at the first request", exc)

    def _check_layout(self) -> None:
        if self._checked or self.dialect != "llamacpp":
            self._checked = True
            return
        probe = image_token_text(0)
        for url in self.urls:
            try:
                ids = self._post_json(url, "/extras/tokenize", {"input": probe})["tokens"]
                text = self._post_json(url, "/extras/detokenize", {"tokens": [IMAGE_TOKEN_OFFSET]})
            except RemoteError as exc:
                log.warning("inference server %s: %s", url, exc)
                continue
            if ids[-1:] != [IMAGE_TOKEN_OFFSET] or text.get("text") != probe:
                raise GenerationError(
                    f"inference server {url}: its GGUF does not read and write image "
                    f"placeholders as text ({probe} -> {ids}); convert the bundle again "
                    "(cxr-node models convert) and restart the server"
                )
            self._checked = True
            return
        raise _NoServer(f"no inference server answers: {', '.join(self.urls)}")

    def warmup(self) -> None:
        """One tiny greedy completion on the next server."""
        self.generate([GenerationRequest(prompt_ids=self._ids("Hello"), max_new_tokens=1)])

    def health(self) -> dict[str, Any]:
        """Each server's state (``GET /v1/models``), the dialect and the counters."""
        servers = []
        for url in self.urls:
            try:
                t0 = time.perf_counter()
                r = httpx.get(f"{url}/v1/models", timeout=5.0, headers=self._headers)
                ok = r.status_code == 200
                servers.append({"url": url, "ok": ok, "status": r.status_code, "ms": _ms(t0)})
            except httpx.HTTPError as exc:
                servers.append({"url": url, "ok": False, "error": type(exc).__name__})
        return {
            "backend": "remote",
            "dialect": self.dialect,
            "loaded": self._client is not None,
            "model_path": str(self.model_dir),
            "servers": servers,
            "counters": dict(self._counters),
        }

    def close(self) -> None:
        """Close the HTTP connections."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- ids and text ----------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))

    def prompt_text(self, prompt_ids: Sequence[int]) -> str:
        """The ``"llamacpp"`` prompt: text runs decoded, image ids as placeholders.

        Raises
        ------
        GenerationError
            A text run holds a placeholder, or does not tokenize back to its own ids.
        """
        parts: list[str] = []
        for is_image, group in itertools.groupby(prompt_ids, lambda i: i >= IMAGE_TOKEN_OFFSET):
            run = [int(i) for i in group]
            if is_image:
                parts.extend(image_token_text(id_to_code(i)) for i in run)
                continue
            text = self._decode(run)
            if _PLACEHOLDER.search(text):
                raise GenerationError("the prompt's text holds an image placeholder (<img_NNNN>)")
            if self._ids(text) != run:
                raise GenerationError(
                    "a run of the prompt's text ids is not how its text tokenizes"
                )
            parts.append(text)
        return "".join(parts)

    # -- generation ------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Send the requests (up to ``max_batch`` at a time); one result per request.

        A request the servers cannot answer gets a ``stop_reason="error"`` result naming
        why; the others are unaffected.
        """
        self.load()
        if not requests:
            return []
        try:
            self._check_layout()
        except _NoServer as exc:
            with self._lock:
                self._counters["requests"] += len(requests)
                self._counters["errors"] += len(requests)
            return [error_result(r, str(exc)) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.max_batch, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def _one(self, req: GenerationRequest) -> GenerationResult:
        with self._lock:
            self._counters["requests"] += 1
        try:
            req.validate()
            t0 = time.perf_counter()
            result = self._generate(req, t0)
        except GenerationError as exc:
            with self._lock:
                self._counters["errors"] += 1
            log.warning("remote generation failed: %s", type(exc).__name__)
            return error_result(req, str(exc))
        with self._lock:
            self._counters["new_tokens"] += result.new_tokens
        return result

    def _generate(self, req: GenerationRequest, t0: float) -> GenerationResult:
        image = req.mode == "image"
        prompt = list(req.prompt_ids)
        if image and prompt[-1] != self._lt_id:
            prompt.append(self._lt_id)
        feed = TokenFeed(req)
        answer = self._complete(self._body(req, prompt), feed)
        elapsed = time.perf_counter() - t0
        common: dict[str, Any] = {
            "prompt_tokens": len(req.prompt_ids),
            "prefill_s": 0.0,
            "decode_s": elapsed,
        }
        if feed.error is not None:
            raise GenerationError(feed.error)
        if image:
            codes = [int(m) for m in _PLACEHOLDER.findall(answer.text)] or [
                id_to_code(i) for i in answer.ids if i >= IMAGE_TOKEN_OFFSET
            ]
            if len(codes) != CODES_PER_IMAGE:
                raise GenerationError(
                    f"the server returned {len(codes)} image codes, not {CODES_PER_IMAGE}"
                )
            ids = [code_to_id(c) for c in codes]
            return GenerationResult(
                token_ids=ids,
                text=None,
                image_codes=codes,
                new_tokens=len(ids),
                stop_reason="image_complete",
                **common,
            )
        ids = answer.ids
        if answer.cancelled:
            stop = "cancelled"
        elif answer.finish == "length":
            stop = "max_new_tokens"
        else:
            stop = "eos" if ids and ids[-1] == EOS_ID else "end"
        ids = [i for i in ids if i not in (END_ID, EOS_ID)]
        return GenerationResult(
            token_ids=ids,
            text=answer.text.strip(),
            image_codes=None,
            new_tokens=answer.server_tokens if answer.server_tokens is not None else len(ids),
            stop_reason=stop,
            **common,
        )

    def _body(self, req: GenerationRequest, prompt: list[int]) -> dict[str, Any]:
        image = req.mode == "image"
        body: dict[str, Any] = {
            "max_tokens": CODES_PER_IMAGE if image else req.max_new_tokens,
            "temperature": 0.0 if req.greedy else req.temperature,
            "top_p": 1.0 if req.greedy else req.top_p,
            "stream": True,
        }
        if not req.greedy:
            # 0 = no top-k: llama.cpp reads k <= 0 as off, vLLM wants -1
            body["top_k"] = req.top_k if req.top_k > 0 or self.dialect == "llamacpp" else -1
            if req.seed is not None:
                body["seed"] = req.seed
        if self.model is not None:
            body["model"] = self.model
        allowed = _IMAGE_IDS if image else range(TEXT_VOCAB)
        if self.dialect == "vllm":
            body.update(
                prompt=prompt,
                allowed_token_ids=list(allowed),
                logprobs=1,
                return_tokens_as_token_ids=True,
                skip_special_tokens=False,
                repetition_penalty=1.0,
                min_p=0.0,
            )
            return body
        banned = range(TEXT_VOCAB) if image else _IMAGE_IDS
        body.update(
            prompt=self.prompt_text(prompt),
            logit_bias={str(i): _MASK for i in banned},
            repeat_penalty=1.0,
            min_p=0.0,
            typical_p=1.0,
        )
        return body

    # -- HTTP ------------------------------------------------------------------------------

    def _servers(self) -> Iterator[str]:
        start = next(self._next)
        for k in range(self.retries + 1):
            yield self.urls[(start + k) % len(self.urls)]

    def _complete(self, body: dict[str, Any], feed: TokenFeed) -> _Answer:
        last: RemoteError | None = None
        for n, url in enumerate(self._servers()):
            if n:
                with self._lock:
                    self._counters["retries"] += 1
            try:
                return self._stream(url, body, feed)
            except RemoteError as exc:
                last = exc
                log.warning("inference server %s: %s", url, exc)
                if not exc.retry or feed.fed:  # nothing is sent twice to the caller
                    break
        assert last is not None
        raise last

    def _post_json(self, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._client is not None
        try:
            r = self._client.post(url + path, json=body)
        except httpx.HTTPError as exc:
            raise RemoteError(f"{type(exc).__name__} on {path}", retry=True) from None
        if r.status_code != 200:
            raise RemoteError(f"HTTP {r.status_code} on {path}", retry=r.status_code >= 500)
        data = r.json()
        if not isinstance(data, dict):
            raise RemoteError(f"{path}: not a JSON object", retry=False)
        return data

    def _stream(self, url: str, body: dict[str, Any], feed: TokenFeed) -> _Answer:
        assert self._client is not None
        answer = _Answer(text="", ids=[], finish=None, server_tokens=None)
        try:
            with self._client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    # the status only: a server's error text may quote the prompt (report text)
                    raise RemoteError(f"HTTP {r.status_code}", retry=r.status_code >= 500)
                for chunk in _events(r.iter_lines()):
                    if not self._take(chunk, answer, feed):
                        answer.cancelled = True
                        break
        except httpx.HTTPError as exc:
            raise RemoteError(type(exc).__name__, retry=True) from None
        return answer

    def _take(self, chunk: dict[str, Any], answer: _Answer, feed: TokenFeed) -> bool:
        """Add one streamed chunk to ``answer``; ``False`` when the caller cancelled."""
        choices = chunk.get("choices") or [{}]
        choice = choices[0]
        text = str(choice.get("text") or "")
        if self.dialect == "vllm":
            tokens = ((choice.get("logprobs") or {}).get("tokens")) or []
            ids = [int(str(t).removeprefix("token_id:")) for t in tokens]
        else:
            ids = [] if _PLACEHOLDER.search(text) else self._ids(text)
        answer.text += text
        answer.ids += ids
        answer.finish = choice.get("finish_reason") or answer.finish
        usage = chunk.get("usage")
        if isinstance(usage, dict) and "completion_tokens" in usage:
            answer.server_tokens = int(usage["completion_tokens"])
        return all(feed(i) for i in ids)


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of an OpenAI-style Server-Sent Events stream (``data: {...}``
    lines until ``data: [DONE]``)."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            raise RemoteError("a streamed piece is not JSON", retry=False) from None
        if isinstance(obj, dict):
            if "error" in obj:
                raise RemoteError("the server reported an error mid-answer", retry=False)
            yield obj


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 1)
