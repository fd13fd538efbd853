"""Tests for the LightningModules (`DPOModule`, `SFTModule`) and the LR schedule in `optim`.

Every loss is compared with an independent computation: per-sequence log-probs come from a naive
per-token loop over separate chosen / rejected forwards of the tiny Llama (`assets` fixture), the
SFT loss from Hugging Face's own `model(..., labels=...).loss`.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import PreferenceDataModule, SFTDataModule
from lightning_modules.dpo import DPOModule
from datamodules.utils.errors import UserInputError
from lightning_modules.objectives import MDPO, OBJECTIVES
from lightning_modules.optim import LinearWarmupDecay, linear_warmup_decay
from lightning_modules.references.providers import LiveReference
from lightning_modules.objectives import reduce_nll
from lightning_modules.sft import SFTModule

LN2 = math.log(2.0)
BETA = 0.1


# --------------------------------------------------------------------- helpers and fixtures


def naive_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and counts by an explicit loop: logits[b, t] scores labels[b, t + 1]."""
    sums, counts = [], []
    for b in range(logits.shape[0]):
        lp = torch.log_softmax(logits[b, :-1].double(), dim=-1)
        picked = [lp[t, int(y)] for t, y in enumerate(labels[b, 1:].tolist()) if y != -100]
        sums.append(float(sum(picked)) if picked else 0.0)
        counts.append(len(picked))
    return torch.tensor(sums), torch.tensor(counts)


