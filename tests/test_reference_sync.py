"""Tests for `callbacks.ReferenceSync` (TR-DPO): the update rule ref ← α·θ + (1 − α)·ref (soft) or θ (hard),
checked in float64 against copies taken before each sync; when it fires in a real fit; what it refuses."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import get_args

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import ReferenceSync
from callbacks.reference_sync import sync_reference
from datamodules import PreferenceDataModule
from lightning_modules.dpo import DPOModule
from datamodules.utils.errors import UserInputError
from lightning_modules.models.loading import load_causal_lm
from lightning_modules.references.providers import ReferenceMode

pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")  # the frozen reference


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer (non-persistent ones too), by name."""
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def perturb(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def expected(theta: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    return {n: (alpha * theta[n].double() + (1 - alpha) * ref[n].double()).to(ref[n].dtype) for n in ref}


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-8, msg=name)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def assert_frozen(reference: nn.Module) -> None:
    assert not any(m.training for m in reference.modules())
    assert not any(p.requires_grad for p in reference.parameters())


@pytest.fixture
def module(assets: Path) -> DPOModule:
    """A DPO module whose policy and live reference differ (both perturbed, differently)."""
    m = DPOModule(str(assets / "model"))
    m.configure_model()
    perturb(m.policy, seed=0)
    perturb(m.reference.model, seed=1)
    return m


# --------------------------------------------------------------------- the update rule


@pytest.mark.parametrize(("mode", "alpha"), [("soft", 0.6), ("soft", 0.25), ("hard", 0.6)])
def test_update_matches_formula(module: DPOModule, mode: str, alpha: float) -> None:
    theta, ref = tensors(module.policy), tensors(module.reference.model)
    sync_reference(module.reference.model, module.policy, alpha, mode)
    if mode == "hard":
        assert same(tensors(module.reference.model), theta)
    else:
        assert_matches(tensors(module.reference.model), expected(theta, ref, alpha))
        assert not same(tensors(module.reference.model), theta) and not same(tensors(module.reference.model), ref)
    assert same(tensors(module.policy), theta)  # the policy is untouched
    assert_frozen(module.reference)


def test_alpha_zero_leaves_reference_unchanged_and_alpha_one_copies(module: DPOModule) -> None:
    theta, ref = tensors(module.policy), tensors(module.reference.model)
    sync_reference(module.reference.model, module.policy, 0.0, "soft")
    assert same(tensors(module.reference.model), ref)
    sync_reference(module.reference.model, module.policy, 1.0, "soft")
    assert same(tensors(module.reference.model), theta)


class WithBuffers(nn.Module):
    def __init__(self, weight: float, scale: float, count: int):
        super().__init__()
        self.weight = nn.Parameter(torch.full((2,), weight))
        self.register_buffer("scale", torch.full((2,), scale))
        self.register_buffer("count", torch.tensor([count]))


def test_float_buffers_are_averaged_and_integer_buffers_copied() -> None:
    ref, policy = WithBuffers(0.0, 2.0, 3).requires_grad_(False), WithBuffers(1.0, 4.0, 7)
    sync_reference(ref, policy, 0.25, "soft")
    assert torch.equal(ref.weight, torch.full((2,), 0.25))  # 0.25·1 + 0.75·0
    assert torch.equal(ref.scale, torch.full((2,), 2.5))  # 0.25·4 + 0.75·2
    assert torch.equal(ref.count, torch.tensor([7]))  # integers cannot be averaged: copied
    assert_frozen(ref)


# --------------------------------------------------------------------- what it refuses


@pytest.mark.parametrize("mode", [m for m in get_args(ReferenceMode) if m != "live"])  # none, precomputed, ...
def test_non_live_reference_is_refused(assets: Path, mode: str) -> None:
    m = DPOModule(str(assets / "model"), reference=mode)
    m.configure_model()
    with pytest.raises(UserInputError, match=rf"needs a live reference model .* reference is '{mode}'"):
        ReferenceSync(every_n_steps=2).on_fit_start(None, m)


def test_different_architecture_is_refused() -> None:
    ref = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    with pytest.raises(UserInputError, match=r"different shape or dtype: \['0.bias', '0.weight', '1.weight'\]"):
        sync_reference(ref, nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 2)), 0.5)
    with pytest.raises(UserInputError, match=r"only in the policy: \['2.bias', '2.weight'\]"):
        sync_reference(ref, nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2), nn.Linear(2, 2)), 0.5)
    with pytest.raises(UserInputError, match=r"different shape or dtype: \['0.bias', '0.weight'"):
        sync_reference(ref, nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)).double(), 0.5)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"every_n_steps": 0}, r"every_n_steps must be >= 1, got 0"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
    ({"mode": "ema"}, r"mode must be 'soft' or 'hard', got 'ema'"),
])
def test_bad_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(UserInputError, match=pattern):
        ReferenceSync(**kwargs)


