"""`MetricsJSON`: write the latest logged metrics to a JSON file after every validation and at fit end."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from datamodules.utils.files import write_text_atomic
from lightning_modules.runtime.run_dir import resolve_in_run_dir


class MetricsJSON(L.Callback):
    """Keeps `trainer.callback_metrics` (e.g. `val/rewards/accuracies`) readable by scripts."""

    def __init__(self, path: str):
        """Output file.

        Args:
            path: JSON file to (atomically) rewrite with {metric name: value, "step": global step}; relative = in the run directory.
        """
        self.path = Path(path)

    def _write(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics["step"] = trainer.global_step
        write_text_atomic(resolve_in_run_dir(self.path, trainer), json.dumps(metrics, indent=2, sort_keys=True))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)
