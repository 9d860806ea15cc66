"""Admin commands of ``cxr-node`` mirroring the API: jobs, tokens, and the model's tasks.

Registered by :func:`register` on the main typer app (``node.cli``):

- ``jobs show ID [--json]``, ``jobs retry ID``, ``jobs cancel ID [--reason]``,
  ``jobs resend ID``, ``jobs priority ID N``, ``jobs withdraw ID --reason TEXT``;
- ``tokens create --role admin|operator|viewer|reviewer [--name]`` (the token alone on the
  last line), ``tokens revoke ID``, ``tokens list [--json]``;
- ``ask FILE --question TEXT`` (CXR-VQA on a DICOM or PNG file with the in-process model of
  ``model_dir`` / ``CXR_NODE_MODEL_DIR``);
- ``generate-image --report TEXT --out FILE.png [--dicom FILE.dcm]`` (report -> CXR; the
  DICOM is a Secondary Capture marked synthetic; nothing is sent anywhere).

Admin actions are audited with the actor ``cli:<user>``. Exit codes: 0 success, 1 operation
failed (unknown job, illegal transition, bad input), 2 configuration refused.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from integration.priority import MAX_PRIORITY, MIN_PRIORITY
from node.cli.common import services
from node.db import job_admin
from node.db import tokens as tokens_db
from node.db import withdrawals as withdrawals_db
from node.db.models import ID_MAX, ApiRole
from node.jsonable import to_jsonable
from node.services import jobs as job_service
from node.services import tokens as token_service
from node.services.context import ServiceContext
from node.settings import Settings

if TYPE_CHECKING:
    from models.runtime import LLMCXR
    from node.runtime.withdrawal import WithdrawResult

__all__ = ["actor", "cli_services", "fail", "register", "tokens_app"]

err = Console(stderr=True)
tokens_app = typer.Typer(help="API tokens: create, revoke, list.", no_args_is_help=True)
_loader: dict[str, Callable[[], Settings]] = {}


def _settings() -> Settings:
    return _loader["settings"]()


def actor() -> str:
    """The audit actor of CLI actions: ``cli:<login name>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"[:128]


T = TypeVar("T")

#: a job, token or delivery id: 1..ID_MAX, what the database holds and the API's paths take;
#: another is refused as bad usage (exit status 2)
ID_MIN = 1
JobId = Annotated[int, typer.Argument(help="Job id.", min=ID_MIN, max=ID_MAX)]


def _checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An option callback: ``value`` when ``check`` takes it, else bad usage (exit status 2)
    with ``check``'s reason (the repository's own check, so the CLI and the API agree)."""

    def callback(value: Any) -> Any:
        if value is not None:  # an optional option not given
            try:
                check(value)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
        return value

    return callback


def cli_services() -> AbstractContextManager[ServiceContext]:
    """The services' context on the configured database (as ``api_tokens`` is reachable)."""
    return services(_settings(), table="api_tokens")


def fail(exc: BaseException) -> typer.Exit:
    """Print ``exc`` (its type and message: no patient data) to stderr; exit status 1."""
    err.print(f"{type(exc).__name__}: {exc}", markup=False, highlight=False)
    return typer.Exit(1)


def service_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(ctx, *args, **kwargs)`` on the services' context (:func:`cli_services`); a
    ``LookupError`` or ``ValueError`` (no such job, a refused change) exits with status 1
    (:func:`fail`)."""
    with cli_services() as ctx:
        try:
            return fn(ctx, *args, **kwargs)
        except (LookupError, ValueError) as exc:
            raise fail(exc) from None


# --- jobs -------------------------------------------------------------------------------------


def jobs_show(
    job_id: JobId,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Show one job: state, timings, draft text, SR UID, deliveries, its history."""
    with cli_services() as ctx:
        try:
            d = job_service.detail(ctx, job_id)
        except LookupError as exc:
            raise fail(exc) from None
    data = to_jsonable(d)
    if as_json:
        typer.echo(json.dumps(data, sort_keys=True))
        return
    j = d.job
    out = Console()
    out.print(f"job {j.id}  state {j.state}  study {j.study_uid}", highlight=False)
    out.print(
        f"attempts {j.attempts}/{j.max_attempts}  priority {j.priority}  SR {j.sr_uid or '-'}",
        highlight=False,
    )
    for name, at in (
        ("created", j.created_at),
        ("queued", j.queued_at),
        ("started", j.started_at),
        ("finished", j.finished_at),
    ):
        out.print(f"  {name:<9} {at.isoformat() if at else '-'}", highlight=False)
    if j.last_error:
        out.print(f"last error: {j.last_error}", markup=False, highlight=False)
    if j.withdrawn_at:
        out.print(
            f"WITHDRAWN {j.withdrawn_at.isoformat()} by {j.withdrawn_by}: {j.withdrawn_reason}",
            markup=False,
            highlight=False,
        )
    if d.drafts:
        draft = d.drafts[0]
        out.print(
            f"draft ({draft.model_name} {draft.model_version}"
            f"{', DEMO' if draft.demo else ''}; AI generated, unverified):",
            markup=False,
        )
        out.print(draft.text, markup=False, highlight=False)
    for dl in d.deliveries:
        out.print(
            f"delivery {dl.id} {dl.object} -> {dl.destination} [{dl.kind}] {dl.state} "
            f"attempts {dl.attempts}"
            f"{' last ' + dl.last_attempt_at.isoformat() if dl.last_attempt_at else ''}"
            f"{' error: ' + dl.last_error if dl.last_error else ''}",
            markup=False,
            highlight=False,
        )
    for e in d.events:
        detail = " ".join(f"{k}={v}" for k, v in (e.detail or {}).items() if v is not None)
        out.print(
            f"  {e.at.isoformat(timespec='seconds')} {e.kind:<9} {e.actor or ''} {detail}",
            markup=False,
            highlight=False,
        )


