"""The non-finite guard: a NaN/inf loss or gradient norm skips the update, is counted, and a streak stops training."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import SFTDataModule
from lightning_modules.runtime.guard import NonFiniteGuard, NonFiniteTrainingError
from lightning_modules.sft import SFTModule


class NaNGradient(torch.autograd.Function):
    """Identity on the value (0 added), NaN on the way back: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class Sabotaged(SFTModule):
    """SFT whose loss (or only its gradient) is made non-finite on the batches in `bad_batches`."""

    def __init__(self, *args, bad_batches=(), mode="loss", **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_batches, self.mode = set(bad_batches), mode

    def model_step(self, batch, stage):
        loss, metrics = super().model_step(batch, stage)
        if stage == "train" and self.trainer.fit_loop.total_batch_idx in self.bad_batches:
            if self.mode == "loss":
                loss = loss * float("nan")
            else:
                first = next(p for p in self.policy.parameters() if p.requires_grad)
                loss = loss + NaNGradient.apply(first.sum())
        return loss, metrics


class Snapshots(L.Callback):
    """A copy of the trainable weights after every training batch (index = batch number)."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().flatten().clone() for p in pl_module.policy.parameters()]))


def fit(assets: Path, batches: int, accumulate: int = 1, **module_kwargs) -> tuple[Sabotaged, Snapshots, L.Trainer]:
    L.seed_everything(0, verbose=False)
    module = Sabotaged(str(assets / "model"), optimizer=functools.partial(torch.optim.SGD, lr=0.1), **module_kwargs)
    data = SFTDataModule(str(assets / "data/sft"), str(assets / "model"), max_length=64, batch_size=16, val_split=None)
    snapshots = Snapshots()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=batches, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[snapshots], accumulate_grad_batches=accumulate)
    trainer.fit(module, datamodule=data)
    return module, snapshots, trainer


@pytest.mark.parametrize("mode", ["loss", "gradient"])
def test_non_finite_steps_are_skipped_and_counted(assets: Path, mode: str) -> None:
    module, snaps, trainer = fit(assets, batches=6, bad_batches={2, 3}, mode=mode)
    w = snaps.weights
    assert len(w) == 6
    for i in (2, 3):  # no update at all on the sabotaged batches
        assert torch.equal(w[i], w[i - 1]), f"batch {i} changed the weights"
    for i in (1, 4, 5):  # ordinary batches still train
        assert not torch.equal(w[i], w[i - 1]), f"batch {i} did not train"
    assert all(bool(torch.isfinite(x).all()) for x in w)
    assert module.guard.skipped == 2 and module.guard.consecutive == 0
    assert trainer.callback_metrics["train/skipped_steps"].item() == 2.0


@pytest.mark.parametrize("mode", ["loss", "gradient"])
@pytest.mark.parametrize("bad", [2, 3])
def test_a_bad_micro_batch_skips_its_whole_step_once(assets: Path, mode: str, bad: int) -> None:
    """Accumulating 2 batches per step: a non-finite first or second micro-batch of step 2 skips step 2 whole,
    and it counts as one skipped step. Before: a NaN loss on the first micro-batch was counted twice (once
    for the loss, once more for the NaN gradient it left for the step's norm check)."""
    module, snaps, _ = fit(assets, batches=6, accumulate=2, bad_batches={bad}, mode=mode)
    w = snaps.weights
    assert torch.equal(w[3], w[1])  # step 2 (batches 2-3) changed nothing
    assert not torch.equal(w[1], w[0]) and not torch.equal(w[5], w[3])  # steps 1 and 3 trained
    assert all(bool(torch.isfinite(x).all()) for x in w)
    assert module.guard.skipped == 1 and module.guard.consecutive == 0


def test_a_streak_of_non_finite_steps_stops_with_the_step_and_causes(assets: Path) -> None:
    """Batches 2 and 3 are optimizer steps 3 and 4 (a skipped step still counts); lr 0.1 is 0.06 by then (schedule)."""
    with pytest.raises(NonFiniteTrainingError, match=r"training stopped at step 4: the loss was NaN or infinite for "
                                                     r"2 steps in a row.*learning rate too high \(learning rate 0\.06\)"):
        fit(assets, batches=6, bad_batches={2, 3, 4}, max_nonfinite_steps=2)


def test_guard_counts_and_state_round_trip() -> None:
    guard = NonFiniteGuard(max_consecutive=3)
    for bad in (True, False, True, True):
        guard.record(bad, step=1, what="loss")
    assert (guard.skipped, guard.consecutive) == (3, 2)
    restored = NonFiniteGuard(max_consecutive=3)
    restored.load_state_dict(guard.state_dict())
    with pytest.raises(NonFiniteTrainingError, match="3 steps in a row"):  # the streak continues after a resume
        restored.record(True, step=9, what="gradient norm")
    assert not math.isnan(restored.skipped)
    never = NonFiniteGuard(max_consecutive=0)
    for _ in range(10):
        never.record(True, step=1, what="loss")
    assert never.skipped == 10
