"""The training configuration and the paper's two-stage recipe as its defaults.

LLM-CXR fine-tuned dolly-v2-3b in two stages with DeepSpeed ZeRO-3 in bf16: 5 epochs,
batch 2 per GPU, learning rate 5e-6 with 50 warm-up steps (linear decay), loss on the
response tokens only, at most 2,048 tokens an example.

- Stage 1 (:func:`paper_stage` ``(1)``): every image of the train split, the report being
  ``FINDINGS: ... IMPRESSION: ...``.
- Stage 2 (:func:`paper_stage` ``(2)``): the PA/AP images of each patient's first study
  (``study_order == 0``), the report being the impression text alone (no heading), plus
  the CXR-VQA pairs.

Both stages alternate CXR -> report and report -> CXR examples, and mix in general
instruction-following data (dolly-15k style) as 20 % of the examples when a site supplies
it. A configuration file (TOML or JSON) holds any of :class:`TrainConfig`'s fields, at the
top level or in a ``[train]`` table; :func:`load_config` starts from the stage's preset,
applies the file, then the command line's overrides (:meth:`TrainConfig.with_overrides`).
"""

from __future__ import annotations

import json
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from models.dataset import ManifestRecord

__all__ = [
    "REPORT_TO",
    "TASKS",
    "ConfigError",
    "TrainConfig",
    "load_config",
    "paper_stage",
    "report_text",
]

#: Metric sinks: ``csv`` (always available) and ``tensorboard`` (when installed).
REPORT_TO = ("csv", "tensorboard")
_SECTIONS = ("findings", "impression")
#: The tasks a run can train: CXR -> report, report -> CXR, CXR-VQA.
TASKS = ("report", "image", "vqa")


