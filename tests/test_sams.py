"""SamS (SPEC section 6): rewards against hand-computed values, the pool bound, contexts, exact-k selection with
gradients only from the selected pairs, the scheduler's state round trip, resume, and composition.

The networks and selection run on the session's tiny synthetic-task model (4 layers); the DDP test is slow.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import PreferenceDataModule
from datamodules.utils.errors import UserInputError
from lightning_modules.dpo import DPOModule
from lightning_modules.logprobs import concatenated_forward
from lightning_modules.sams import ReplayPool, SamS, SchedulerNetworks
from lightning_modules.logprobs import pool_layers
from lightning_modules.sams.context import pair_contexts
from lightning_modules.sams.rewards import (batch_reward, minmax, relative_decrease, sample_reward,
                                            scheduler_target)
from resume_helper import assert_resumes_exactly

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)
sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def make_dm(assets: Path, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"),
                                **{"batch_size": 4, "eval_batch_size": 4, "max_length": 64, "shuffle": False, **kwargs})


def fit(module: L.LightningModule, dm: PreferenceDataModule, steps: int = 3, logger=False) -> list[dict]:
    """Each step's loss and logged metrics."""
    logged = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append({"loss": float(outputs["loss"]),
                           **{k: float(v) for k, v in trainer.callback_metrics.items()}})

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[Record()], log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    return logged


# ---- the reward: hand-computed values and the sign ----------------------------------------------------------


def test_batch_reward_worked_example_and_sign() -> None:
    assert relative_decrease(0.70, 0.63) == pytest.approx(0.1)
    assert batch_reward(0.70, 0.63, kappa=50) == pytest.approx(sigmoid(5.5))
    neutral = sigmoid(0.5)
    assert batch_reward(0.7, 0.6) > neutral > batch_reward(0.6, 0.7)  # a decrease is rewarded, an increase is not
    # negative losses (the case whose signed maximum flipped the original's sign): -1 → -2 is a decrease
    assert relative_decrease(-1.0, -2.0) == pytest.approx(0.5)
    assert batch_reward(-1.0, -2.0, kappa=1) == pytest.approx(sigmoid(1.0))
    assert batch_reward(0.0, 0.0) == pytest.approx(neutral)


