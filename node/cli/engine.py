"""``cxr-node engine``: an OpenAI-compatible inference server on the model bundle's GGUF,
which node workers with ``backend = "remote"`` share (:mod:`models.engine_server`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.cli.admin import _settings, fail

__all__ = ["engine"]


def engine(
    model: Annotated[
        Path | None,
        typer.Argument(help="A bundle, its llm/ folder or a .gguf file (default: model_dir)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    quant: Annotated[
        str | None, typer.Option(help="Which converted file (q8_0, f16, f32, ...).")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads.")] = None,
    kv_type: Annotated[str, typer.Option(help="KV-cache precision: f32, f16, q8_0.")] = "f16",
    api_key_env: Annotated[
        str | None,
        typer.Option(help="Name of an environment variable holding the API key to require."),
    ] = None,
) -> None:
    """Serve the LLM over /v1/completions (llama-cpp-python's server) for remote workers."""
    import os

    from models.backends.base import GenerationError
    from models.engine_server import serve

    if model is None:
        model = _settings().model_dir
        if model is None:
            typer.echo("give a bundle or .gguf file, or set model_dir", err=True)
            raise typer.Exit(2)
    key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not key:
        typer.echo(f"{api_key_env} is not set", err=True)
        raise typer.Exit(2)
    try:
        serve(
            model, host=host, port=port, quant=quant, threads=threads, kv_type=kv_type, api_key=key
        )
    except (GenerationError, ValueError) as exc:
        raise fail(exc) from None
