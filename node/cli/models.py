"""``cxr-node models ...``: create, import, convert, verify, inspect and run model bundles."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from node.jsonable import to_jsonable

if TYPE_CHECKING:
    from models.bundle import ModelBundle

app = typer.Typer(
    help="Model bundles: create-demo, import-llmcxr, import-base, convert, verify, info, generate.",
    no_args_is_help=True,
)

BundleDir = Annotated[Path, typer.Argument(help="Model bundle directory (holds manifest.json).")]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _exit_on(*errors: type[Exception]) -> Iterator[None]:
    """Run the ``with`` block; one of ``errors`` raised in it exits 1 with its message.

    Parameters
    ----------
    *errors
        The exception types that are the command's expected failures (a bad bundle, a file
        in the way, ...); any other exception propagates.

    Raises
    ------
    typer.Exit
        Code 1, after ``error: <message>`` on stderr, when the block raised one of ``errors``.
    """
    try:
        yield
    except errors as exc:
        _fail(str(exc))


def _open_bundle(bundle_dir: Path) -> ModelBundle:
    """The bundle at ``bundle_dir``, or exit 1 saying why it cannot be opened."""
    from models.bundle import BundleError, ModelBundle

    with _exit_on(BundleError):
        return ModelBundle.open(bundle_dir)


@app.command("create-demo")
def create_demo(
    out: Annotated[Path, typer.Option("--out", help="Destination directory.")],
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
    hidden: Annotated[int, typer.Option(help="GPT-NeoX hidden size.")] = 64,
    layers: Annotated[int, typer.Option(help="GPT-NeoX layers.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Build a small, randomly initialised DEMO bundle with the LLM-CXR token layout."""
    from models.bundle import BundleError
    from models.demo import create_demo_bundle

    with _exit_on(BundleError, FileExistsError, ValueError):
        bundle = create_demo_bundle(
            out,
            seed=seed,
            hidden=hidden,
            layers=layers,
            overwrite=overwrite,
        )
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

    with _exit_on(BundleError, FileExistsError, ValueError):
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
    typer.echo(f"bundle written to {bundle.root} ({bundle.model_name}, {bundle.model_version})")


