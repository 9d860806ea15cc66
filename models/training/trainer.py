"""One training run: manifest + base bundle -> a new model bundle (Hugging Face ``Trainer``).

:func:`run_training` reads and checks the manifest and the base bundle, encodes the
stage's images once (:class:`~models.training.codes_cache.CodesCache`, the main process
first), builds the examples (:class:`~models.training.batches.TrainingExamples`), trains
the base bundle's GPT-NeoX with ``transformers.Trainer`` (accelerate underneath), saves
checkpoints under ``WORK/checkpoints`` (``resume`` continues from the newest), writes the
metrics to ``WORK/metrics.csv`` and, when ``tensorboard`` is installed, to
``WORK/tensorboard``, and writes the trained model as a bundle
(:func:`~models.training.bundle_out.write_trained_bundle`).

Precision and devices: bf16 mixed precision where the GPU supports it, fp32 otherwise
(CPU included). Several GPUs: start the same command under ``accelerate launch`` or
``torchrun``; DeepSpeed ZeRO (the paper used ZeRO-3) through ``TrainConfig.deepspeed``,
the path of a DeepSpeed JSON config (``deepspeed`` must then be installed; nothing here
imports it). See ``docs/training.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.bundle import ModelBundle, sha256_file
from models.dataset import Manifest, read_manifest
from models.layout import VOCAB
from models.text import LLMCXRTokenizer
from models.training.batches import Collator, TrainingExamples, select_records
from models.training.bundle_out import derive_version, write_trained_bundle
from models.training.codes_cache import CodesCache, GrayLoader, encoder_sha256, load_gray8_pil
from models.training.examples import GeneralItem, read_general
from models.training.metrics import CsvMetricsCallback
from models.training.recipe import TrainConfig

__all__ = ["TrainResult", "TrainingError", "run_training"]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS_CSV = "metrics.csv"
CODES_DB = "codes.sqlite"
FINAL_DIR = "final"


class TrainingError(ValueError):
    """Training cannot start or finish as asked (no usable record, stale checkpoints...)."""


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: the bundle, the steps, the first and last logged loss."""

    bundle: Path
    work: Path
    steps: int
    first_loss: float | None
    final_loss: float | None
    metrics_csv: Path
    examples: dict[str, int]
    codes_encoded: int
    codes_cached: int
    notes: list[str] = field(default_factory=list)


