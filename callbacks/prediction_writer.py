"""`JSONLPredictionWriter`: write `predict` outputs (prompt, response[, reward]) to a JSONL file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from datamodules.utils.files import write_jsonl_atomic
from lightning_modules.runtime.run_dir import resolve_in_run_dir
from lightning_modules.models.generation import RewardFn


class JSONLPredictionWriter(BasePredictionWriter):
    """Collects every predicted row at the end of `predict` and writes them atomically, one JSON per line."""

    def __init__(self, path: str, reward: RewardFn | None = None):
        """Output file.

        Args:
            path: JSONL file to write (rows in prompt order); a relative path is inside the run directory.
            reward: optional callable (prompts, responses) -> rewards; adds a `reward` field to each row.
        """
        super().__init__(write_interval="epoch")
        self.path = Path(path)
        self.reward = reward

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        rows = [row for batch in predictions for row in batch]
        if self.reward is not None:
            rewards = self.reward([r["prompt"] for r in rows], [r["response"] for r in rows])
            for row, reward in zip(rows, rewards):
                row["reward"] = float(reward)
        path = resolve_in_run_dir(self.path, trainer)
        write_jsonl_atomic(path, rows)
        print(f"wrote {len(rows)} predictions to {path}")
