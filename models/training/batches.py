"""The stage's examples as a torch dataset, and the collator that pads them into batches.

:func:`select_records` picks the stage's records (train split; for stage 2 the frontal
images of first studies). :class:`TrainingExamples` lists, for each record with a report,
a CXR -> report then a report -> CXR example (the tasks alternate), then its VQA pairs,
each as far as the config's ``tasks`` include it; then general instruction slots making
``general_mix`` of the whole when general data is given.

An example's instruction paraphrase (and a general slot's item) is drawn from a
generator seeded by (seed, epoch, index): reproducible, resumable, and different each
epoch (the Trainer's data loader calls ``set_epoch``). Every example is built once with
the inference instruction at start; those that cannot be built (too long for
``max_length`` with no response left, ``<image>`` in a text) are left out and counted.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from models.dataset import ManifestRecord
from models.layout import EOS_ID, TokenLayoutError
from models.prompts import PromptError
from models.text import LLMCXRTokenizer
from models.training.examples import (
    IGNORE_INDEX,
    Example,
    ExampleError,
    GeneralItem,
    general_example,
    image_example,
    report_example,
    vqa_example,
)
from models.training.recipe import TrainConfig, report_text

__all__ = ["Collator", "ExampleSpec", "TrainingExamples", "select_records"]

log = logging.getLogger(__name__)

Kind = Literal["report", "image", "vqa", "general"]
_BUILD_ERRORS = (ExampleError, PromptError, TokenLayoutError)


def select_records(records: Sequence[ManifestRecord], cfg: TrainConfig) -> list[ManifestRecord]:
    """The train-split records the stage uses (stage 2: frontal, ``study_order == 0``)."""
    chosen = [r for r in records if r.split == "train"]
    if cfg.first_frontal_only:
        chosen = [r for r in chosen if r.frontal and r.study_order == 0]
    return chosen


@dataclass(frozen=True)
class ExampleSpec:
    """What one dataset index builds: the task, the record (or general slot) and, for
    VQA, the pair's index."""

    kind: Kind
    index: int
    pair: int = -1


