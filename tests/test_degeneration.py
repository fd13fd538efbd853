"""Tests for `callbacks.DegenerationDetector`: hand-computed repetition and length statistics, a NaN
loss in a real fit, and seeded tiny DPO runs that do (SGD lr 10) and do not (lr 1e-3) degenerate.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import callbacks.heldout_generation as heldout_generation
from callbacks import DegenerationDetector, MetricsJSON
from callbacks.degeneration import degeneration_reasons, degeneration_stats, repeated_ngram_fraction
from datamodules import PreferenceDataModule
from lightning_modules.dpo import DPOModule
from datamodules.utils.errors import UserInputError
from lightning_modules.optim import ConstantWithWarmup

pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode",  # the frozen reference
                                        "ignore:DegenerationDetector flagged")

# --------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(("text", "n", "want"), [
    ("a b a b a b", 2, 1 - 2 / 5),  # ab ba ab ba ab: 2 unique of 5
    ("a b a b a b", 1, 1 - 2 / 6),  # a b a b a b: 2 unique of 6
    ("a b a b a b", 3, 1 - 2 / 4),  # aba bab aba bab
    ("a a a a a", 4, 1 - 1 / 2),  # aaaa aaaa
    ("the cat sat on the mat", 2, 0.0),  # all five bigrams differ
    ("  a\nb \t a b ", 2, 1 - 2 / 3),  # any whitespace separates words
    ("a b c", 4, 0.0),  # fewer words than n: no n-grams
    ("", 2, 0.0),
])
def test_repeated_ngram_fraction_by_hand(text: str, n: int, want: float) -> None:
    assert repeated_ngram_fraction(text, n) == pytest.approx(want)


HEALTHY = ["1 2 3 4", "pig pig pig", "the cat sat on the mat"]
LOOPING = ["x y x y x y x y x y", "go go go go go go", "the cat sat on the mat"]  # 7/9, 4/5, 0 at n=2


def test_degeneration_stats_and_reasons_by_hand() -> None:
    rep, long = degeneration_stats(LOOPING, [10, 6, 6], max_new_tokens=64, ngram=2)
    assert rep == pytest.approx((7 / 9 + 4 / 5 + 0) / 3) and long == 0.0
    assert degeneration_reasons(LOOPING, [10, 6, 6], max_new_tokens=64, ngram=2) == ["repetition"]
    assert degeneration_reasons(LOOPING, [10, 6, 6], max_new_tokens=64, ngram=2, max_repeat_fraction=0.6) == []

    # Runaway: a response counts at >= 0.9·64 = 57.6 tokens; more than half of them must count.
    rep, long = degeneration_stats(HEALTHY, [64, 58, 57], max_new_tokens=64, ngram=2)
    assert rep == pytest.approx(1 / 2 / 3) and long == pytest.approx(2 / 3)  # "pig pig pig": 1 of 2 bigrams repeats
    assert degeneration_reasons(HEALTHY, [64, 58, 57], max_new_tokens=64, ngram=2) == ["runaway_length"]
    four = [*HEALTHY, "ok"]
    assert degeneration_reasons(four, [64, 64, 3, 3], max_new_tokens=64) == []  # exactly half is not "more"
    assert degeneration_reasons(LOOPING, [64, 64, 64], max_new_tokens=64, ngram=2) == ["repetition", "runaway_length"]
    assert degeneration_reasons(HEALTHY, [4, 3, 6], max_new_tokens=64, ngram=2) == []
    assert degeneration_reasons([], [], max_new_tokens=64) == []


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"ngram": 0}, r"must be >= 1, got 32, 64, 0"),
    ({"max_repeat_fraction": 1.5}, r"max_repeat_fraction must be in \[0, 1\]"),
    ({"max_length_fraction": 0.0}, r"max_length_fraction in \(0, 1\], got 0.5, 0.0"),
])
def test_bad_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(UserInputError, match=pattern):
        DegenerationDetector("unused.jsonl", **kwargs)


# --------------------------------------------------------------------- NaN loss in a real fit


class NaNAtStep(L.LightningModule):
    """A one-parameter model whose training loss is NaN at batch `nan_at` only (its gradient stays finite)."""

    def __init__(self, nan_at: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.nan_at = nan_at

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = (self.w * batch).pow(2).mean()
        return loss + float("nan") if batch_idx == self.nan_at else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordFlag(L.Callback):
    def __init__(self) -> None:
        self.flags: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.flags.append(trainer.callback_metrics["degenerate"].item())


@pytest.mark.parametrize("stop_training", [False, True])
def test_nonfinite_loss_is_flagged_and_can_stop_training(stop_training: bool) -> None:
    detector, record = DegenerationDetector("unused.jsonl", stop_training=stop_training), RecordFlag()
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[detector, record])
    trainer.fit(NaNAtStep(nan_at=2), train_dataloaders=DataLoader(torch.ones(8, 1), batch_size=1))
    assert detector.reasons == ["nonfinite_loss"] and detector.degenerate
    assert record.flags == ([0.0, 0.0, 1.0] if stop_training else [0.0, 0.0, 1.0, 1.0, 1.0])  # sticky: 3, 4 finite
    assert trainer.global_step == (3 if stop_training else 5)
    assert trainer.callback_metrics["degenerate/nonfinite_loss"].item() == 1.0
    assert detector.state_dict() == {"reasons": ["nonfinite_loss"]}


# --------------------------------------------------------------------- tiny DPO runs


def dpo_fit(assets: Path, tmp_path: Path, lr: float, detector: DegenerationDetector, max_epochs: int = 2):
    """SGD DPO at a constant `lr`, 5 steps per epoch, then a validation (one batch + the detector's generations)."""
    L.seed_everything(0, verbose=False)
    dm = PreferenceDataModule(str(assets / "data" / "prefs"), str(assets / "model"), batch_size=4)
    module = DPOModule(str(assets / "model"), optimizer=functools.partial(torch.optim.SGD, lr=lr),
                       lr_scheduler=ConstantWithWarmup)
    trainer = L.Trainer(max_epochs=max_epochs, limit_train_batches=5, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[detector, MetricsJSON(str(tmp_path / "metrics.json"))])
    trainer.fit(module, datamodule=dm)
    return trainer, json.loads((tmp_path / "metrics.json").read_text())


@pytest.fixture
def count_generations(monkeypatch) -> list[int]:
    """Counts the detector's generation calls (sanity-check validation must make none)."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    generate = heldout_generation.generate_with_datamodule
    monkeypatch.setattr(heldout_generation, "generate_with_datamodule", counted)
    return calls


def test_huge_learning_rate_degenerates_and_stops(assets: Path, tmp_path: Path, count_generations) -> None:
    prompts = str(assets / "data" / "prompts" / "test.jsonl")
    detector = DegenerationDetector(prompts, num_prompts=8, max_new_tokens=32, stop_training=True)
    trainer, metrics = dpo_fit(assets, tmp_path, lr=10.0, detector=detector)
    # What this seeded run produces after 5 steps: greedy loops of one number, "8 8 8 8 ...", to the budget.
    assert sum(repeated_ngram_fraction(r) > 0.5 for r in detector.responses) > 4, detector.responses
    assert detector.reasons == ["repetition", "runaway_length"]
    assert trainer.global_step == 5 and trainer.should_stop  # stopped after the first epoch of two
    assert len(count_generations) == 1  # none during the sanity check
    assert metrics["degenerate"] == 1.0
    assert metrics["degenerate/repetition"] == 1.0 and metrics["degenerate/runaway_length"] == 1.0
    assert metrics["val/degeneration/repeat_fraction"] > 0.5
    assert metrics["val/degeneration/length_fraction"] > 0.5


def test_small_learning_rate_is_not_flagged(assets: Path, tmp_path: Path, count_generations) -> None:
    prompts = str(assets / "data" / "prompts" / "test.jsonl")
    detector = DegenerationDetector(prompts, num_prompts=8, max_new_tokens=32, stop_training=True)
    trainer, metrics = dpo_fit(assets, tmp_path, lr=1e-3, detector=detector)
    assert detector.reasons == [] and not detector.degenerate
    assert trainer.global_step == 10 and len(count_generations) == 2  # both epochs, no sanity-check generation
    assert metrics["degenerate"] == 0.0 and not any(k.startswith("degenerate/") for k in metrics)
    assert metrics["val/degeneration/length_fraction"] == 0.0


def test_repetitive_generations_are_flagged(assets: Path, tmp_path: Path, monkeypatch) -> None:
    """The tiny model does not loop in words, so the repetition path is driven by crafted generations."""
    looping = lambda trainer, model, prompts, **kwargs: ["yes yes yes yes yes yes yes"] * len(prompts)  # noqa: E731
    monkeypatch.setattr(heldout_generation, "generate_with_datamodule", looping)
    detector = DegenerationDetector(str(assets / "data" / "prompts" / "test.jsonl"), num_prompts=4)
    _, metrics = dpo_fit(assets, tmp_path, lr=1e-3, detector=detector, max_epochs=1)
    assert detector.reasons == ["repetition"]  # 7 words, 4 four-grams, 1 unique: 3/4 repeat
    assert metrics["val/degeneration/repeat_fraction"] == pytest.approx(0.75)
    assert metrics["degenerate"] == 1.0 and metrics["degenerate/repetition"] == 1.0
