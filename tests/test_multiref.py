"""MultiReferenceModule: MRPO / MDPO against K cached references with α from a weighting strategy.

Three references of the tiny synthetic task are cached once for the module (`refs`): the assets' model
in float32 and in bfloat16 (slightly different log-probs), and a second tiny model with its own
tokenizer. Identities (SPEC section 2, end to end): K = 1 is single-reference DPO, and K identical
references are DPO. Every strategy keeps the resume contract.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import PreferenceDataModule
from datamodules.reference_cache import ReferenceSpec
from datamodules.utils.errors import UserInputError
from lightning_modules.dpo import DPOModule
from lightning_modules.multiref import ARWC, STRATEGIES, SWCW, TSW, VAW, Fixed, MultiReferenceModule, reference_signals
from lightning_modules.objectives import MDPO, MRPO, OBJECTIVES
from lightning_modules.references.cache_builder import compute_for_datamodule
from resume_helper import assert_resumes_exactly
from test_reference_cache import copy_prefs, other_assets  # noqa: F401  (fixture)

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)


@pytest.fixture(scope="module")
def refs(assets: Path, other_assets: Path, tmp_path_factory) -> tuple[Path, list[ReferenceSpec]]:  # noqa: F811
    """(a pairs folder of 24 train / 8 validation rows, its 3 cached references)."""
    data = copy_prefs(assets, tmp_path_factory.mktemp("multiref"), n_train=24, n_val=8)
    specs = [ReferenceSpec(str(assets / "model")), ReferenceSpec(str(assets / "model"), dtype="bfloat16"),
             ReferenceSpec(str(other_assets / "model"))]
    for spec in specs:
        compute_for_datamodule(make_dm(data, assets, [spec]))
    return data, specs


def make_dm(data: Path, assets: Path, specs: list[ReferenceSpec], **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(str(data), str(assets / "model"), reference_cache=specs,
                                **{"batch_size": 4, "eval_batch_size": 8, "max_length": 64, **kwargs})


def fit(module: L.LightningModule, dm: PreferenceDataModule, steps: int = 3) -> tuple[list[float], list[dict]]:
    """(training loss of each step, logged metrics of each step)."""
    losses, logged = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[Record()])
    trainer.fit(module, datamodule=dm)
    return losses, logged


@pytest.mark.parametrize("objective", [MDPO(), MRPO()], ids=["mdpo", "mrpo"])
def test_one_reference_is_dpo_end_to_end(assets: Path, refs, objective) -> None:
    data, specs = refs
    multi, _ = fit(MultiReferenceModule(str(assets / "model"), objective=objective, weighting=ARWC(), optimizer=ADAMW),
                   make_dm(data, assets, specs[2:]))
    single, _ = fit(DPOModule(str(assets / "model"), reference="cached", optimizer=ADAMW),
                    make_dm(data, assets, specs[2:]))
    assert multi == pytest.approx(single, abs=1e-6, rel=0)
    assert abs(single[0] - math.log(2)) > 1e-3  # the reference is another model: not the trivial ln 2


@pytest.mark.parametrize("objective", [MDPO(), MRPO()], ids=["mdpo", "mrpo"])
def test_identical_references_are_dpo_end_to_end(assets: Path, refs, objective) -> None:
    data, specs = refs
    multi, logged = fit(MultiReferenceModule(str(assets / "model"), objective=objective, weighting=VAW(),
                                             optimizer=ADAMW), make_dm(data, assets, [specs[2]] * 3))
    single, _ = fit(DPOModule(str(assets / "model"), reference="cached", optimizer=ADAMW),
                    make_dm(data, assets, specs[2:]))
    assert multi == pytest.approx(single, abs=1e-5, rel=0)
    alphas = [v for k, v in logged[0].items() if k.startswith("train/alpha/")]
    assert alphas == pytest.approx([1 / 3] * 3)  # VAW of identical references: uniform


@pytest.mark.parametrize("weighting", [ARWC(), VAW()], ids=["arwc", "vaw"])
def test_live_references_train_as_their_caches_do(assets: Path, refs, weighting) -> None:
    """K live references that share the policy's tokenizer (scored in the policy's forward layout, counts from its
    labels) give the losses of the same references cached, for an online (ARWC) and an offline (VAW) strategy."""
    data, specs = refs
    options = {"weighting": weighting, "optimizer": ADAMW, "average_logps": True}
    live_module = MultiReferenceModule(str(assets / "model"), reference="live", **options,
                                       live_references=[str(assets / "model"), str(assets / "model")])
    live, logged = fit(live_module, make_dm(data, assets, []))
    cached, _ = fit(MultiReferenceModule(str(assets / "model"), **options), make_dm(data, assets, [specs[0]] * 2))
    assert live == pytest.approx(cached, abs=1e-5, rel=0)
    batches = 3 + (1 if isinstance(weighting, VAW) else 0)  # 3 steps, and VAW's pass over the 8 validation pairs
    assert live_module.reference.forward_calls == 2 * batches  # each of the K = 2 models once per batch
    assert [k for k in logged[0] if k.startswith("train/alpha/")] == [f"train/alpha/{assets.name}_model_{i}" for i in range(2)]


def test_live_references_must_share_the_policy_tokenizer(assets: Path, other_assets: Path, refs) -> None:  # noqa: F811
    data, _ = refs
    module = MultiReferenceModule(str(assets / "model"), reference="live", optimizer=ADAMW,
                                  live_references=[str(assets / "model"), str(other_assets / "model")])
    with pytest.raises(UserInputError, match=r"model.live_references\[1\].*tokenizer.*reference_cache"):
        fit(module, make_dm(data, assets, []), steps=1)
    with pytest.raises(UserInputError, match="model.live_references"):
        MultiReferenceModule(str(assets / "model"), reference="live")
    with pytest.raises(UserInputError, match="model.live_references.*reference=live"):
        MultiReferenceModule(str(assets / "model"), live_references=[str(assets / "model")])


def test_alpha_and_per_reference_losses_are_logged(assets: Path, refs) -> None:
    data, specs = refs
    _, logged = fit(MultiReferenceModule(str(assets / "model"), weighting=Fixed([1, 1, 2]), optimizer=ADAMW),
                    make_dm(data, assets, specs))
    names = [f"{assets.name}_model", f"{assets.name}_model-bfloat16", f"{specs[2].name_or_path.split('/')[-2]}_model"]
    assert [logged[-1][f"train/alpha/{n}"] for n in names] == pytest.approx([0.25, 0.25, 0.5])
    ref_losses = [logged[-1][f"train/ref_loss/{n}"] for n in names]
    assert all(math.isfinite(x) for x in ref_losses) and len(set(ref_losses)) == 3
    assert 0 <= logged[-1]["train/preference_accuracy"] <= 1


def data_factory(data: Path, assets: Path, specs):
    return lambda: make_dm(data, assets, specs, batch_size=4)


@pytest.mark.parametrize("strategy", [SWCW(), TSW(subset_size=4, seed=1), VAW()], ids=["swcw", "tsw", "vaw"])
def test_multi_reference_training_resumes_exactly(assets: Path, refs, tmp_path: Path, strategy) -> None:
    """The strategy's state (previous batch, posterior and generator, offline α) is in every checkpoint."""
    data, specs = refs
    assert_resumes_exactly(lambda: MultiReferenceModule(str(assets / "model"), objective=MRPO(clip_epsilon=0.1),
                                                        weighting=strategy, optimizer=ADAMW),
                           data_factory(data, assets, specs), tmp_path, steps=8, every=4)


