"""The stop-and-resume contract, as one call: `assert_resumes_exactly(make_module, make_data, ...)`.

Three seeded runs of the same job on CPU:
1. uninterrupted, `steps` optimizer steps, recording every step's training loss;
2. interrupted: a checkpoint every `every` steps, then a stop `lost_steps` steps after the last one
   (the work after the checkpoint is lost, as in a kill);
3. resumed from that checkpoint in a fresh module, data module and trainer, run to `steps`.
Every per-step loss of runs 2 and 3 must equal run 1's exactly (no tolerance). A new module or
stateful helper joins the contract with one line in `tests/test_resume.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LossRecorder(L.Callback):
    """{global step after the update: training loss} of every training batch."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is not None:
            self.losses[trainer.global_step] = outputs["loss"].item()


class StopAtStep(L.Callback):
    """Stops training once `step` optimizer steps are done (stands in for a kill)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(make_module: Callable[[], L.LightningModule], make_data: Callable[[], L.LightningDataModule], *,
         steps: int, callbacks: Sequence[L.Callback], ckpt_path: str | None = None, seed: int = 0,
         make_callbacks: Callable[[], list[L.Callback]] = list) -> LossRecorder:
    L.seed_everything(seed, verbose=False)
    recorder = LossRecorder()
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)  # else Lightning would write ./checkpoints
    # max_epochs set as in the shipped configs: the LR schedule's step count then builds the training loader
    # before Lightning restores the loop state (the path where a resumed run used to replay the epoch).
    trainer = L.Trainer(max_steps=steps, max_epochs=100, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False,
                        enable_checkpointing=checkpointing,
                        enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[recorder, *callbacks, *make_callbacks()])
    trainer.fit(make_module(), datamodule=make_data(), ckpt_path=ckpt_path)
    return recorder


def assert_resumes_exactly(make_module: Callable[[], L.LightningModule], make_data: Callable[[], L.LightningDataModule],
                           tmp_path: Path, *, steps: int = 12, every: int = 6, lost_steps: int = 2,
                           make_callbacks: Callable[[], list[L.Callback]] = list) -> dict[int, float]:
    """Run the three runs above; fail on any differing loss. Returns the uninterrupted losses by step.

    `make_callbacks` builds fresh stateful callbacks (e.g. `ReferenceSync`) for each run.
    """
    full = _fit(make_module, make_data, steps=steps, callbacks=[], make_callbacks=make_callbacks).losses
    assert sorted(full) == list(range(1, steps + 1)), f"uninterrupted run logged steps {sorted(full)}"
    resume_at = ((steps - 1) // every) * every  # the last checkpoint before the end
    assert 0 < resume_at < steps, f"steps={steps}, every={every}: no checkpoint to resume from"
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=every, save_top_k=-1,
                                  filename="{step}")
    stopped = _fit(make_module, make_data, steps=steps, make_callbacks=make_callbacks,
                   callbacks=[checkpoints, StopAtStep(min(resume_at + lost_steps, steps - 1))]).losses
    assert stopped == {s: full[s] for s in stopped}, "the interrupted run differs before its checkpoint"
    ckpt = tmp_path / "checkpoints" / f"step={resume_at}.ckpt"
    assert ckpt.exists(), f"no checkpoint at step {resume_at}: {sorted(p.name for p in ckpt.parent.iterdir())}"
    resumed = _fit(make_module, make_data, steps=steps, callbacks=[], ckpt_path=str(ckpt),
                   make_callbacks=make_callbacks).losses
    expected = {s: full[s] for s in range(resume_at + 1, steps + 1)}
    mismatched = {s: (resumed.get(s), expected[s]) for s in expected if resumed.get(s) != expected[s]}
    assert not mismatched and sorted(resumed) == sorted(expected), (
        f"resumed from step {resume_at}: step -> (resumed, uninterrupted) losses differ: {mismatched}")
    return full
