"""``cxr-node chat FILE | --study UID``: talk with the model about a chest X-ray.

Reads one question a line from standard input and streams each answer to standard output
as it is generated (:mod:`models.chat`): earlier turns are the context, the oldest left
out when the 2,048-token window would overflow (said on standard error). ``/summary
patient|clinician [REPORT]`` rewrites a report in plain language (without REPORT: the
latest draft of the ``--study``); ``/image REPORT`` writes a synthetic CXR made from the
report text (labelled SYNTHETIC) as ``synthetic-N.png`` in ``--image-dir``; ``/quit`` or
end of input ends; Ctrl-C stops the answer being written (the turn is not kept). Like
``cxr-node ask``, the model runs in this process; every answer is labelled AI generated and
unverified (DEMO for the demo bundle). Nothing of the conversation is logged.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import numpy.typing as npt
import typer

if TYPE_CHECKING:
    from models.runtime import LLMCXR

from node.cli.admin import _runtime, _settings, cli_services, fail

__all__ = ["chat"]


def _image(file: Path | None, study: str | None) -> tuple[npt.NDArray[np.float32], str]:
    """The model input of ``file`` or of the stored ``study``, and what it is."""
    from models.preprocess import to_model_input
    from node.services.images import gray8_from_file

    if (file is None) == (study is None):
        typer.echo("give either FILE or --study UID", err=True)
        raise typer.Exit(2)
    if study is not None:
        from node.services.tasks import study_image

        with cli_services() as ctx:
            try:
                path = study_image(ctx, study, None).path
            except (LookupError, ValueError) as exc:
                raise fail(exc) from None
        label = f"study {study}"
    else:
        assert file is not None
        path, label = file, str(file)
    try:
        gray8, _ds = gray8_from_file(path)
    except ValueError as exc:
        raise fail(exc) from None
    return to_model_input(gray8), label


def _summary_args(text: str, study: str | None) -> tuple[str, str]:
    """``(audience, report)`` of a ``/summary AUDIENCE [REPORT]`` line; without REPORT, the
    study's latest draft.

    Raises
    ------
    ValueError
        An unknown audience, or no report and no draft.
    """
    from node.services.chat import AUDIENCES, study_draft

    _cmd, _sep, rest = text.partition(" ")
    audience, _sep, report = rest.strip().partition(" ")
    if audience not in AUDIENCES:
        raise ValueError(
            "audience must be clinician or patient: /summary patient|clinician [REPORT]"
        )
    if report.strip():
        return audience, report
    if study is None:
        raise ValueError("give the report after the audience: an uploaded file has no draft")
    with cli_services() as ctx:
        draft = study_draft(ctx, study)
    if not draft:
        raise ValueError(f"study {study} has no report draft yet: give the report text")
    return audience, draft


def _synthetic_image(runtime: LLMCXR, text: str, image_dir: Path) -> Path:
    """``/image REPORT``: report -> synthetic CXR (exactly 256 codes), written as the next
    free ``synthetic-N.png`` in ``image_dir``."""
    from models.layout import CODES_PER_IMAGE
    from node.services.images import png_bytes

    report = text.partition(" ")[2].strip()
    if not report:
        raise ValueError("say /image REPORT: the findings the synthetic image is to show")
    generated = runtime.generate_image(report)
    if int(generated.codes.size) != CODES_PER_IMAGE:
        raise ValueError(f"the model made {generated.codes.size} codes, not {CODES_PER_IMAGE}")
    n = 1
    while (image_dir / f"synthetic-{n}.png").exists():
        n += 1
    out = image_dir / f"synthetic-{n}.png"
    with out.open("xb") as fh:
        fh.write(png_bytes(generated.image))
    return out


def _write(delta: str) -> bool:
    sys.stdout.write(delta)
    sys.stdout.flush()
    return True


def chat(
    file: Annotated[
        Path | None,
        typer.Argument(help="A DICOM image or PNG.", exists=True, dir_okay=False),
    ] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="A stored study's Study Instance UID.")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, max=1024, help="At most this many tokens an answer.")
    ] = 128,
    image_dir: Annotated[
        Path,
        typer.Option(
            "--image-dir", help="Where /image writes its PNGs.", file_okay=False, exists=True
        ),
    ] = Path("."),
) -> None:
    """Talk about a chest X-ray: questions from stdin, answers streamed (AI generated)."""
    from models.chat import ChatTurn, summarize
    from models.chat import chat as ask_model

    settings = _settings()
    image, label = _image(file, study)
    runtime = _runtime(settings)
    codes = [int(c) for c in runtime.encode_images([image])[0]]
    note = "DEMO model, answers" if runtime.bundle.demo else "answers"
    typer.echo(
        f"talking about {label} with {runtime.model_name} {runtime.model_version}"
        f" ({note} are AI generated and unverified); /summary patient|clinician [REPORT],"
        " /image REPORT, /quit",
        err=True,
    )
    history: list[ChatTurn] = []
    for line in sys.stdin:
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        try:
            if text.startswith("/image"):
                out = _synthetic_image(runtime, text, image_dir)
                typer.echo(f"SYNTHETIC image, AI generated from the report, not a patient: {out}")
                continue
            if text.startswith("/summary"):
                audience, report = _summary_args(text, study)
                answer = summarize(
                    runtime,
                    report,
                    audience=audience,  # type: ignore[arg-type]
                    on_text=_write,
                    max_new_tokens=max_new_tokens,
                )
            else:
                answer = ask_model(
                    runtime,
                    None,
                    history,
                    text,
                    image_codes=codes,
                    on_text=_write,
                    max_new_tokens=max_new_tokens,
                )
                history.append(ChatTurn(text, answer.text))
        except ValueError as exc:  # ModelInputError too
            typer.echo(f"not asked: {exc}", err=True)
            continue
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            typer.echo("(stopped; this turn is not kept)", err=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if answer.dropped_turns:
            typer.echo(
                f"(the oldest {answer.dropped_turns} turn(s) were left out to fit the "
                "model's 2,048-token window)",
                err=True,
            )