class TrainingExamples(Dataset[dict[str, list[int]]]):
    """The examples of one stage (see the module docstring).

    Parameters
    ----------
    tokenizer
        The base bundle's tokenizer.
    records
        The stage's records (:func:`select_records`); those without codes are left out.
    codes
        Record id -> 256 VQ-GAN codes.
    cfg
        Sections, VQA, ``general_mix``, ``max_length`` and ``seed`` are read.
    general
        General instruction items to mix in (none: no mixing).
    """

    def __init__(
        self,
        tokenizer: LLMCXRTokenizer,
        records: Sequence[ManifestRecord],
        codes: Mapping[str, npt.NDArray[np.int64]],
        cfg: TrainConfig,
        general: Sequence[GeneralItem] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.records = [r for r in records if r.id in codes]
        self.codes = {r.id: [int(c) for c in codes[r.id]] for r in self.records}
        self.epoch = 0
        self.dropped = 0
        self.specs = [s for s in self._plan() if self._build(s, None) is not None]
        self.general = [g for g in general if self._general_ok(g)]
        n_cxr = len(self.specs)
        if self.general and cfg.general_mix > 0 and n_cxr:
            n_general = max(1, round(n_cxr * cfg.general_mix / (1.0 - cfg.general_mix)))
            self.specs += [ExampleSpec("general", j) for j in range(n_general)]
        self.counts: dict[str, int] = {k: sum(s.kind == k for s in self.specs) for k in _KINDS}
        log.info(
            "training examples: %s; %d left out (too long or unbuildable)",
            ", ".join(f"{v} {k}" for k, v in self.counts.items()),
            self.dropped,
        )

    def _plan(self) -> list[ExampleSpec]:
        specs: list[ExampleSpec] = []
        for i, record in enumerate(self.records):
            if report_text(record, self.cfg) is not None:
                specs += [ExampleSpec(k, i) for k in ("report", "image") if k in self.cfg.tasks]
            if "vqa" in self.cfg.tasks:
                specs += [ExampleSpec("vqa", i, k) for k in range(len(record.vqa))]
        return specs

    def _general_ok(self, item: GeneralItem) -> bool:
        try:
            ok = general_example(self.tokenizer, item, max_length=self.cfg.max_length) is not None
        except _BUILD_ERRORS:
            ok = False
        self.dropped += not ok
        return ok

    def _build(self, spec: ExampleSpec, rng: random.Random | None) -> Example | None:
        """The example of ``spec`` (``None`` and counted as dropped when it cannot be
        built with the inference instruction)."""
        max_length = self.cfg.max_length
        try:
            if spec.kind == "general":
                assert rng is not None
                item = self.general[rng.randrange(len(self.general))]
                return general_example(self.tokenizer, item, max_length=max_length)
            record = self.records[spec.index]
            codes = self.codes[record.id]
            if spec.kind == "vqa":
                pair = record.vqa[spec.pair]
                return vqa_example(
                    self.tokenizer, codes, pair.question, pair.answer, max_length=max_length
                )
            report = report_text(record, self.cfg)
            assert report is not None
            build = report_example if spec.kind == "report" else image_example
            return build(self.tokenizer, codes, report, max_length=max_length, rng=rng)
        except _BUILD_ERRORS:
            if rng is None:
                self.dropped += 1
                return None
            raise

    def set_epoch(self, epoch: int) -> None:
        """Draw the paraphrases (and general items) of epoch ``epoch`` from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, idx: int) -> dict[str, list[int]]:
        spec = self.specs[idx]
        rng = random.Random(f"{self.cfg.seed}:{self.epoch}:{idx}")
        try:
            example = self._build(spec, rng)
        except _BUILD_ERRORS:
            example = None
        if example is None:  # a longer paraphrase did not fit: the inference one does
            example = self._build(spec, None)
        assert example is not None
        return example.to_features()


_KINDS: tuple[Kind, ...] = ("report", "image", "vqa", "general")


class Collator:
    """Pads a list of features on the right into tensors: ``input_ids`` with ``pad_id``,
    ``labels`` with ``-100``, ``attention_mask`` with 0.

    With ``trim_prompt`` the batch also says ``logits_to_keep``: the model computes the
    vocabulary logits only from the last position before the batch's earliest response
    token on (``labels`` are cut to match), since the prompt's logits carry no loss. The
    loss is unchanged; a CXR -> report step no longer computes 51,305 logits for each of
    the ~300 prompt tokens (time and memory).

    Parameters
    ----------
    pad_id
        The padding token (``<|endoftext|>``, as dolly and LLM-CXR pad).
    pad_to_multiple_of
        Round the batch's length up to a multiple of this (e.g. 8 on GPUs).
    trim_prompt
        Skip the logits of the prompt tokens (see above).
    """

    def __init__(
        self,
        pad_id: int = EOS_ID,
        pad_to_multiple_of: int | None = None,
        *,
        trim_prompt: bool = True,
    ) -> None:
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of
        self.trim_prompt = trim_prompt

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        out: dict[str, Any] = {
            "input_ids": torch.full((len(features), width), self.pad_id, dtype=torch.long),
            "labels": torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
        }
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            out["input_ids"][row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            out["labels"][row, :n] = torch.tensor(f["labels"], dtype=torch.long)
            out["attention_mask"][row, :n] = 1
        if self.trim_prompt:
            supervised = (out["labels"] != IGNORE_INDEX).any(dim=0).nonzero()
            first = int(supervised[0]) if len(supervised) else width
            start = max(first - 1, 0)  # the logits at ``t`` predict the token at ``t + 1``
            out["labels"] = out["labels"][:, start:]
            out["logits_to_keep"] = width - start
        return out
