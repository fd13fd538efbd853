"""Golden trajectories: the first training losses of seeded tiny SFT and DPO runs, guarding refactors.

Each run: `seed_everything(0)`, the `assets` fixture's tiny Llama and data, AdamW (lr 1e-3) with the
default linear schedule, batch size 8, 5 optimizer steps on CPU with `deterministic=True`. The
training data is shuffled by the DataLoader from torch's global RNG, which `seed_everything` seeds.
The losses are compared with `tests/golden/trajectories.json` (rtol 1e-4). After an intended change
of the numbers (or of the asset parameters in conftest.py), regenerate the file with

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

and review its diff.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import PreferenceDataModule, SFTDataModule
from lightning_modules.dpo import DPOModule
from lightning_modules.sft import SFTModule

GOLDEN = Path(__file__).parent / "golden" / "trajectories.json"
STEPS = 5
REGENERATE = "UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py"


class LossRecorder(L.Callback):
    """The training loss of every step, as returned by `training_step`."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


RUNS = {
    "sft": (SFTModule, SFTDataModule, "data/sft", {}),
    "dpo": (DPOModule, PreferenceDataModule, "data/prefs", {"beta": 0.1, "reference": "live"}),
}


def trajectory(name: str, assets: Path) -> list[float]:
    """Training losses of the first `STEPS` steps of the seeded tiny run `name`."""
    module_class, data_class, data_folder, options = RUNS[name]
    L.seed_everything(0, verbose=False)
    model = module_class(str(assets / "model"), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                         **options)
    data = data_class(str(assets / data_folder), str(assets / "model"), max_length=64, batch_size=8,
                      val_split=None)
    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                        callbacks=[recorder])
    trainer.fit(model, datamodule=data)
    assert len(recorder.losses) == STEPS
    return recorder.losses


@pytest.fixture(scope="module")
def trajectories(assets):
    """Two runs of each trajectory in this process; leaves torch's determinism flag as it found it."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    seed = os.environ.get("PL_GLOBAL_SEED")
    try:
        yield {name: (trajectory(name, assets), trajectory(name, assets)) for name in RUNS}
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if seed is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = seed


def asset_params(assets: Path) -> dict:
    return json.loads((assets / "manifest.json").read_text())["params"]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_runs_are_deterministic(trajectories, name):
    first, second = trajectories[name]
    assert first == second
    assert len(set(first)) == STEPS  # the loss moves: the run trains on different batches


@pytest.mark.slow
def test_first_dpo_loss_is_ln2(trajectories):
    # the live reference is a frozen copy of the initial policy: h = 0 and −log σ(0) = ln 2
    assert trajectories["dpo"][0][0] == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.slow
def test_matches_golden(trajectories, assets):
    losses = {name: runs[0] for name, runs in trajectories.items()}
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        record = {"regenerate": REGENERATE, "steps": STEPS, "assets": asset_params(assets), **losses}
        GOLDEN.write_text(json.dumps(record, indent=2) + "\n")
        pytest.skip(f"UPDATE_GOLDEN=1: wrote {GOLDEN} instead of comparing")
    golden = json.loads(GOLDEN.read_text())
    assert golden["assets"] == asset_params(assets), f"the test assets changed; regenerate with {REGENERATE}"
    for name, values in losses.items():
        assert values == pytest.approx(golden[name], rel=1e-4), f"{name} trajectory moved; if intended: {REGENERATE}"
