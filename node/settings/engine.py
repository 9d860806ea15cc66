"""Where the language model runs when it is not in this process: ``backend = "remote"``.

A base of :class:`node.settings.Settings` (each field is ``CXR_NODE_<FIELD>``): the
inference servers (:class:`models.backends.remote.RemoteBackend`) that node workers share,
e.g. a llama.cpp server on CPUs or vLLM on GPUs (``docs/configuration.md``,
``docs/operations.md``, "Remote inference engines").
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from node.settings.values import split_each

__all__ = ["RemoteEngineSettings"]


def _http_url(url: Any) -> Any:
    """One entry of ``remote_urls``, unchanged when it is an http(s) URL with a host."""
    parts = urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"remote_urls: {url!r} is not an http(s) URL")
    return url


class RemoteEngineSettings(BaseModel):
    """The remote inference servers; used only with ``backend = "remote"``."""

    # base URLs (http or https), requests spread round-robin; comma-separated in the env
    remote_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    remote_dialect: Literal["llamacpp", "vllm"] = "llamacpp"
    # the ``model`` field of each request (a vLLM server checks it); none sent by default
    remote_model: str | None = None
    remote_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    remote_retries: int = Field(default=2, ge=0, le=10)
    remote_api_key: SecretStr | None = None

    @field_validator("remote_urls", mode="before")
    @classmethod
    def _remote_urls(cls, v: Any) -> Any:
        return split_each(v, _http_url)

    def remote_options(self) -> dict[str, Any]:
        """The :class:`~models.backends.remote.RemoteBackend` keyword options."""
        key = self.remote_api_key.get_secret_value() if self.remote_api_key else None
        return {
            "urls": list(self.remote_urls),
            "dialect": self.remote_dialect,
            "model": self.remote_model,
            "timeout": self.remote_timeout_seconds,
            "retries": self.remote_retries,
            "api_key": key,
        }