# --------------------------------------------------------------------- when it fires, in a real fit


class Snapshots(L.Callback):
    """After each training batch (and after ReferenceSync, listed before it): global step, θ and ref."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append((trainer.global_step, tensors(pl_module.policy), tensors(pl_module.reference.model)))


def fit(assets: Path, sync: ReferenceSync, max_steps: int, ckpt_path: str | None = None, **trainer_kwargs):
    L.seed_everything(0, verbose=False)
    dm = PreferenceDataModule(str(assets / "data" / "prefs"), str(assets / "model"), batch_size=4, val_split=None)
    module = DPOModule(str(assets / "model"), optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    snapshots = Snapshots()
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[sync, snapshots], **trainer_kwargs)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, module, snapshots.rows


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_syncs_exactly_at_steps_n_and_2n_and_survive_resume(assets: Path, tmp_path: Path) -> None:
    alpha = 0.6
    sync = ReferenceSync(every_n_steps=2, alpha=alpha)
    trainer, module, rows = fit(assets, sync, max_steps=5)
    assert [step for step, _, _ in rows] == [1, 2, 3, 4, 5]
    (_, theta1, ref1), (_, theta2, ref2), (_, _, ref3), (_, theta4, ref4), (_, _, ref5) = rows
    initial = tensors(load_causal_lm(str(assets / "model")))
    assert same(ref1, initial) and not same(theta1, initial)  # step 1: not synced, though the policy moved
    assert_matches(ref2, expected(theta2, ref1, alpha))  # step 2: synced from the initial reference
    assert same(ref3, ref2)  # step 3: unchanged
    assert_matches(ref4, expected(theta4, ref3, alpha))  # step 4: synced again
    assert same(ref5, ref4)  # step 5: unchanged
    assert sync.syncs == 2 and sync.last_synced_step == 4
    assert trainer.callback_metrics["train/reference_syncs"].item() == 2.0
    assert_frozen(module.reference)

    # Resume from step 5: the synced reference (not the initial policy) comes back, and step 6 syncs from it.
    trainer.save_checkpoint(path := tmp_path / "step5.ckpt")
    resumed = ReferenceSync(every_n_steps=2, alpha=alpha)
    _, module6, rows6 = fit(assets, resumed, max_steps=6, ckpt_path=str(path))
    assert [step for step, _, _ in rows6] == [6]
    assert_matches(rows6[0][2], expected(rows6[0][1], ref5, alpha))
    assert resumed.syncs == 3 and resumed.last_synced_step == 6
    assert_frozen(module6.reference)


def test_gradient_accumulation_counts_optimizer_steps(assets: Path) -> None:
    sync = ReferenceSync(every_n_steps=2, alpha=0.5)
    _, _, rows = fit(assets, sync, max_steps=3, accumulate_grad_batches=2)
    assert [step for step, _, _ in rows] == [0, 1, 1, 2, 2, 3]  # global step after each micro-batch
    changed = [not same(a[2], b[2]) for a, b in zip(rows, rows[1:])]
    assert changed == [False, False, True, False, False]  # only when the step count reaches 2, once
    assert sync.syncs == 1
