"""`ExportPretrained`: save the final policy + tokenizer with `save_pretrained` (loads with `from_pretrained`).

Under DeepSpeed ZeRO-3 each rank holds only a partition of every weight, so the export first gathers
the weights (`models.zero.gathered_state_dict`, one module at a time, on every rank) and rank 0 writes
them; without that, `save_pretrained` would write the ranks' empty placeholders.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import lightning as L

from datamodules.utils.files import default_dir_mode, default_file_mode
from lightning_modules.models.adapters import has_adapters, merged_copy, merged_state_dict
from lightning_modules.models.zero import gathered_state_dict, is_partitioned
from lightning_modules.runtime.run_dir import resolve_in_run_dir


def export_pretrained(model, tokenizer, dirpath: str | Path, state_dict: dict | None = None) -> Path:
    """Write model + tokenizer so that `dirpath` is, at every instant, either the old export or the new one.

    The files go to a fresh sibling folder `.<name>-<random>`; `dirpath` is then a symlink switched to
    it with one atomic `os.replace`, and the previous folder is removed. A kill at any moment leaves
    a complete export at `dirpath` (or none yet). Files get the permissions a plain `open` would give
    (`save_pretrained` can leave 0600), and the tokenizer is saved with right padding (generation
    switches it to left padding while it runs).

    A LoRA / QLoRA policy (peft) is exported with its adapters merged into a copy of its base
    (`adapters.merged_copy`; a 4-bit base is dequantized to float first), as a plain float model that
    `from_pretrained` loads: no adapter files, no quantization config. `model` itself is not changed.

    `state_dict` replaces `model`'s own weights (the gathered weights of a ZeRO-3 model; for a LoRA policy
    the peft model's, merged by `adapters.merged_state_dict`); a partitioned model without it is refused,
    never written as empty tensors.
    """
    if state_dict is None and is_partitioned(model):
        raise ValueError("the model's weights are ZeRO-3 partitions: pass state_dict=gathered_state_dict(model), "
                         "gathered on every rank")
    if has_adapters(model) and state_dict is not None:  # ZeRO-3: fold the adapters into the gathered weights
        state_dict, model = merged_state_dict(model, state_dict), model.get_base_model()
    elif has_adapters(model):
        model = merged_copy(model)
    target = Path(dirpath)
    target.parent.mkdir(parents=True, exist_ok=True)
    content = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        if state_dict is None:
            model.save_pretrained(content)
        else:
            model.save_pretrained(content, state_dict=state_dict)
        if tokenizer is not None:
            side = tokenizer.padding_side
            tokenizer.padding_side = "right"
            try:
                tokenizer.save_pretrained(content)
            finally:
                tokenizer.padding_side = side
        content.chmod(default_dir_mode())
        for file in content.rglob("*"):
            file.chmod(default_dir_mode() if file.is_dir() else default_file_mode())
        previous = _swap_in(content, target)
    except BaseException:
        shutil.rmtree(content, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return target


def _swap_in(content: Path, target: Path) -> Path | None:
    """Point `target` (a symlink) at `content` atomically; return the folder it pointed at before, if any."""
    previous = None
    if target.is_symlink():
        previous = target.parent / os.readlink(target)
    elif target.exists():  # an export folder written by an older version: move it aside first
        previous = target.with_name(f".{target.name}-previous-{os.getpid()}")
        target.rename(previous)
    link = target.with_name(f".{target.name}.link-{os.getpid()}")
    link.unlink(missing_ok=True)
    link.symlink_to(content.name, target_is_directory=True)
    try:
        os.replace(link, target)
    except BaseException:
        link.unlink(missing_ok=True)
        if previous is not None and not target.exists() and not target.is_symlink():
            previous.rename(target)  # put a moved-aside older export back
        raise
    return previous


class ExportPretrained(L.Callback):
    """At the end of `fit`, export `pl_module.policy` and the datamodule's tokenizer in HF format."""

    def __init__(self, dirpath: str):
        """Export location.

        Args:
            dirpath: folder receiving config.json, weights and tokenizer files; a relative path is inside the run directory.
        """
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        policy = pl_module.policy
        # ZeRO-3: a collective on every rank (the partitioning is the same on all, so all take this branch)
        state_dict = gathered_state_dict(policy) if is_partitioned(policy) else None
        if trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            path = export_pretrained(policy, tokenizer, resolve_in_run_dir(self.dirpath, trainer), state_dict=state_dict)
            print(f"exported policy + tokenizer to {path}")
        trainer.strategy.barrier()