def test_tsw_posterior_moves_during_training(assets: Path, refs) -> None:
    data, specs = refs
    module = MultiReferenceModule(str(assets / "model"), weighting=TSW(subset_size=8, seed=0), optimizer=ADAMW)
    fit(module, make_dm(data, assets, specs), steps=4)
    a, b = module.weighting.a, module.weighting.b
    assert (a + b).sum() == pytest.approx(2 * 5.0 * 3 + 4)  # one reward per optimizer step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("objective", ["mrpo", "mdpo"])
def test_extreme_references_give_finite_losses(name: str, objective: str, dtype) -> None:
    """Where the original diverged: log-probs of −3000 beside −0.5, a reference that scores every pair alike,
    K = 7 with one far off, policies in float32 and bfloat16. Losses, rewards and α stay finite."""
    k, b = 7, 4
    chosen = torch.full((b, k), -0.5)
    rejected = torch.full((b, k), -0.7)
    chosen[:, 1] = rejected[:, 1] = -3000.0  # identical scores: d = 0
    chosen[:, 6], rejected[:, 6] = -0.5, -3000.0  # far off
    counts = torch.ones(b, k, dtype=torch.long)
    signals = reference_signals(chosen, rejected, counts, counts)

    class Context:
        num_references = k

        def all_reduce_sum(self, t):
            return t

        def validation_signals(self):
            return iter([signals])

        def validation_size(self):
            return b

        def validation_accuracy(self, indices):
            return 0.5

    strategy = Fixed([1.0] * k) if name == "fixed" else STRATEGIES[name]()
    strategy.prepare(Context())
    strategy.before_step(Context())
    policy_chosen = torch.tensor([-0.4, -3000.0, -1.0, -2.0], dtype=dtype)
    policy_rejected = torch.tensor([-0.6, -0.5, -3000.0, -2.0], dtype=dtype)
    for _ in range(2):
        alphas = strategy.alphas(signals, training=True, context=Context())
        out = OBJECTIVES[objective](policy_chosen, policy_rejected, chosen.to(dtype), rejected.to(dtype), beta=0.1,
                                    alphas=alphas)
        for tensor in (alphas, out.losses, out.chosen_rewards, out.rejected_rewards):
            assert torch.isfinite(tensor).all(), (name, objective, tensor)