def test_sample_reward_and_target_by_hand() -> None:
    margins, chosen = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([-3.0, -1.0, -2.0])
    # g(margin) = [0, .5, 1]; g(chosen) = [0, 1, .5]; r_S = σ(½·g(m) + ½·(1 − g(c))) = σ([.5, .25, .75])
    expected = torch.tensor([sigmoid(0.5), sigmoid(0.25), sigmoid(0.75)])
    torch.testing.assert_close(sample_reward(margins, chosen), expected)
    torch.testing.assert_close(minmax(torch.tensor([2.0, 2.0])), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(scheduler_target(0.9, torch.tensor([0.5, 0.7]), gamma=0.25),
                               torch.tensor([0.25 * 0.9 + 0.75 * 0.5, 0.25 * 0.9 + 0.75 * 0.7]))


# ---- the pool, the context, the networks ----------------------------------------------------------------


def test_pool_keeps_at_most_max_pairs_oldest_out_first() -> None:
    pool = ReplayPool(max_pairs=7)
    batches = [(torch.full((3, 2, 4), float(i)), torch.full((3,), float(i))) for i in range(4)]
    for contexts, targets in batches:
        pool.add(contexts, targets)
        assert pool.num_pairs <= 7
    assert [float(t[0]) for _, t in pool.batches] == [2.0, 3.0]  # 2 batches of 3: a third would make 9
    pool.add(torch.arange(10.0).view(10, 1, 1).expand(10, 2, 4), torch.arange(10.0))  # one batch larger than the bound
    assert pool.num_pairs == 7 and [t.tolist() for _, t in pool.batches] == [list(map(float, range(3, 10)))]
    generator = torch.Generator().manual_seed(0)
    assert len(pool.sample(5, generator)) == 1
    restored = ReplayPool()
    restored.load_state_dict(pool.state_dict())
    assert restored.max_pairs == 7 and torch.equal(restored.batches[0][1], pool.batches[0][1])


def test_pool_samples_distinct_batches_reproducibly() -> None:
    pool = ReplayPool(max_pairs=100)
    for i in range(10):
        pool.add(torch.zeros(2, 1, 1), torch.full((2,), float(i)))
    picks = [float(t[0]) for _, t in pool.sample(4, torch.Generator().manual_seed(3))]
    assert len(set(picks)) == 4
    assert picks == [float(t[0]) for _, t in pool.sample(4, torch.Generator().manual_seed(3))]


def test_context_pools_non_pad_tokens_per_layer_and_averages_the_pair() -> None:
    """The module docstring's worked example: chosen [1, 3, (9 pad)] → 2, rejected [4, 4, 4] → 4, context 3."""
    embeddings = torch.zeros(2, 3, 1)
    layer = torch.tensor([[1.0, 3.0, 9.0], [4.0, 4.0, 4.0]]).unsqueeze(-1)  # (2 rows, T=3, D=1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = pool_layers((embeddings, layer), mask)
    torch.testing.assert_close(pooled, torch.tensor([[[2.0]], [[4.0]]]))
    torch.testing.assert_close(pair_contexts(pooled), torch.tensor([[[3.0]]]))


def test_networks_are_small_and_f2_never_trains_f1() -> None:
    networks = SchedulerNetworks(num_layers=4, hidden_size=64)
    f1, f2 = networks(torch.randn(5, 4, 64))
    assert f1.shape == f2.shape == (5,)
    f2.sum().backward()
    f1_params = [p for name, p in networks.named_parameters() if not name.startswith("f2_head")]
    assert all(p.grad is None for p in f1_params)  # f2 reads f1's activations detached
    assert sum(p.numel() for p in networks.parameters()) < 300_000


# ---- selection in the module: exactly k, and only they get gradient ------------------------------------------


@pytest.fixture(scope="module")
def batch(assets: Path) -> dict:
    dm = make_dm(assets, batch_size=6)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("selection, ratio", [("topk", 0.5), ("softmax", 0.5), ("random", 0.34), ("topk", 1.0)])
def test_exactly_k_pairs_selected_and_only_they_get_gradient(assets: Path, batch, selection, ratio) -> None:
    """The policy's gradient with the scheduler equals the gradient of the plain DPO loss averaged over the
    selected pairs only (computed separately on those rows)."""
    torch.manual_seed(0)
    module = DPOModule(str(assets / "model"), sample_scheduler=SamS(ratio=ratio, selection=selection))
    module.configure_model()
    loss, metrics = module.model_step(batch, "train")
    mask = module.last_selection.mask
    k = math.ceil(ratio * 6)
    assert int(mask.sum()) == k and metrics["sams/selected_fraction"] == pytest.approx(k / 6)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters()}

    plain = DPOModule(str(assets / "model"))
    plain.configure_model()
    rows = mask.nonzero().flatten()
    selected_batch = {key: value[rows] for key, value in batch.items() if torch.is_tensor(value)}
    manual, _ = plain.model_step(selected_batch, "train")
    manual.backward()
    torch.testing.assert_close(loss, manual, atol=1e-6, rtol=1e-5)
    for name, p in plain.policy.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_unselected_pairs_get_no_gradient(assets: Path, batch) -> None:
    """d loss / d (each pair's log-probs) is 0 for the unselected pairs and 1/k for the selected ones."""
    module = DPOModule(str(assets / "model"), sample_scheduler=SamS(ratio=0.5))
    module.configure_model()
    policy = concatenated_forward(module.policy, batch, output_hidden_states=True)
    chosen = policy.chosen_logps.detach().requires_grad_()
    rejected = policy.rejected_logps.detach()
    ref_chosen, ref_rejected = module.reference(batch)
    out = module.objective(chosen, rejected, ref_chosen, ref_rejected, beta=module.beta)
    weights, _ = module.pair_weights(policy, batch, out)
    (out.losses * weights).sum().backward()
    mask = module.last_selection.mask
    assert torch.all(chosen.grad[~mask] == 0) and torch.all(chosen.grad[mask] != 0)
    torch.testing.assert_close(weights[mask], torch.full((3,), 1 / 3))