@app.command("import-base")
def import_base(
    llm: Annotated[
        Path, typer.Option("--llm", help="Base GPT-NeoX folder, e.g. dolly-v2-3b (HF layout).")
    ],
    vqgan_ckpt: Annotated[Path, typer.Option("--vqgan-ckpt", help="VQ-GAN .ckpt (taming).")],
    vqgan_config: Annotated[Path, typer.Option("--vqgan-config", help="VQ-GAN YAML config.")],
    out: Annotated[Path, typer.Option("--out", help="Destination bundle directory.")],
    model_name: Annotated[str, typer.Option(help="Model name for the manifest.")] = (
        "LLM-CXR-base"
    ),
    model_version: Annotated[str | None, typer.Option(help="Model version.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """A base model (dolly-v2) in the LLM-CXR layout as a bundle: the start of training
    from scratch (tokenizer + "### Response:\\n", embeddings resized to 51,305 rows)."""
    import tempfile

    from models.base_llm import prepare_base_llm
    from models.bundle import BundleError
    from models.importer import import_llmcxr

    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        _exit_on(BundleError, FileExistsError, ValueError, OSError),
        tempfile.TemporaryDirectory(prefix=".base-llm-", dir=out.parent) as tmp,
    ):
        prepared = prepare_base_llm(llm, Path(tmp) / "llm")
        bundle = import_llmcxr(
            prepared,
            vqgan_ckpt,
            vqgan_config,
            out,
            model_name=model_name,
            model_version=model_version,
            overwrite=overwrite,
        )
    typer.echo(
        f"bundle written to {bundle.root} ({bundle.model_name}, {bundle.model_version}):"
        " untrained image tokens, for cxr-node train"
    )


@app.command("convert")
def convert(
    bundle_dir: BundleDir,
    engine: Annotated[str, typer.Option("--engine", help="Target engine: llamacpp.")] = "llamacpp",
    quant: Annotated[str, typer.Option("--quant", help="f32, f16, bf16, q8_0 or q4_k_m.")] = "q8_0",
    threads: Annotated[
        int | None, typer.Option(help="Threads for llama.cpp's quantiser (q4_k_m).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Convert the bundle's LLM for a CPU engine (GGUF) and record it in the manifest."""
    from models.bundle import BundleError, ModelBundle
    from models.gguf_convert import QUANTS, ConversionError, convert_bundle
    from models.layout import TokenLayoutError

    if engine != "llamacpp":
        _fail(f"--engine must be llamacpp, got {engine!r}", 2)
    if quant not in QUANTS:
        _fail(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}", 2)
    if threads is not None and threads < 1:
        _fail(f"--threads must be >= 1, got {threads}", 2)
    with _exit_on(BundleError, ConversionError, TokenLayoutError, OSError):
        ModelBundle.open(bundle_dir)  # a structurally valid bundle before writing into it
        result = convert_bundle(bundle_dir, quant=quant, threads=threads)  # type: ignore[arg-type]
    rel = result.path.relative_to(Path(bundle_dir)).as_posix()
    out = {
        "engine": engine,
        "quant": result.quant,
        "path": rel,
        "sha256": result.sha256,
        "size": result.size,
        "seconds": round(result.seconds, 2),
        "tensor_types": result.tensor_types,
    }
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        typer.echo(
            f"{engine} {result.quant} model written to {rel} ({result.size} bytes, "
            f"sha256 {result.sha256[:16]}..., {result.seconds:.1f} s); manifest updated"
        )


@app.command("verify")
def verify(
    bundle_dir: BundleDir,
    shallow: Annotated[
        bool, typer.Option(help="Checksums and layout only (no model run).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check checksums, token layout, shapes and run a smoke generation; exit 1 on failure."""
    bundle = _open_bundle(bundle_dir)
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
    bundle = _open_bundle(bundle_dir)
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


def _is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file (``DICM`` after the 128-byte preamble, PS3.10 7.1) or ``.dcm``."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _load_input(path: Path) -> Any:
    """Model input ``float32[3,256,256]`` from a DICOM image, a PNG/JPEG or a ``.npy``.

    DICOM pixel data goes through :func:`integration.pixels.to_gray8` (Modality and VOI LUT,
    PS3.3 C.11.1/C.11.2; MONOCHROME1 inverted; histogram equalisation), then
    :func:`models.preprocess.to_model_input`.
    """
    import numpy as np

    from models.preprocess import to_model_input

    if _is_dicom(path):
        from pydicom import dcmread

        from integration.pixels import to_gray8

        return to_model_input(to_gray8(dcmread(path)))
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
    image: Annotated[
        Path | None, typer.Option("--image", help="DICOM image, PNG/JPEG or .npy input.")
    ] = None,
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
    backend: Annotated[
        str, typer.Option("--backend", help="transformers or llamacpp.")
    ] = "transformers",
    quant: Annotated[
        str | None,
        typer.Option(help="llamacpp: which converted file (f32, f16, bf16, q8_0, q4_k_m)."),
    ] = None,
    prefill_quant: Annotated[
        str | None,
        typer.Option(help="llamacpp: another converted file that computes the prompt."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="transformers: auto, float32 or bfloat16.")] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Run a bundle on one image (report, or VQA with --question) or on a report text.

    ``--image`` takes a DICOM CR/DX/SC image (converted as the node does), a PNG/JPEG or a
    ``.npy``; ``--backend llamacpp`` needs ``cxr-node models convert`` first.
    """
    from models.backends.base import GenerationError
    from models.bundle import BundleError
    from models.layout import TokenLayoutError
    from models.results import InferenceError, ModelInputError
    from models.runtime import LLMCXR

    if (image is None) == (report_text is None):
        _fail("give either --image (report / VQA) or --report-text (report -> CXR)", 2)
    if backend not in ("transformers", "llamacpp"):
        _fail(f"--backend must be transformers or llamacpp, got {backend!r}", 2)
    x: Any = None
    if image is not None:  # read the image before loading a model
        try:
            x = _load_input(image)
        except Exception as exc:  # pixel-data, image-format and file errors alike
            _fail(f"cannot read {image}: {type(exc).__name__}: {exc}")
            return
    options = {
        "dtype": dtype,
        "quant": quant,
        "prefill_quant": prefill_quant,
        "device": device,
        "threads": threads,
    }
    with _exit_on(BundleError, GenerationError, TokenLayoutError, ValueError):
        model = LLMCXR.from_bundle(bundle_dir, backend=backend, backend_options=options)
    with _exit_on(InferenceError, ModelInputError, TokenLayoutError):
        result = _run_generate(
            model,
            x,
            question=question,
            report_text=report_text,
            out_image=out_image,
            greedy=greedy,
            seed=seed,
            max_new_tokens=max_new_tokens,
        )
    result["backend"] = model.backend.health()
    _print_result(result, as_json=as_json)


def _print_result(result: dict[str, Any], *, as_json: bool) -> None:
    """Print a ``generate`` result: JSON, or its text, sections, image path and timings
    (with a DEMO warning on stderr)."""
    if as_json:
        typer.echo(json.dumps(to_jsonable(result), indent=2))
    else:
        if result.get("demo"):
            typer.echo("DEMO model (random weights): output is not a report.", err=True)
        for key in ("text", "findings", "impression", "image", "timings"):
            if key in result:
                typer.echo(f"{key}: {result[key]}")
    sys.stdout.flush()


def _run_generate(
    model: Any,
    x: Any,
    *,
    question: str | None,
    report_text: str | None,
    out_image: Path | None,
    greedy: bool,
    seed: int | None,
    max_new_tokens: int | None,
) -> dict[str, Any]:
    """Run one task of ``generate`` and return its JSON-able result."""
    from dataclasses import asdict

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
    elif question:
        result = asdict(
            model.vqa(x, question, greedy=greedy, seed=seed, max_new_tokens=max_new_tokens)
        )
    else:
        result = asdict(model.report(x, greedy=greedy, seed=seed, max_new_tokens=max_new_tokens))
    return result