def policy_logps(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chosen and rejected halves run separately (no concatenation), naive log-probs."""
    out = {}
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            logits = model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]).logits
            out[side], out[f"{side}_counts"] = naive_logps(logits, batch[f"{side}_labels"])
    return out


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def make_dpo(assets: Path, **kwargs) -> DPOModule:
    module = DPOModule(model_name_or_path=str(assets / "model"), **kwargs)
    module.configure_model()
    return module


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def pref_datamodule(assets: Path) -> PreferenceDataModule:
    dm = PreferenceDataModule(str(assets / "data" / "prefs"), str(assets / "model"), batch_size=4, val_split=None)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def batch(pref_datamodule) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return next(iter(pref_datamodule.train_dataloader()))


# --------------------------------------------------------------------- DPOModule: losses


def test_step0_live_reference_gives_ln2_and_zero_rewards(assets: Path, batch) -> None:
    module = make_dpo(assets)
    assert isinstance(module.reference, LiveReference)
    assert module.reference.model is not module.policy
    loss, metrics = module.model_step(batch, "train")
    assert loss.item() == pytest.approx(LN2, abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name].item() == pytest.approx(0.0, abs=1e-7), name
    want = policy_logps(module.policy, batch)
    assert metrics["logps/chosen"].item() == pytest.approx(want["chosen"].mean().item(), abs=1e-4)
    assert metrics["logps/rejected"].item() == pytest.approx(want["rejected"].mean().item(), abs=1e-4)
    assert module.reference.forward_calls == 1


def test_live_loss_after_perturbation_matches_hand_dpo(assets: Path, batch) -> None:
    module = make_dpo(assets)
    ref = policy_logps(module.policy, batch)  # the reference is the initial policy
    perturb(module.policy)
    pol = policy_logps(module.policy, batch)
    loss, metrics = module.model_step(batch, "train")
    h = (pol["chosen"] - pol["rejected"]) - (ref["chosen"] - ref["rejected"])
    want = -F.logsigmoid(BETA * h).mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert abs(loss.item() - LN2) > 1e-3  # the perturbation really moved the policy
    margins = BETA * ((pol["chosen"] - ref["chosen"]) - (pol["rejected"] - ref["rejected"]))
    assert metrics["rewards/margins"].item() == pytest.approx(margins.mean().item(), abs=1e-5)
    assert metrics["rewards/accuracies"].item() == pytest.approx((margins > 0).float().mean().item())


def test_precomputed_reference_equals_live(assets: Path, batch) -> None:
    live = make_dpo(assets)
    perturb(live.policy)
    precomputed = make_dpo(assets, reference="precomputed")
    precomputed.policy.load_state_dict(live.policy.state_dict())
    ref_chosen, ref_rejected = live.reference(batch)
    with_columns = {**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    live_loss, live_metrics = live.model_step(batch, "train")
    pre_loss, pre_metrics = precomputed.model_step(with_columns, "train")
    assert abs(live_loss.item() - LN2) > 1e-3
    assert pre_loss.item() == pytest.approx(live_loss.item(), abs=1e-6)
    for name, value in live_metrics.items():
        assert pre_metrics[name].item() == pytest.approx(value.item(), abs=1e-6), name
    with pytest.raises(UserInputError, match=r"needs batch columns \['ref_chosen_logps', 'ref_rejected_logps'\]"):
        precomputed.model_step(batch, "train")


def test_reference_free_equals_sigmoid_with_zero_reference(assets: Path, batch) -> None:
    module = make_dpo(assets, reference="none")
    assert not any(k.startswith("reference.") for k in module.state_dict())  # no second model
    pol = policy_logps(module.policy, batch)
    loss, metrics = module.model_step(batch, "train")
    zeros = torch.zeros_like(pol["chosen"])
    out = OBJECTIVES["sigmoid"](pol["chosen"], pol["rejected"], zeros, zeros, beta=BETA)
    assert loss.item() == pytest.approx(out.losses.mean().item(), abs=1e-5)
    by_hand = -F.logsigmoid(BETA * (pol["chosen"] - pol["rejected"])).mean()
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)
    assert metrics["rewards/chosen"].item() == pytest.approx(BETA * pol["chosen"].mean().item(), abs=1e-5)
    assert abs(loss.item() - LN2) > 1e-3  # summed log-probs of ~10 tokens: far from a tie


def test_sft_weight_adds_mean_per_token_chosen_nll(assets: Path, batch) -> None:
    base = make_dpo(assets)
    weighted = make_dpo(assets, sft_weight=0.5)
    base_loss, _ = base.model_step(batch, "train")
    loss, metrics = weighted.model_step(batch, "train")
    pol = policy_logps(weighted.policy, batch)
    per_token_nll = (-pol["chosen"] / pol["chosen_counts"]).mean()
    assert (pol["chosen_counts"] > 1).all()
    assert loss.item() - base_loss.item() == pytest.approx(0.5 * per_token_nll.item(), abs=1e-5)
    assert metrics["sft_nll"].item() == pytest.approx(per_token_nll.item(), abs=1e-5)


def test_sft_weight_with_average_logps_is_not_divided_twice(assets: Path, batch) -> None:
    module = make_dpo(assets, sft_weight=1.0, average_logps=True)
    pol = policy_logps(module.policy, batch)
    per_token_nll = (-pol["chosen"] / pol["chosen_counts"]).mean()
    loss, metrics = module.model_step(batch, "train")
    assert metrics["sft_nll"].item() == pytest.approx(per_token_nll.item(), abs=1e-5)
    assert loss.item() == pytest.approx(LN2 + per_token_nll.item(), abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"objective": "dpo"}, r"model\.objective='dpo' is not an objective; use one of Sigmoid, CDPO, IPO"),
        ({"objective": MDPO()}, r"takes K references: use model\.class_path=lightning_modules\.multiref\.MultiReferenceModule"),
        ({"beta": 0.0}, r"model\.beta must be > 0, got 0\.0"),
        ({"beta": -0.1}, r"model\.beta must be > 0"),
        ({"reference": "frozen"}, r"model\.reference='frozen' is not one of \['live', 'precomputed', 'cached', 'none'\]"),
    ],
)
def test_bad_config_raises_user_input_error(kwargs, pattern) -> None:
    with pytest.raises(UserInputError, match=pattern):
        DPOModule(model_name_or_path="unused", **kwargs)  # fails before any model is loaded


# --------------------------------------------------------------------- DPOModule: the reference


def test_optimizer_step_leaves_reference_frozen_and_in_eval(assets: Path, batch) -> None:
    module = make_dpo(assets)
    ref_before, policy_before = params(module.reference), params(module.policy)
    assert all(not p.requires_grad for p in module.reference.parameters())
    optimizer = torch.optim.SGD(module.policy.parameters(), lr=0.1)
    module.train()
    loss, _ = module.model_step(batch, "train")
    loss.backward()
    assert all(p.grad is None for p in module.reference.parameters())
    optimizer.step()
    assert same_params(params(module.reference), ref_before)
    assert not same_params(params(module.policy), policy_before)
    assert module.policy.training
    assert not any(m.training for m in module.reference.modules())
    module.train(True)  # what the trainer does at the start of every epoch
    assert module.training and module.policy.training
    assert not any(m.training for m in module.reference.modules())
    # After the step the policy has moved away from the reference: no longer a tie.
    new_loss, _ = module.model_step(batch, "train")
    assert new_loss.item() < LN2 - 1e-4


def test_checkpoint_drops_reference_and_policy_only_state_loads_strict(assets: Path) -> None:
    trained = make_dpo(assets)
    perturb(trained.policy)
    checkpoint = {"state_dict": trained.state_dict()}
    assert any(k.startswith("reference.") for k in checkpoint["state_dict"])
    trained.on_save_checkpoint(checkpoint)
    state = checkpoint["state_dict"]
    assert not any(k.startswith("reference.") for k in state)
    assert set(state) == {f"policy.{k}" for k in trained.policy.state_dict()}

    fresh = make_dpo(assets)
    initial_ref = params(fresh.reference)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert same_params(params(fresh.policy), params(trained.policy))
    assert same_params(params(fresh.reference), initial_ref)  # reference rebuilt from its source
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**state, "policy.bogus": torch.zeros(1)}, strict=True)


# --------------------------------------------------------------------- SFTModule


@pytest.fixture(scope="module")
def sft_batch(assets: Path) -> dict[str, torch.Tensor]:
    dm = SFTDataModule(str(assets / "data" / "sft"), str(assets / "model"), val_split=None)
    dm.setup("fit")
    rows = dm.data["train"][:6]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # padding present
    return dm.collator()(rows)


def test_sft_token_mean_equals_hf_loss(assets: Path, sft_batch) -> None:
    module = SFTModule(model_name_or_path=str(assets / "model"))
    module.configure_model()
    loss, metrics = module.model_step(sft_batch, "train")
    with torch.no_grad():
        hf = module.policy(input_ids=sft_batch["input_ids"], attention_mask=sft_batch["attention_mask"],
                           labels=sft_batch["labels"]).loss
    assert loss.item() == pytest.approx(hf.item(), abs=1e-5)
    assert metrics["nll_per_token"].item() == pytest.approx(hf.item(), abs=1e-5)
    assert metrics["ppl"].item() == pytest.approx(math.exp(hf.item()), rel=1e-5)


def test_sft_sequence_reductions_equal_per_row_hf_losses(assets: Path, sft_batch) -> None:
    per_row, counts = [], []
    for reduction in ("sequence_mean", "sum"):
        module = SFTModule(model_name_or_path=str(assets / "model"), reduction=reduction)
        module.configure_model()
        if not per_row:
            with torch.no_grad():
                for i in range(sft_batch["input_ids"].shape[0]):
                    n = int(sft_batch["attention_mask"][i].sum())
                    ids, labels = sft_batch["input_ids"][i : i + 1, :n], sft_batch["labels"][i : i + 1, :n]
                    per_row.append(module.policy(input_ids=ids, labels=labels).loss.item())  # token mean of row i
                    counts.append(int((labels[0, 1:] != -100).sum()))
        loss, _ = module.model_step(sft_batch, "train")
        if reduction == "sequence_mean":
            want = sum(per_row) / len(per_row)
        else:
            want = sum(l * n for l, n in zip(per_row, counts)) / len(per_row)
        assert loss.item() == pytest.approx(want, abs=1e-5), reduction


def test_reduce_nll_reductions_by_hand() -> None:
    logps, counts = torch.tensor([-6.0, -3.0]), torch.tensor([3, 1])
    assert reduce_nll(logps, counts, "token_mean").item() == pytest.approx(9.0 / 4.0)  # Σ nll / Σ tokens
    assert reduce_nll(logps, counts, "sequence_mean").item() == pytest.approx((6.0 / 3 + 3.0 / 1) / 2)  # 2.5
    assert reduce_nll(logps, counts, "sum").item() == pytest.approx((6.0 + 3.0) / 2)  # 4.5
    # Equal lengths: token_mean == sequence_mean == sum / length.
    same = torch.tensor([2, 2])
    assert reduce_nll(logps, same, "token_mean").item() == pytest.approx(reduce_nll(logps, same, "sequence_mean").item())
    assert reduce_nll(logps, same, "sum").item() == pytest.approx(2 * reduce_nll(logps, same, "token_mean").item())


# --------------------------------------------------------------------- LR schedule


def test_linear_warmup_decay_hand_values() -> None:
    curve = functools.partial(linear_warmup_decay, warmup_steps=2, total_steps=10)
    # warmup: (step + 1) / 2; decay: 1 - (step - 2) / 8; clamped after total_steps
    assert [curve(s) for s in (0, 1, 2, 4, 6, 9, 10, 12)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.125, 0.0, 0.0])
    assert linear_warmup_decay(6, warmup_steps=2, total_steps=10, final_ratio=0.1) == pytest.approx(1 - 0.9 * 0.5)
    assert linear_warmup_decay(10, warmup_steps=2, total_steps=10, final_ratio=0.1) == pytest.approx(0.1)
    assert linear_warmup_decay(0, warmup_steps=0, total_steps=4) == pytest.approx(1.0)
    assert linear_warmup_decay(2, warmup_steps=0, total_steps=4) == pytest.approx(0.5)


def test_linear_warmup_decay_scheduler_drives_lr() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    scheduler = LinearWarmupDecay(optimizer, total_steps=10, warmup_ratio=0.2)  # 2 warmup steps
    seen = []
    for _ in range(11):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.2 * m for m in (0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0)])


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_warmup_ratio_out_of_range_raises(ratio: float) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"lr_scheduler\.warmup_ratio must be in \[0, 1\)"):
        LinearWarmupDecay(optimizer, total_steps=10, warmup_ratio=ratio)


# --------------------------------------------------------------------- end to end


class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")  # the frozen reference, by design
def test_fit_dpo_end_to_end(assets: Path, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    dm = PreferenceDataModule(str(assets / "data" / "prefs"), str(assets / "model"), batch_size=4)
    module = DPOModule(str(assets / "model"), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    module.configure_model()  # idempotent: fit calls it again and keeps these models
    policy_before, ref_before = params(module.policy), params(module.reference)
    record = RecordLosses()
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[record])
    trainer.fit(module, datamodule=dm)

    assert trainer.global_step == 4 and len(record.losses) == 4
    assert record.losses[0] == pytest.approx(LN2, abs=1e-6)  # policy == reference at step 0
    assert all(abs(x - LN2) > 1e-5 for x in record.losses[1:])  # and not afterwards
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(record.losses[-1], abs=1e-6)
    assert not same_params(params(module.policy), policy_before)
    assert same_params(params(module.reference), ref_before)
    assert not any(m.training for m in module.reference.modules())

    # The optimizer holds exactly the policy's parameters, never the reference's.
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.policy.parameters()}
    assert optimized.isdisjoint({id(p) for p in module.reference.parameters()})

    # Checkpoint round trip through Lightning: policy only on disk, strict load rebuilds the reference.
    path = tmp_path / "dpo.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert saved and not any(k.startswith("reference.") for k in saved)
    restored = DPOModule.load_from_checkpoint(path, model_name_or_path=str(assets / "model"), strict=True)
    assert same_params(params(restored.policy), params(module.policy))
    assert same_params(params(restored.reference), ref_before)


@pytest.mark.slow
def test_torch_compile_switch_trains_like_eager(assets: Path, batch) -> None:
    """model.torch_compile compiles the policy in place: the same loss and gradients as eager, the same parameter
    names (checkpoints and exports unchanged), and the live reference (a copy made after compiling) still scores."""
    results = {}
    for compiled in (False, True):
        module = DPOModule(str(assets / "model"), torch_compile=compiled)
        module.configure_model()
        with torch.no_grad():  # move the policy off the reference, so the loss is not ln 2 by construction
            for p in module.policy.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        loss, _ = module.model_step(batch, "train")
        loss.backward()
        results[compiled] = (loss.detach(), {n: p.grad for n, p in module.policy.named_parameters()})
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results[False], results[True]
    assert abs(eager_loss.item() - LN2) > 1e-4
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