def test_alpha_figure_in_tensorboard_and_the_run_directory(assets: Path, refs, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from callbacks import AlphaFigure
    from lightning_modules.runtime import RunLogger

    data, specs = refs
    figure = AlphaFigure()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=RunLogger(root_dir=str(tmp_path)), callbacks=[figure],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(MultiReferenceModule(str(assets / "model"), weighting=SWCW(), optimizer=ADAMW),
                datamodule=make_dm(data, assets, specs))
    assert figure.steps == [1, 2, 3, 4]
    assert figure.alphas[0] == pytest.approx([1 / 3] * 3)  # SWCW starts uniform
    assert all(sum(a) == pytest.approx(1) for a in figure.alphas) and figure.alphas[1] != figure.alphas[0]
    png = (tmp_path / "latest" / "alpha.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    events = EventAccumulator(str(tmp_path / "latest"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("alpha")] == [2, 4, 4]  # after each validation, and at fit end
    restored = AlphaFigure()
    restored.load_state_dict(figure.state_dict())
    assert (restored.steps, restored.alphas, restored.names) == (figure.steps, figure.alphas, figure.names)


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["SWCW", "{class_path: TSW, init_args: {subset_size: 4, seed: 2}}"],
                         ids=["swcw", "tsw"])
def test_ddp_ranks_share_alpha_and_equal_one_process(assets: Path, refs, tmp_path: Path, weighting: str) -> None:
    """2 DDP ranks × 4 pairs take the steps one process takes with 8: every rank used the global batch's α.

    SWCW's vector after step 1 is the mean over both ranks' pairs (an all-reduce); with each rank's own
    mean instead, the ranks would weight differently and DDP's averaged gradient would not be one process's.
    TSW draws the same arm on every rank (same generator, same policy, same validation subset).
    """
    from deepspeed_cpu import fit_two_ranks
    from safetensors.torch import load_file
    from test_configs import REPO, write_localized

    data, specs = refs
    config = write_localized(REPO / "configs/quickstart/dpo.yaml", assets, tmp_path)
    # two references that disagree pair by pair (another model, another tokenizer), so batch means differ by rank
    cache = "[" + ", ".join(f"{{name_or_path: {s.name_or_path}, dtype: {s.dtype}}}" for s in (specs[0], specs[2])) + "]"
    exports = {}
    for devices in (1, 2):
        export = tmp_path / f"export_{devices}"
        run = fit_two_ranks(config, tmp_path, "ddp" if devices > 1 else "auto", export=export, devices=devices, extra=[
            "--model.class_path=lightning_modules.multiref.MultiReferenceModule", "--model.init_args.objective=MDPO",
            f"--model.init_args.weighting={weighting}", "--model.init_args.reference=cached",
            f"--data.init_args.path={data}", f"--data.init_args.reference_cache={cache}",
            f"--data.init_args.batch_size={8 // devices}", "--trainer.max_steps=3"])
        assert run.returncode == 0, run.tail()
        exports[devices] = load_file(export / "model.safetensors")
    initial = load_file(assets / "model/model.safetensors")
    assert max((exports[1][k] - initial[k]).abs().max().item() for k in initial) > 1e-3
    for key, value in exports[1].items():
        torch.testing.assert_close(exports[2][key], value, atol=2e-6, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_zero3_live_references_equal_their_cache_in_one_process(assets: Path, refs, tmp_path: Path) -> None:
    """K = 2 live references partitioned under ZeRO-3 on 2 CPU processes (VAW reads the whole validation split
    through them on every rank before the first step) train as the same references cached, in one process."""
    from deepspeed_cpu import fit_two_ranks, zero_strategy
    from safetensors.torch import load_file
    from test_configs import REPO, write_localized

    data, specs = refs
    config = write_localized(REPO / "configs/quickstart/dpo.yaml", assets, tmp_path)
    model = str(assets / "model")
    common = ["--model.class_path=lightning_modules.multiref.MultiReferenceModule", "--model.init_args.objective=MDPO",
              "--model.init_args.weighting=VAW", f"--data.init_args.path={data}", "--trainer.max_steps=3"]
    runs = {"cached": ("auto", 1, ["--model.init_args.reference=cached",
                                   f"--data.init_args.reference_cache=[{{name_or_path: {model}}}, {{name_or_path: {model}}}]"]),
            "zero3_live": (zero_strategy(3), 2, ["--model.init_args.reference=live",
                                                 f"--model.init_args.live_references=[{model}, {model}]"])}
    exports = {}
    for name, (strategy, devices, extra) in runs.items():
        export = tmp_path / f"export_{name}"
        run = fit_two_ranks(config, tmp_path, strategy, export=export, devices=devices,
                            extra=[*common, f"--data.init_args.batch_size={8 // devices}", *extra])
        assert run.returncode == 0, f"{name}: {run.tail()}"
        exports[name] = load_file(export / "model.safetensors")
    initial = load_file(assets / "model/model.safetensors")
    assert max((exports["cached"][k] - initial[k]).abs().max().item() for k in initial) > 1e-3
    for key, value in exports["cached"].items():
        torch.testing.assert_close(exports["zero3_live"][key], value, atol=1e-5, rtol=0, msg=key)
