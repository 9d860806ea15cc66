"""``cxr-node models ...``: create, import, verify and inspect model bundles."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Model bundles: create-demo, import-llmcxr, verify, info.", no_args_is_help=True
)

BundleDir = Annotated[Path, typer.Argument(help="Model bundle directory (holds manifest.json).")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command("create-demo")
def create_demo(
    out: Annotated[Path, typer.Option("--out", help="Destination directory.")],
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
    hidden: Annotated[int, typer.Option(help="GPT-NeoX hidden size.")] = 64,
    layers: Annotated[int, typer.Option(help="GPT-NeoX layers.")] = 2,
    fallback_tokenizer: Annotated[
        bool,
        typer.Option(help="Use the locally trained tokenizer even if ../shared has GPT-NeoX-20B."),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Build a small, randomly initialised DEMO bundle with the LLM-CXR token layout."""
    from models.bundle import BundleError
    from models.demo import create_demo_bundle

    try:
        bundle = create_demo_bundle(
            out,
            seed=seed,
            hidden=hidden,
            layers=layers,
            use_shared_tokenizer=not fallback_tokenizer,
            overwrite=overwrite,
        )
    except (BundleError, FileExistsError, ValueError) as exc:
        _fail(str(exc))
        return
    typer.echo(
        f"DEMO bundle written to {bundle.root} ({bundle.model_name}, {bundle.model_version})"
    )


@app.command("import-llmcxr")
def import_cmd(
    llm: Annotated[Path, typer.Option("--llm", help="Published LLM folder (Hugging Face layout).")],
    vqgan_ckpt: Annotated[Path, typer.Option("--vqgan-ckpt", help="VQ-GAN .ckpt (taming).")],
    vqgan_config: Annotated[Path, typer.Option("--vqgan-config", help="VQ-GAN YAML config.")],
    out: Annotated[Path, typer.Option("--out", help="Destination bundle directory.")],
    model_name: Annotated[str, typer.Option(help="Model name for the manifest.")] = "LLM-CXR",
    model_version: Annotated[
        str | None, typer.Option(help="Model version (default: sha- + weight hash).")
    ] = None,
    link: Annotated[bool, typer.Option(help="Hard-link LLM files instead of copying.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Import the published LLM-CXR checkpoints into a bundle (ONNX export, checksums)."""
    from models.bundle import BundleError
    from models.importer import import_llmcxr

    try:
        bundle = import_llmcxr(
            llm,
            vqgan_ckpt,
            vqgan_config,
            out,
            model_name=model_name,
            model_version=model_version,
            link=link,
            overwrite=overwrite,
        )
    except (BundleError, FileExistsError, ValueError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"bundle written to {bundle.root} ({bundle.model_name}, {bundle.model_version})")


@app.command("verify")
def verify(
    bundle_dir: BundleDir,
    shallow: Annotated[
        bool, typer.Option(help="Checksums and layout only (no model run).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check checksums, token layout, shapes and run a smoke generation; exit 1 on failure."""
    from models.bundle import BundleError, ModelBundle

    try:
        bundle = ModelBundle.open(bundle_dir)
    except BundleError as exc:
        _fail(str(exc))
        return
    report = bundle.verify(deep=not shallow)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"verify {bundle.root}")
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail")
        for name, ok, detail in report.checks:
            table.add_row(name, "[green]ok[/]" if ok else "[red]FAIL[/]", detail)
        Console().print(table)
    if not report.ok:
        raise typer.Exit(1)


@app.command("info")
def info(
    bundle_dir: BundleDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a bundle's manifest summary (name, version, DEMO flag, layout, sizes)."""
    from models.bundle import BundleError, ModelBundle

    try:
        bundle = ModelBundle.open(bundle_dir)
    except BundleError as exc:
        _fail(str(exc))
        return
    summary = bundle.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model bundle {bundle.root}")
    table.add_column("field")
    table.add_column("value")
    for key, value in summary.items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        if key == "demo" and value:
            text = "[bold red]DEMO (random weights, not for clinical use)[/]"
        table.add_row(key, text)
    Console().print(table)


def _load_input(path: Path) -> Any:
    import numpy as np

    from models.preprocess import to_model_input

    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.dtype == np.float32 and arr.shape == (3, 256, 256):
            return arr
        if arr.dtype == np.uint8 and arr.ndim == 2:
            return to_model_input(arr)
        raise ValueError(
            f"{path}: .npy must be float32 [3,256,256] in [-1,1] or uint8 [H,W], "
            f"got {arr.dtype} {list(arr.shape)}"
        )
    from PIL import Image

    with Image.open(path) as img:
        gray = np.asarray(img.convert("L"), dtype=np.uint8)
    return to_model_input(gray)


@app.command("generate")
def generate(
    bundle_dir: BundleDir,
    image: Annotated[Path | None, typer.Option("--image", help="PNG/JPEG or .npy input.")] = None,
    question: Annotated[str | None, typer.Option(help="Ask this question (VQA).")] = None,
    report_text: Annotated[
        str | None, typer.Option("--report-text", help="Report -> CXR from this text.")
    ] = None,
    out_image: Annotated[
        Path | None, typer.Option("--out-image", help="PNG written by --report-text.")
    ] = None,
    greedy: Annotated[bool, typer.Option("--greedy/--sample", help="Greedy or sampling.")] = True,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Bound of generated tokens.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Run a bundle on one image (report, or VQA with --question) or on a report text."""
    from dataclasses import asdict

    from models.bundle import BundleError
    from models.runtime import LLMCXR

    if (image is None) == (report_text is None):
        _fail("give either --image (report / VQA) or --report-text (report -> CXR)", 2)
    try:
        model = LLMCXR.from_bundle(bundle_dir, backend_options={"dtype": dtype})
    except (BundleError, ValueError) as exc:
        _fail(str(exc))
        return
    result: dict[str, Any]
    if report_text is not None:
        gen = model.generate_image(report_text, greedy=greedy, seed=seed)
        result = {
            "codes": gen.codes.tolist(),
            "model_name": gen.model_name,
            "model_version": gen.model_version,
            "demo": gen.demo,
            "timings": gen.timings,
        }
        if out_image is not None:
            from PIL import Image

            Image.fromarray(gen.image, mode="L").save(out_image)
            result["image"] = str(out_image)
    else:
        assert image is not None
        try:
            x = _load_input(image)
        except (OSError, ValueError, TypeError) as exc:
            _fail(f"cannot read {image}: {exc}")
            return
        if question:
            result = asdict(
                model.vqa(x, question, greedy=greedy, seed=seed, max_new_tokens=max_new_tokens)
            )
        else:
            result = asdict(
                model.report(x, greedy=greedy, seed=seed, max_new_tokens=max_new_tokens)
            )
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        if result.get("demo"):
            typer.echo("DEMO model (random weights): output is not a report.", err=True)
        for key in ("text", "findings", "impression", "image", "timings"):
            if key in result:
                typer.echo(f"{key}: {result[key]}")
    sys.stdout.flush()
