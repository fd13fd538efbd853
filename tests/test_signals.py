"""SIGTERM / SIGINT during `fit`: the step finishes, a checkpoint is written, the exit code is 128 + signal.

The signal is sent by a callback to its own process after step 3, as a scheduler's SIGTERM or a
Ctrl+C would arrive; resuming from the written checkpoint continues exactly.
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import SFTDataModule
from lightning_modules.runtime.signals import TrainingInterrupted
from lightning_modules.sft import SFTModule
from resume_helper import _fit

STEPS = 6


class SendSignal(L.Callback):
    def __init__(self, signum: int, at_step: int) -> None:
        self.signum, self.at_step = signum, at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


def module(assets: Path) -> SFTModule:
    return SFTModule(str(assets / "model"), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))


def data(assets: Path) -> SFTDataModule:
    return SFTDataModule(str(assets / "data/sft"), str(assets / "model"), max_length=64, batch_size=32, val_split=None)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_exits_nonzero(assets: Path, tmp_path: Path, signum: int) -> None:
    before = signal.getsignal(signum)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1000)  # only names the folder
    with pytest.raises(TrainingInterrupted) as stopped:
        _fit(lambda: module(assets), lambda: data(assets), steps=STEPS,
             callbacks=[checkpoints, SendSignal(signum, at_step=3)])
    assert stopped.value.code == 128 + signum  # 143 for SIGTERM, 130 for SIGINT: a failure to any scheduler
    path = tmp_path / "ckpt" / "interrupted-step=3.ckpt"
    assert stopped.value.checkpoint == str(path) and path.exists()
    assert signal.getsignal(signum) is before  # the handlers are put back
    if signum == signal.SIGTERM:
        full = _fit(lambda: module(assets), lambda: data(assets), steps=STEPS, callbacks=[]).losses
        resumed = _fit(lambda: module(assets), lambda: data(assets), steps=STEPS, callbacks=[], ckpt_path=str(path))
        assert resumed.losses == {s: full[s] for s in range(4, STEPS + 1)}