class _LazyEncoder:
    """The bundle's ONNX VQ-GAN encoder, opened on the first call (processes that find
    every image cached never open it)."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self._tok: Any = None

    def encode(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        if self._tok is None:
            from models.image_tokenizer import OnnxImageTokenizer

            self._tok = OnnxImageTokenizer(self.bundle.encoder_path, self.bundle.decoder_path)
        result: npt.NDArray[np.int64] = self._tok.encode(x)
        return result


def _use_bf16(cfg: TrainConfig) -> bool:
    return bool(cfg.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _training_args(cfg: TrainConfig, work: Path, progress: bool) -> Any:
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    # transformers >= 5.x names it activation_checkpointing (the old name warns)
    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else None
    checkpointing: dict[str, Any] = {name or "gradient_checkpointing": cfg.gradient_checkpointing}
    return TrainingArguments(
        **checkpointing,
        output_dir=str(work / CHECKPOINTS),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.per_device_batch,
        gradient_accumulation_steps=cfg.grad_accum,
        bf16=_use_bf16(cfg),
        use_cpu=not cuda,
        seed=cfg.seed,
        deepspeed=cfg.deepspeed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        include_num_input_tokens_seen=True,
        dataloader_num_workers=cfg.dataloader_workers,
        ddp_find_unused_parameters=False,
    )


def _callbacks(cfg: TrainConfig, work: Path, notes: list[str]) -> list[Any]:
    callbacks: list[Any] = []
    if "csv" in cfg.report_to:
        callbacks.append(CsvMetricsCallback(work / METRICS_CSV))
    if "tensorboard" in cfg.report_to:
        from transformers.integrations import TensorBoardCallback, is_tensorboard_available

        if is_tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(work / "tensorboard"))
            callbacks.append(TensorBoardCallback(tb_writer=writer))
        else:
            notes.append("tensorboard is not installed: metrics go to the CSV file only")
    return callbacks


def _load_model(llm_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(llm_dir), dtype=torch.float32, local_files_only=True
    )
    config = model.config
    if config.vocab_size != VOCAB or getattr(config, "tie_word_embeddings", False):
        raise TrainingError(
            f"{llm_dir}: the LLM must have {VOCAB} untied embedding rows "
            f"(vocab_size={config.vocab_size})"
        )
    config.use_cache = False  # no KV cache in training (and none with checkpointing)
    return model


def _start_weights(resumed: str | None, base: ModelBundle, cfg: TrainConfig) -> Path:
    """The folder the model is loaded from: the resumed checkpoint when it holds the
    weights (the Trainer reloads its raw state dict, which misses GPT-NeoX's ``embed_out``
    -> ``lm_head`` rename that ``from_pretrained`` applies), else the base bundle's LLM
    (DeepSpeed restores its own shards of the checkpoint)."""
    if resumed is None or cfg.deepspeed is not None:
        return base.llm_dir
    folder = Path(resumed)
    weights = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
    return folder if weights and (folder / "config.json").is_file() else base.llm_dir


def _checkpoint(work: Path, resume: bool, notes: list[str]) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    out = work / CHECKPOINTS
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if resume:
        if last is None:
            notes.append(f"no checkpoint under {out}: training starts from the base model")
        return last
    if last is not None:
        raise TrainingError(
            f"{out} holds checkpoints of an earlier run: resume it (--resume) "
            "or train in another work folder"
        )
    (work / METRICS_CSV).unlink(missing_ok=True)
    return None


def _losses(history: Sequence[dict[str, Any]]) -> tuple[float | None, float | None]:
    losses = [float(h["loss"]) for h in history if "loss" in h]
    return (losses[0], losses[-1]) if losses else (None, None)


@dataclass
class _Data:
    manifest: Manifest
    examples: TrainingExamples
    general: Path | None
    encoded: int
    cached: int


def _prepare_data(
    manifest_path: Path,
    base: ModelBundle,
    cfg: TrainConfig,
    args: Any,
    *,
    codes_db: Path,
    general: Path | None,
    load_gray8: GrayLoader,
) -> _Data:
    manifest = read_manifest(manifest_path)
    records = select_records(manifest.records, cfg)
    if not records:
        what = "frontal first-study train" if cfg.first_frontal_only else "train"
        raise TrainingError(f"{manifest_path}: no {what} record for stage {cfg.stage}")
    items: list[GeneralItem] = read_general(general) if general is not None else []
    with (
        args.main_process_first(desc="encoding the images"),
        CodesCache(codes_db, encoder_sha256(base)) as cache,
    ):
        codes = cache.ensure(records, _LazyEncoder(base), load_gray8, batch=cfg.encode_batch)
        encoded, cached = cache.encoded, cache.cached
    tokenizer = LLMCXRTokenizer.from_dir(base.llm_dir)
    examples = TrainingExamples(tokenizer, records, codes, cfg, items)
    if len(examples) == 0:
        raise TrainingError(f"{manifest_path}: no training example could be built")
    return _Data(manifest, examples, general, encoded, cached)


def _source(
    cfg: TrainConfig, base: ModelBundle, data: _Data, state: Any, resumed: str | None
) -> dict[str, Any]:
    import transformers

    first, last = _losses(state.log_history)
    return {
        "kind": "trained",
        "stage": cfg.stage,
        "train_config": cfg.to_dict(),
        "base": {
            "model_name": base.model_name,
            "model_version": base.model_version,
            "demo": base.demo,
            "path": str(base.root.resolve()),
        },
        "dataset": {
            "path": str(data.manifest.path.resolve()),
            "sha256": data.manifest.sha256,
            "records": len(data.examples.records),
        },
        "general": None
        if data.general is None
        else {"path": str(data.general.resolve()), "sha256": sha256_file(data.general)},
        "examples": data.examples.counts,
        "steps": int(state.global_step),
        "epochs": float(state.epoch or 0.0),
        "first_loss": first,
        "final_loss": last,
        "resumed_from": Path(resumed).name if resumed else None,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def run_training(
    manifest: Path | str,
    base_bundle: Path | str,
    out: Path | str,
    cfg: TrainConfig,
    *,
    work: Path | str | None = None,
    general: Path | str | None = None,
    resume: bool = False,
    load_gray8: GrayLoader = load_gray8_pil,
    codes_cache: Path | str | None = None,
    model_version: str | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train ``base_bundle``'s LLM on ``manifest`` and write the result as bundle ``out``.

    Parameters
    ----------
    manifest
        A :mod:`models.dataset` manifest (its train split is used).
    base_bundle
        The model bundle to start from (tokenizer, VQ-GAN and LLM).
    out
        The new bundle's folder (absent or empty unless ``overwrite``).
    cfg
        The recipe (:func:`models.training.recipe.load_config`).
    work
        Checkpoints, metrics and the codes cache; default ``<out>.work`` beside ``out``.
    general
        General instruction data (JSON Lines) mixed in as ``cfg.general_mix``.
    resume
        Continue from the newest checkpoint under ``work`` (without one: start anew).
    load_gray8
        Reads an image file as ``uint8[rows, columns]`` (default: JPG/PNG with PIL).
    codes_cache
        The codes' SQLite file; default ``work/codes.sqlite`` (share it between stages).
    model_version, model_name
        The new bundle's version (default :func:`derive_version`) and name (the base's).
    overwrite
        Replace a non-empty ``out``.
    progress
        Show the Trainer's progress bar.

    Raises
    ------
    models.dataset.ManifestError, models.bundle.BundleError, TrainingError
        Bad manifest, bad base bundle, nothing to train on or stale checkpoints.
    FileExistsError
        ``out`` is not empty and ``overwrite`` is false (checked before training).
    """
    from transformers import Trainer

    out = Path(out)
    work = Path(work) if work is not None else out.parent / f"{out.name}.work"
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use overwrite)")
    base = ModelBundle.open(base_bundle)
    notes: list[str] = []
    resumed = _checkpoint(work, resume, notes)
    args = _training_args(cfg, work, progress)
    data = _prepare_data(
        Path(manifest),
        base,
        cfg,
        args,
        codes_db=Path(codes_cache) if codes_cache is not None else work / CODES_DB,
        general=Path(general) if general is not None else None,
        load_gray8=load_gray8,
    )
    trainer = Trainer(
        model=_load_model(_start_weights(resumed, base, cfg)),
        args=args,
        train_dataset=data.examples,
        data_collator=Collator(pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        callbacks=_callbacks(cfg, work, notes),
    )
    for note in notes:
        log.warning("%s", note)
    trainer.train(resume_from_checkpoint=resumed)
    trainer.save_model(str(work / FINAL_DIR))
    state = trainer.state
    first, last = _losses(state.log_history)
    if trainer.is_world_process_zero():
        version = model_version or derive_version(base, cfg.stage, data.manifest.sha256)
        write_trained_bundle(
            out,
            base=base,
            model_dir=work / FINAL_DIR,
            source=_source(cfg, base, data, state, resumed),
            model_version=version,
            model_name=model_name,
            overwrite=overwrite,
        )
    return TrainResult(
        bundle=out,
        work=work,
        steps=int(state.global_step),
        first_loss=first,
        final_loss=last,
        metrics_csv=work / METRICS_CSV,
        examples=dict(data.examples.counts),
        codes_encoded=data.encoded,
        codes_cached=data.cached,
        notes=notes,
    )