# ---- the scheduler's state ------------------------------------------------------------------------------------


def drive(scheduler: SamS, steps: int, seed: int) -> list[list[bool]]:
    """`steps` selections on seeded random candidate batches of 8 pairs (L = 3, D = 16)."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(steps):
        contexts, losses = torch.randn(8, 3, 16, generator=generator), torch.rand(8, generator=generator)
        margins, chosen = torch.randn(8, generator=generator), -torch.rand(8, generator=generator) * 10
        masks.append(scheduler.step(contexts, losses, margins, chosen).global_mask.tolist())
    return masks


@pytest.mark.parametrize("selection", ["topk", "softmax", "random"])
def test_state_round_trip_gives_identical_next_selections(selection: str) -> None:
    options = dict(ratio=0.5, selection=selection, pool_size=20, replay_batches=2, lr=1e-2)
    uninterrupted = SamS(**options)
    drive(uninterrupted, 5, seed=0)
    state = uninterrupted.state_dict()
    restored = SamS(**options)
    restored.load_state_dict(state)  # before the networks exist: applied when they are built
    assert drive(restored, 4, seed=1) == drive(uninterrupted, 4, seed=1)
    for a, b in zip(restored.networks.parameters(), uninterrupted.networks.parameters()):
        assert torch.equal(a, b)
    assert restored.pool.num_pairs == uninterrupted.pool.num_pairs <= 20


def test_scheduler_learns_and_exploration_can_be_switched_off() -> None:
    """Each step after the first trains f1 on the labelled last selection (its loss falls on a fixed target);
    exploration=False leaves f2 untrained and scores by f1 alone."""
    scheduler = SamS(ratio=0.5, lr=1e-2, exploration=False)
    contexts = torch.randn(8, 3, 16, generator=torch.Generator().manual_seed(0))
    losses, margins, chosen = torch.full((8,), 0.5), torch.linspace(0, 1, 8), -torch.linspace(1, 2, 8)
    history = [scheduler.step(contexts, losses, margins, chosen).metrics for _ in range(30)]
    assert history[-1]["sams/f1_loss"] < history[1]["sams/f1_loss"] / 2
    assert all(float(m["sams/f2_loss"]) == 0 for m in history[1:])
    u, f1, _ = scheduler.scores(contexts)
    assert torch.equal(u, f1)


def test_bad_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"sample_scheduler.init_args: ratio=0"):
        SamS(ratio=0)
    with pytest.raises(UserInputError, match="selection=best"):
        SamS(selection="best")
    scheduler = SamS(pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(UserInputError, match="pretrained=.*no such file"):
        scheduler.build(3, 16, torch.device("cpu"))


# ---- training runs ---------------------------------------------------------------------------------------------


def test_training_with_sams_resumes_exactly(assets: Path, tmp_path: Path) -> None:
    """Weights, optimizer, pool, the last selection's record and the generator are in the checkpoint: the resumed
    run selects, and so trains, exactly as the uninterrupted one (softmax selection draws from the generator)."""
    losses = assert_resumes_exactly(
        lambda: DPOModule(str(assets / "model"), optimizer=ADAMW,
                          sample_scheduler=SamS(ratio=0.5, selection="softmax", replay_batches=2)),
        lambda: make_dm(assets), tmp_path, steps=8, every=4)
    assert len(set(losses.values())) > 1


def test_multi_reference_module_holds_a_scheduler(assets: Path, tmp_path: Path) -> None:
    from lightning_modules.multiref import ARWC, MultiReferenceModule
    from test_multiref import make_dm as multiref_dm

    from datamodules.reference_cache import ReferenceSpec
    from lightning_modules.references.cache_builder import compute_for_datamodule
    from test_reference_cache import copy_prefs

    data = copy_prefs(assets, tmp_path, n_train=16, n_val=4)
    specs = [ReferenceSpec(str(assets / "model")), ReferenceSpec(str(assets / "model"), dtype="bfloat16")]
    for spec in specs:
        compute_for_datamodule(multiref_dm(data, assets, [spec]))
    logged = fit(MultiReferenceModule(str(assets / "model"), weighting=ARWC(), optimizer=ADAMW,
                                      sample_scheduler=SamS(ratio=0.5)), multiref_dm(data, assets, specs), steps=3)
    assert [m["train/sams/selected_fraction"] for m in logged] == [0.5] * 3
    assert "train/sams/f1_loss" in logged[-1] and all(math.isfinite(m["loss"]) for m in logged)


@pytest.mark.slow
def test_ddp_ranks_select_identically_and_match_one_process(assets: Path, tmp_path: Path) -> None:
    """2 DDP ranks × 4 pairs: both ranks hold the same selection of the global 8 pairs (each training its own slice),
    with the same scores (the scheduler trains identically on the gathered batch), and the run equals one process
    with batches of 8; under DeepSpeed ZeRO-3 (hidden states of a partitioned policy) it equals DDP."""
    from deepspeed_cpu import fit_two_ranks, zero_strategy
    from safetensors.torch import load_file
    from test_configs import REPO, write_localized

    config = write_localized(REPO / "configs/quickstart/dpo.yaml", assets, tmp_path)
    scheduler = json.dumps({"class_path": "lightning_modules.sams.SamS", "init_args": {"ratio": 0.5, "lr": 1e-2}})
    exports, probes = {}, {}
    for name, strategy, devices, batch_size in (("one", "auto", 1, 8), ("ddp", "ddp", 2, 4),
                                                ("zero3", zero_strategy(3), 2, 4)):
        probes[name] = tmp_path / f"probe_{name}"
        exports[name] = tmp_path / f"export_{name}"
        probe = {"class_path": "sams_probe.SelectionProbe", "init_args": {"dirpath": str(probes[name])}}
        run = fit_two_ranks(config, tmp_path, strategy, export=exports[name], callbacks=[probe], devices=devices,
                            extra=[f"--model.init_args.sample_scheduler={scheduler}", "--trainer.max_steps=3",
                                   f"--data.init_args.batch_size={batch_size}"])
        assert run.returncode == 0, f"{name}: {run.tail()}"
    rank0, rank1 = ([json.loads(line) for line in (probes["ddp"] / f"rank{r}.jsonl").read_text().splitlines()]
                    for r in (0, 1))
    one = [json.loads(line) for line in (probes["one"] / "rank0.jsonl").read_text().splitlines()]
    assert len(rank0) == len(rank1) == len(one) == 3
    for a, b, single in zip(rank0, rank1, one):
        assert a["global_mask"] == b["global_mask"] and sum(a["global_mask"]) == 4
        assert a["mask"] + b["mask"] == a["global_mask"]  # rank order: rank 0's rows, then rank 1's
        torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]), atol=0, rtol=0)
        # the same 4 pairs as one process with the whole batch (rows in another order)
        unpad = lambda row: tuple(row[:max(i for i, t in enumerate(row) if t != 0) + 1])  # noqa: E731 (pad id 0)
        chosen = lambda rows, mask: sorted(unpad(r) for r, m in zip(rows, mask) if m)  # noqa: E731
        assert chosen(a["chosen_input_ids"] + b["chosen_input_ids"], a["global_mask"]) == \
            chosen(single["chosen_input_ids"], single["global_mask"])
    weights = {name: load_file(exports[name] / "model.safetensors") for name in exports}
    initial = load_file(assets / "model/model.safetensors")
    assert max((weights["one"][k] - initial[k]).abs().max().item() for k in initial) > 1e-3
    for name in ("ddp", "zero3"):
        for key, value in weights["one"].items():
            torch.testing.assert_close(weights[name][key], value, atol=2e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_pretraining_trains_only_the_scheduler_and_dpo_loads_it_by_path(assets: Path, tmp_path: Path) -> None:
    from lightning_modules.sams.pretrain import SamSPretrainModule

    module = SamSPretrainModule(str(assets / "model"), sample_scheduler=SamS(ratio=0.5, lr=1e-2),
                                save_path=str(tmp_path / "sams.pt"))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    before = {k: v.clone() for k, v in DPOModule(str(assets / "model")).state_dict().items() if k.startswith("policy")}
    trainer.fit(module, datamodule=make_dm(assets))
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the policy is frozen
    assert module.sample_scheduler.steps == 5 and module.sample_scheduler.pool.num_pairs == 4 * 2  # 4 labelled batches
    saved = torch.load(tmp_path / "sams.pt", weights_only=True)
    trained = module.sample_scheduler.networks.state_dict()
    loaded = SamS(pretrained=str(tmp_path / "sams.pt"))
    loaded.build(saved["num_layers"], saved["hidden_size"], torch.device("cpu"))
    assert all(torch.equal(loaded.networks.state_dict()[k], v) for k, v in trained.items())
    initial = SamS()
    initial.build(saved["num_layers"], saved["hidden_size"], torch.device("cpu"))
    assert any(not torch.equal(initial.networks.state_dict()[k], v) for k, v in trained.items())  # it learned
    with pytest.raises(UserInputError, match="pretrained=.*was trained for"):
        SamS(pretrained=str(tmp_path / "sams.pt"), connector_size=32).build(saved["num_layers"], saved["hidden_size"],
                                                                             torch.device("cpu"))


def test_on_policy_dpo_holds_a_scheduler_over_its_sampled_pairs(assets: Path) -> None:
    """On-policy DPO with all pairs of 3 samples per prompt: the scheduler selects half of the round's pairs; the
    offline mix-in is not selected from (one scheduler step per training step)."""
    from lightning_modules.objectives import FilteredBC
    from lightning_modules.onpolicy import OnPolicyModule, Sampling
    from lightning_modules.rewards import MinLength

    module = OnPolicyModule(str(assets / "model"), reward=MinLength(max_length=8), pairs="all", mixing_ratio=0.5,
                            sampling=Sampling(num_samples=3, max_new_tokens=8), optimizer=ADAMW,
                            sample_scheduler=SamS(ratio=0.5))
    logged = fit(module, make_dm(assets, return_prompts=True), steps=3)
    assert module.sample_scheduler.steps == 3
    for metrics in logged:
        k = math.ceil(metrics["train/pairs"] / 2)
        assert metrics["train/sams/selected_fraction"] == pytest.approx(k / metrics["train/pairs"])
    with pytest.raises(UserInputError, match="sample_scheduler with model.objective=FilteredBC"):
        OnPolicyModule(str(assets / "model"), reward=MinLength(max_length=8), objective=FilteredBC(),
                       sample_scheduler=SamS())


def test_selection_metrics_and_score_histogram_reach_tensorboard(assets: Path, tmp_path: Path) -> None:
    """With label noise the flipped shares are logged (selected vs the whole batch); the scores u are a histogram."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    logged = fit(DPOModule(str(assets / "model"), optimizer=ADAMW, sample_scheduler=SamS(ratio=0.5)),
                 make_dm(assets, label_noise=0.5), steps=3, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Histograms("train/sams/scores")] == [0, 1, 2]
    scalars = set(events.Tags()["scalars"])
    for name in ("selected_fraction", "f1_selected", "f1_unselected", "f2_selected", "f1_loss", "f2_loss",
                 "batch_reward", "sample_reward", "flipped_selected", "flipped_all"):
        assert f"train/sams/{name}" in scalars, name
    assert 0 < logged[-1]["train/sams/flipped_all"] < 1


def test_scheduler_stays_float32_under_a_bfloat16_default_dtype() -> None:
    """Lightning's bf16-true precision makes bfloat16 the default dtype inside the training step, where the networks
    are built: they are float32 anyway and take float32 contexts."""
    scheduler = SamS(ratio=0.5)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        for _ in range(2):
            scheduler.step(torch.randn(4, 2, 8, dtype=torch.bfloat16), torch.rand(4), torch.randn(4), -torch.rand(4))
    finally:
        torch.set_default_dtype(previous)
    assert all(p.dtype == torch.float32 for p in scheduler.networks.parameters())
