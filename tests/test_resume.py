"""Stop-and-resume is exact: every module and stateful helper, through `resume_helper.assert_resumes_exactly`.

The tiny policy gets attention dropout 0.1 here, so a resume that did not restore the RNG states
would draw different dropout masks and fail.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from callbacks import ReferenceSync
from datamodules import PreferenceDataModule, SFTDataModule
from lightning_modules.dpo import DPOModule
from lightning_modules.sft import SFTModule
from resume_helper import assert_resumes_exactly

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)


def with_dropout(module_class, assets: Path, **kwargs):
    """A factory of modules whose policy uses attention dropout 0.1 (the tiny model's default is 0)."""

    class Dropout(module_class):
        def configure_model(self) -> None:
            super().configure_model()
            for layer in self.policy.modules():
                if hasattr(layer, "attention_dropout"):
                    layer.attention_dropout = 0.1

    return lambda: Dropout(str(assets / "model"), optimizer=ADAMW, **kwargs)


def data(data_class, assets: Path, folder: str, **kwargs):
    return lambda: data_class(str(assets / folder), str(assets / "model"), max_length=64, batch_size=32,
                              val_split=None, **kwargs)


# 256 rows / 32 per batch = 8 steps per epoch: the checkpoint at step 6 is mid-epoch 0, the one at 10 mid-epoch 1.
@pytest.mark.parametrize("steps, every", [(12, 6), (12, 10)], ids=["mid-epoch-0", "mid-epoch-1"])
def test_sft_resumes_exactly(assets: Path, tmp_path: Path, steps: int, every: int) -> None:
    assert_resumes_exactly(with_dropout(SFTModule, assets),
                           data(SFTDataModule, assets, "data/sft"), tmp_path, steps=steps, every=every)


def test_dpo_resumes_exactly(assets: Path, tmp_path: Path) -> None:
    assert_resumes_exactly(with_dropout(DPOModule, assets, beta=0.1),
                           data(PreferenceDataModule, assets, "data/prefs"), tmp_path, steps=12, every=6)


def test_dpo_with_length_grouping_and_reference_sync_resumes_exactly(assets: Path, tmp_path: Path) -> None:
    """A stateful callback (the synced reference) and the length-grouped sampler keep the contract."""
    assert_resumes_exactly(with_dropout(DPOModule, assets, beta=0.1),
                           data(PreferenceDataModule, assets, "data/prefs", group_by_length=True), tmp_path,
                           steps=10, every=5, make_callbacks=lambda: [ReferenceSync(every_n_steps=4, alpha=0.5)])


def test_bandit_resumes_exactly(tmp_path: Path) -> None:
    """The bandit's round (reuse 4: step 6 is mid-round), sampling generators and query count (more: test_bandit.py)."""
    from datamodules.bandit import BanditDataModule
    from lightning_modules.bandit import BanditModule

    assert_resumes_exactly(lambda: BanditModule(mode="on_policy", reuse=4, num_samples=4, prefit_steps=5),
                           lambda: BanditDataModule(n_contexts=8), tmp_path, steps=12, every=6)
