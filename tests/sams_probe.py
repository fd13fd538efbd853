"""A test-only callback (`class_path: sams_probe.SelectionProbe`; `tests/` is on PYTHONPATH in the CLI tests): each
rank appends every step's selection to `<dirpath>/rank<r>.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class SelectionProbe(L.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        selected = pl_module.last_selection
        self.dirpath.mkdir(parents=True, exist_ok=True)
        row = {"step": trainer.global_step, "global_mask": selected.global_mask.tolist(),
               "mask": selected.mask.tolist(), "scores": selected.scores.tolist(),
               "chosen_input_ids": batch["chosen_input_ids"].tolist()}
        with open(self.dirpath / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