class ConfigError(ValueError):
    """A training configuration value or file is invalid; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that shapes one training run (the defaults are the paper's stage 1).

    Attributes
    ----------
    stage
        1 or 2 (see the module docstring); recorded in the trained bundle.
    epochs, max_steps
        Passes over the examples; ``max_steps > 0`` stops earlier (and wins over epochs).
    lr, warmup_steps, lr_scheduler, weight_decay
        AdamW learning rate, linear warm-up steps, the ``transformers`` scheduler name.
    per_device_batch, grad_accum
        Examples per device and step, and gradient accumulation steps.
    max_length
        Longest example in tokens; longer ones are cut at the end, never inside an image.
    bf16
        Mixed precision bf16 where the GPU supports it (fp32 on CPU whatever the value).
    gradient_checkpointing
        Recompute activations in the backward pass (less memory, more compute).
    seed
        Seed of the model's training and of the instruction paraphrase draws.
    report_sections, section_headings
        Which report sections make the report, and whether each is headed (``FINDINGS:
        ... IMPRESSION: ...``, stage 1) or the text stands alone (stage 2's impressions,
        which the runtime reads as the impression).
    first_frontal_only
        Whether only the frontal images of a patient's first study are used.
    tasks
        The tasks trained, among :data:`TASKS`: ``report`` (CXR -> report), ``image``
        (report -> CXR) and ``vqa`` (the manifest's VQA pairs); the paper trains
        ``report`` and ``image`` in stage 1 and adds ``vqa`` in stage 2.
    general_mix
        Share of general instruction examples in the mix when a general JSONL is given.
    deepspeed
        Path of a DeepSpeed JSON config (ZeRO-3 in the paper); needs ``deepspeed``.
    save_steps, save_total_limit, logging_steps
        Checkpoint every ``save_steps`` steps (keeping the newest ``save_total_limit``),
        log metrics every ``logging_steps`` steps.
    report_to
        Metric sinks among :data:`REPORT_TO`.
    dataloader_workers, encode_batch
        Data loader worker processes; images a VQ-GAN encoder call.
    """

    stage: int = 1
    epochs: float = 5.0
    max_steps: int = -1
    lr: float = 5e-6
    warmup_steps: int = 50
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    per_device_batch: int = 2
    grad_accum: int = 1
    max_length: int = 2048
    bf16: bool = True
    gradient_checkpointing: bool = True
    seed: int = 42
    report_sections: tuple[str, ...] = _SECTIONS
    section_headings: bool = True
    first_frontal_only: bool = False
    tasks: tuple[str, ...] = ("report", "image")
    general_mix: float = 0.2
    deepspeed: str | None = None
    save_steps: int = 500
    save_total_limit: int | None = 3
    logging_steps: int = 10
    report_to: tuple[str, ...] = REPORT_TO
    dataloader_workers: int = 0
    encode_batch: int = 8

    def __post_init__(self) -> None:
        _check(self.stage in (1, 2), "stage", "must be 1 or 2")
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.lr > 0, "lr", "must be > 0")
        for name in ("warmup_steps", "weight_decay", "dataloader_workers"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("per_device_batch", "grad_accum", "save_steps", "logging_steps"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.encode_batch >= 1, "encode_batch", "must be >= 1")
        _check(self.max_length >= 300, "max_length", "must be >= 300 (an image is 258 tokens)")
        _check(0.0 <= self.general_mix < 1.0, "general_mix", "must be in [0, 1)")
        _check(
            bool(self.report_sections) and set(self.report_sections) <= set(_SECTIONS),
            "report_sections",
            f"must be a non-empty subset of {list(_SECTIONS)}",
        )
        _check(
            bool(self.tasks) and set(self.tasks) <= set(TASKS),
            "tasks",
            f"must be a non-empty subset of {list(TASKS)}",
        )
        _check(set(self.report_to) <= set(REPORT_TO), "report_to", f"must be in {REPORT_TO}")
        _check(
            self.save_total_limit is None or self.save_total_limit >= 1,
            "save_total_limit",
            "must be >= 1 or null",
        )

    def with_overrides(self, **values: Any) -> TrainConfig:
        """A copy with the given fields replaced; ``None`` values are left as they are
        (so unset command-line options change nothing)."""
        given = {k: v for k, v in values.items() if v is not None}
        return _build(self, given, "overrides")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (recorded in the trained bundle's manifest)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def report_text(record: ManifestRecord, cfg: TrainConfig) -> str | None:
    """The report a record is trained on under ``cfg`` (``None`` without those sections):
    ``FINDINGS: ... IMPRESSION: ...`` with headings, else the sections' texts joined."""
    if cfg.section_headings:
        return record.report(cfg.report_sections)
    parts = [getattr(record, name) for name in cfg.report_sections]
    text = " ".join(p.strip() for p in parts if p and p.strip())
    return text or None


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"training config: {name} {what}")


def paper_stage(stage: int) -> TrainConfig:
    """The paper's preset of ``stage`` (1: all train images, findings + impression;
    2: first-study frontal images, impression only, plus VQA)."""
    if stage == 1:
        return TrainConfig(stage=1)
    if stage == 2:
        return TrainConfig(
            stage=2,
            report_sections=("impression",),
            section_headings=False,
            first_frontal_only=True,
            tasks=TASKS,
        )
    raise ConfigError(f"training config: stage must be 1 or 2, got {stage!r}")


def _coerce(name: str, hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against the field's type (ints pass as floats, lists as tuples)."""
    base = hint
    if isinstance(hint, types.UnionType):  # ``X | None``
        if value is None:
            return None
        base = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(base) is tuple:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif base is bool:
        if isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {name} has the wrong type ({type(value).__name__})")


def _build(base: TrainConfig, values: dict[str, Any], where: str) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown training setting(s): {', '.join(unknown)}")
    coerced = {k: _coerce(k, hints[k], v, where) for k, v in values.items()}
    return replace(base, **coerced)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the training config {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML/JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a table/object")
    train = data.get("train", data)
    if not isinstance(train, dict):
        raise ConfigError(f"{path}: [train] must be a table")
    return dict(train)


def load_config(
    path: Path | str | None = None, *, stage: int | None = None, **overrides: Any
) -> TrainConfig:
    """The stage's :func:`paper_stage` preset, then ``path``'s values, then ``overrides``.

    Parameters
    ----------
    path
        A TOML (``.toml``) or JSON (``.json``) file of :class:`TrainConfig` fields, at the
        top level or in a ``[train]`` table; ``None`` for the preset alone.
    stage
        The stage; default: the file's ``stage``, else 1. Given here, it wins over the file.
    **overrides
        Field values (``None`` values are ignored), e.g. from the command line.

    Raises
    ------
    ConfigError
        An unreadable file, an unknown field, a value of the wrong type or out of range.
    """
    values = _read_file(Path(path)) if path is not None else {}
    where = str(path) if path is not None else "training config"
    file_stage = values.pop("stage", None)
    chosen = stage if stage is not None else file_stage if file_stage is not None else 1
    if isinstance(chosen, bool) or chosen not in (1, 2):
        raise ConfigError(f"{where}: stage must be 1 or 2, got {chosen!r}")
    cfg = _build(paper_stage(int(chosen)), values, where)
    return cfg.with_overrides(**overrides)