def jobs_retry(job_id: JobId) -> None:
    """Queue a failed or cancelled job again (audited)."""
    job = service_call(job_service.requeue, job_id, actor=actor())
    typer.echo(f"job {job.id}: {job.state}")


def jobs_cancel(
    job_id: JobId,
    reason: Annotated[
        str | None,
        typer.Option(
            help="Why (no patient data), at most 500 characters.",
            callback=_checked(job_admin.check_cancel_reason),
        ),
    ] = None,
) -> None:
    """Cancel a job that has not finished, and its objects not yet sent (audited)."""
    job = service_call(job_service.cancel, job_id, actor=actor(), reason=reason)
    typer.echo(f"job {job.id}: {job.state}")


def jobs_resend(job_id: JobId) -> None:
    """Send the job's objects again to their destinations (audited)."""
    ids = service_call(job_service.resend, job_id, actor=actor())
    typer.echo(f"job {job_id}: {len(ids)} deliveries queued again")


def jobs_withdraw(
    job_id: JobId,
    reason: Annotated[
        str,
        typer.Option(
            help="Why, sent to every receiver (no patient data), 1 to 256 characters.",
            callback=_checked(withdrawals_db.check_reason),
        ),
    ],
) -> None:
    """Withdraw the job's sent draft: KOS rejection note, HL7 and FHIR withdrawals (audited).

    When it is the study's current draft, the earlier drafts it superseded go with it.
    The withdrawals are queued; a running ``cxr-node serve`` sends them.
    """
    result = service_call(job_service.withdraw, job_id, actor=actor(), reason=reason)

    def counts(r: WithdrawResult) -> str:
        return (
            f"{len(r.cancelled)} unsent object(s) cancelled, {len(r.queued)} withdrawal(s) queued"
        )

    typer.echo(f"job {job_id}: draft withdrawn; {counts(result)}")
    if result.same_draft:
        same = ", ".join(map(str, result.same_draft))
        typer.echo(f"withdrawn with it, the same draft: job(s) {same}")
    for dest, why in result.skipped.items():
        err.print(f"no withdrawal for {dest}: {why}", markup=False, highlight=False)
    _held(result)
    for earlier in result.superseded:
        same = "".join(f", {j}" for j in earlier.same_draft)
        typer.echo(
            f"withdrawn with it, the earlier draft it superseded: job(s) {earlier.job_id}{same}; "
            f"{counts(earlier)}"
        )
        for dest, why in earlier.skipped.items():
            err.print(
                f"no withdrawal of job {earlier.job_id}'s draft for {dest}: {why}",
                markup=False,
                highlight=False,
            )
        _held(earlier)


def _held(result: WithdrawResult) -> None:
    """Print the HL7 withdrawals of ``result``'s draft held back by a later result."""
    for dest, later in result.held.items():
        typer.echo(
            f"withdrawal of job {result.job_id}'s draft for {dest} held back: job {later}'s "
            "result replaces the order's there; it goes out if that result is withdrawn "
            "before it is sent, or refused at its first attempt"
        )


def jobs_priority(
    job_id: JobId,
    priority: Annotated[
        int,
        typer.Argument(
            min=MIN_PRIORITY,
            max=MAX_PRIORITY,
            help="New priority, -1000..1000 (higher first).",
        ),
    ],
) -> None:
    """Re-prioritise a job (audited)."""
    row = service_call(job_service.set_priority, job_id, priority, actor=actor())
    typer.echo(f"job {row.id}: priority {row.priority}")


# --- tokens ----------------------------------------------------------------------------------


