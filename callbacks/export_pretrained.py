"""`ExportPretrained`: save the final policy + tokenizer with `save_pretrained` (loads with `from_pretrained`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L

from lightning_modules.models.adapters import has_adapters, merged_copy


def export_pretrained(model, tokenizer, dirpath: str | Path) -> Path:
    """Write model + tokenizer to `dirpath` atomically: a temp folder renamed into place at the end.

    A LoRA / QLoRA policy (peft) is exported with its adapters merged into a copy of its base
    (`adapters.merged_copy`; a 4-bit base is dequantized to float first), as a plain float model that
    `from_pretrained` loads: no adapter files, no quantization config. `model` itself is not changed.
    """
    if has_adapters(model):
        model = merged_copy(model)
    target = Path(dirpath)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    return target


class ExportPretrained(L.Callback):
    """At the end of `fit`, export `pl_module.policy` and the datamodule's tokenizer in HF format."""

    def __init__(self, dirpath: str):
        """Export location.

        Args:
            dirpath: folder receiving config.json, model weights and tokenizer files.
        """
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            path = export_pretrained(pl_module.policy, tokenizer, self.dirpath)
            print(f"exported policy + tokenizer to {path}")
        trainer.strategy.barrier()
