"""Training metrics to a CSV file: a ``transformers.TrainerCallback``.

Each of the Trainer's logging steps appends a row ``step, epoch, loss, learning_rate,
grad_norm, tokens_per_s, elapsed_s`` (numbers only: no text of the data). ``tokens_per_s``
counts the input tokens the Trainer saw (``include_num_input_tokens_seen``) since the
previous row. A resumed run appends to the same file. Only the main process writes.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["COLUMNS", "CsvMetricsCallback", "read_metrics"]

COLUMNS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "elapsed_s")


class CsvMetricsCallback(TrainerCallback):
    """Append the Trainer's training logs to ``path`` (see the module docstring).

    Parameters
    ----------
    path
        The CSV file (created with its header when absent or empty).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._t0 = time.perf_counter()
        self._last_t = self._t0
        self._last_tokens = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """Start the clock and the token count (from a resumed state's count)."""
        self._t0 = self._last_t = time.perf_counter()
        self._last_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        """Append one row for a log holding ``loss`` (the final summary is skipped)."""
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        rate = (tokens - self._last_tokens) / max(now - self._last_t, 1e-9)
        self._last_t, self._last_tokens = now, tokens
        row = {
            "step": state.global_step,
            "epoch": round(float(state.epoch or 0.0), 4),
            "loss": float(logs["loss"]),
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "grad_norm": float(logs.get("grad_norm", float("nan"))),
            "tokens_per_s": round(rate, 1),
            "elapsed_s": round(now - self._t0, 2),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)


def read_metrics(path: Path | str) -> list[dict[str, float]]:
    """The rows of a metrics CSV as floats."""
    with Path(path).open(encoding="utf-8", newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