@tokens_app.command("create")
def tokens_create(
    role: Annotated[ApiRole, typer.Option("--role", help="viewer, operator, admin or reviewer.")],
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="A label for the token: 1 to 128 letters, digits, spaces and ._@:-.",
            callback=_checked(tokens_db.check_name),
        ),
    ] = None,
) -> None:
    """Create an API token; the token is printed alone on the last line (shown once)."""
    label = name or f"{role.value}-token"
    with cli_services() as ctx:
        try:
            row, secret = token_service.create_token(ctx, name=label, role=role, actor=actor())
        except ValueError as exc:
            raise fail(exc) from None
    err.print(f"token {row.id} ({row.name}, role {row.role}); store it now, it is shown once:")
    typer.echo(secret)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[int, typer.Argument(help="Token id.", min=ID_MIN, max=ID_MAX)],
) -> None:
    """Revoke a token (its web sessions end too)."""

    with cli_services() as ctx:
        try:
            row = token_service.revoke_token(ctx, token_id, actor=actor())
        except LookupError as exc:
            raise fail(exc) from None
    typer.echo(f"token {row.id} ({row.name}) revoked")


@tokens_app.command("list")
def tokens_list(
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list on stdout.")] = False,
) -> None:
    """List tokens (never their secrets)."""

    with cli_services() as ctx:
        rows = token_service.list_tokens(ctx)
    if as_json:
        typer.echo(json.dumps(to_jsonable(rows)))
        return
    for r in rows:
        state = f"revoked {r.revoked_at.isoformat()}" if r.revoked_at else "active"
        typer.echo(f"{r.id}\t{r.role}\t{r.name}\t{state}")


# --- model tasks -----------------------------------------------------------------------------


def _runtime(settings: Settings) -> LLMCXR:
    from models.runtime import LLMCXR
    from node.runtime.modelhost import backend_options

    if settings.model_dir is None or not Path(settings.model_dir).is_dir():
        err.print("no model: set model_dir (CXR_NODE_MODEL_DIR) to a model bundle directory")
        raise typer.Exit(2)
    return LLMCXR.from_bundle(
        Path(settings.model_dir),
        backend=settings.backend,
        backend_options=backend_options(settings),
    )


def ask(
    file: Annotated[
        Path, typer.Argument(help="A DICOM image or PNG.", exists=True, dir_okay=False)
    ],
    question: Annotated[str, typer.Option("--question", "-q", help="The question.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Ask the model a question about a chest X-ray (CXR-VQA; AI generated, unverified)."""
    from node.services.images import gray8_from_file
    from node.services.tasks import answer_question

    settings = _settings()
    try:
        gray8, _ds = gray8_from_file(file)
        answer = answer_question(_runtime(settings), gray8, question)
    except typer.Exit:
        raise
    except Exception as exc:
        if getattr(exc, "http_status", None) is None and not isinstance(exc, ValueError):
            raise
        raise fail(exc) from None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "question": question,
                    "answer": answer.text,
                    "model_name": answer.model_name,
                    "model_version": answer.model_version,
                    "demo": answer.demo,
                    "timings": answer.timings,
                }
            )
        )
        return
    demo = " DEMO model," if answer.demo else ""
    err.print(f"({answer.model_name} {answer.model_version},{demo} AI generated, unverified)")
    typer.echo(answer.text)


def generate_image(
    report: Annotated[str, typer.Option("--report", help="Report text.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.", dir_okay=False)],
    dicom: Annotated[
        Path | None,
        typer.Option("--dicom", help="Also write a synthetic Secondary Capture.", dir_okay=False),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (default: greedy).")] = None,
) -> None:
    """Generate a synthetic chest X-ray from report text (256 codes -> 256x256 PNG)."""
    from integration.sc import build_synthetic_sc, to_part10_bytes
    from node.services.images import png_bytes

    settings = _settings()
    runtime = _runtime(settings)
    try:
        g = runtime.generate_image(report, seed=seed, greedy=None if seed is None else False)
    except ValueError as exc:
        raise fail(exc) from None
    out.write_bytes(png_bytes(g.image))
    typer.echo(f"wrote {out} ({g.image.shape[1]}x{g.image.shape[0]}, {g.codes.size} codes)")
    if dicom is not None:
        ds = build_synthetic_sc(
            g.image, model_name=g.model_name, model_version=g.model_version, demo=g.demo
        )
        dicom.write_bytes(to_part10_bytes(ds))
        typer.echo(f"wrote {dicom} (Secondary Capture {ds.SOPInstanceUID}, synthetic)")


def register(app: typer.Typer, jobs_app: typer.Typer, settings: Callable[[], Settings]) -> None:
    """Add the admin commands to ``cxr-node``.

    Parameters
    ----------
    app
        The root typer app (gets ``tokens``, ``ask``, ``generate-image``).
    jobs_app
        The ``jobs`` group (gets ``show``, ``retry``, ``cancel``, ``resend``, ``priority``,
        ``withdraw``).
    settings
        Loads the settings the way the rest of the CLI does (``--config``, environment).
    """
    _loader["settings"] = settings
    jobs_app.command("show")(jobs_show)
    jobs_app.command("retry")(jobs_retry)
    jobs_app.command("cancel")(jobs_cancel)
    jobs_app.command("resend")(jobs_resend)
    jobs_app.command("priority")(jobs_priority)
    jobs_app.command("withdraw")(jobs_withdraw)
    app.add_typer(tokens_app, name="tokens")
    app.command("ask")(ask)
    app.command("generate-image")(generate_image)
