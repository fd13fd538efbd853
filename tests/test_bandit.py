"""The on-policy study's bandit: environment, policy, module, CLI configs, resume and the study (SPEC section 5).

Expected values are computed by hand (or from the Cauchy CDF, independently of the histogram code);
every run is tiny (a few contexts, a few steps) and uses one torch thread.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from datamodules.bandit import BanditDataModule, bin_index, bump_reward, make_environment, reward_table
from datamodules.utils.errors import UserInputError
from lightning_modules.bandit import BanditModule, BanditPolicy, entropy, expected_reward, fit_to, kl_to
from lightning_modules.objectives import BoNNegative, FilteredBC, Reinforce
from resume_helper import assert_resumes_exactly

REPO = Path(__file__).resolve().parents[1]
BANDIT_CONFIGS = sorted((REPO / "configs/bandit").glob("*.yaml"))
OBJECTIVE_OF = {"filtered_bc": "FilteredBC", "bon_negative": "BoNNegative", "awr": "AWR", "dpo": "Sigmoid",
                "ipo": "IPO", "reinforce": "Reinforce"}  # shipped config -> its objective class


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- environment -------------------------------------------------------------------------------------------------


def cauchy_cdf(x: float, loc: float = -0.7, scale: float = 0.4) -> float:
    return 0.5 + math.atan((x - loc) / scale) / math.pi


def test_bin_index_at_hand_points():
    values = torch.tensor([-1.0, -0.985, -0.975, -0.59, 0.001, 0.41, 0.999, 1.0])  # bins are 0.02 wide
    assert bin_index(values, 100).tolist() == [0, 0, 1, 20, 50, 70, 99, 99]


def test_data_policy_is_the_tanh_cauchy_histogram():
    env = make_environment()
    probs = env.data_logps.double().exp()
    assert abs(probs.sum().item() - 1.0) < 1e-6
    assert probs.min().item() >= 1e-4  # no empty bin (log π_data finite everywhere)
    interior = int(probs[1:99].argmax()) + 1  # the tails pile up in the edge bins
    assert 10 <= interior <= 30, interior
    assert probs[10:31].sum() > 5 * probs[60:81].sum()  # the aligned optimum has mass, the unaligned one little
    # each bin's mass is P(atanh(edge_i) <= x < atanh(edge_i+1)) under Cauchy(-0.7, 0.4): bin 0 ≈ 0.078, bin 20 ≈ 0.0243
    edges = [-1 + 2 * i / 100 for i in range(101)]
    cdf = [0.0] + [cauchy_cdf(math.atanh(e)) for e in edges[1:-1]] + [1.0]
    expected = torch.tensor([cdf[i + 1] - cdf[i] for i in range(100)], dtype=torch.float64)
    assert abs(expected[0].item() - 0.0780) < 1e-3 and abs(expected[20].item() - 0.02427) < 1e-4
    assert (probs - expected).abs().max().item() < 0.01  # 10,000 draws: a few standard errors


def test_rewards_at_hand_points():
    aligned, unaligned = reward_table("aligned"), reward_table("unaligned")
    assert aligned.shape == unaligned.shape == (100,)
    assert aligned[20].item() == 1.0 and unaligned[70].item() == 1.0
    assert aligned[30].item() == pytest.approx(math.exp(-1)) and aligned[10].item() == pytest.approx(math.exp(-1))
    assert aligned[0].item() == pytest.approx(math.exp(-4))  # ((0 - 20)/10)² = 4
    assert unaligned[85].item() == pytest.approx(math.exp(-2.25))  # ((85 - 70)/10)² = 2.25
    assert bump_reward(torch.tensor([[60, 70]]), 70.0)[0].tolist() == pytest.approx([math.exp(-1), 1.0])


def test_environment_is_seeded_and_checked():
    a, b, c = make_environment(seed=3), make_environment(seed=3), make_environment(seed=4)
    assert torch.equal(a.contexts, b.contexts) and torch.equal(a.data_logps, b.data_logps)
    assert not torch.equal(a.contexts, c.contexts)
    assert a.contexts.shape == (64, 100) and 0 <= a.contexts.min() and a.contexts.max() <= 1
    with pytest.raises(UserInputError, match=r"data\.data_draws=50: .*empty bins"):
        make_environment(data_draws=50)
    with pytest.raises(UserInputError, match=r"data\.reward='medium'"):
        BanditDataModule(reward="medium")
    with pytest.raises(UserInputError, match=r"data\.n_contexts must be >= 1, got 0"):
        BanditDataModule(n_contexts=0)


# ---- policy ------------------------------------------------------------------------------------------------------


def test_policy_shapes_and_layers():
    policy = BanditPolicy()
    names = [type(m).__name__ for m in policy.net]
    assert names == ["Linear", "LayerNorm", "ReLU", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in policy.net if isinstance(m, torch.nn.Linear)] == [
        (100, 50), (50, 256), (256, 256), (256, 100)]
    # 100·50+50 + 2·50 (LayerNorm) + 50·256+256 + 256·256+256 + 256·100+100
    assert sum(p.numel() for p in policy.parameters()) == 5050 + 100 + 13056 + 65792 + 25700
    logps = policy(torch.rand(5, 100))
    assert logps.shape == (5, 100)
    assert torch.allclose(logps.logsumexp(-1), torch.zeros(5), atol=1e-5)


def test_exact_kl_entropy_and_expected_reward_on_a_tiny_distribution():
    pi = torch.tensor([[0.5, 0.25, 0.25]]).log()
    ref = torch.tensor([0.25, 0.5, 0.25]).log()
    ln2 = math.log(2)
    assert kl_to(pi, ref).item() == pytest.approx(0.25 * ln2)  # 0.5·ln 2 + 0.25·ln 0.5 + 0
    assert kl_to(pi, pi[0]).item() == pytest.approx(0.0, abs=1e-7)
    assert entropy(pi).item() == pytest.approx(1.5 * ln2)  # 0.5·ln 2 + 2·0.25·ln 4
    assert expected_reward(pi, torch.tensor([1.0, 0.0, 2.0])).item() == pytest.approx(1.0)


def test_prefit_lands_on_the_data_policy():
    env = make_environment(n_contexts=16)
    torch.manual_seed(0)
    policy = BanditPolicy()
    history = fit_to(policy, env.contexts, env.data_logps, steps=100, lr=0.01)
    assert len(history) == 101
    assert history[0] > 0.1 and history[-1] < 1e-3, (history[0], history[-1])
    assert all(p.grad is None for p in policy.parameters())


# ---- module ------------------------------------------------------------------------------------------------------


class Record(L.Callback):
    """Per step: the reward-query count and the round index and actions the step trained on."""

    def __init__(self) -> None:
        self.queries: list[int] = []
        self.rounds: list[int] = []
        self.actions: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.queries.append(int(trainer.callback_metrics["train/reward_queries"]))
        self.rounds.append(pl_module.round["index"])
        self.actions.append(pl_module.round["actions"].clone())


def train(module: BanditModule, steps: int, n_contexts: int = 4, seed: int = 0, **data) -> Record:
    L.seed_everything(seed, verbose=False)
    record = Record()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(module, datamodule=BanditDataModule(n_contexts=n_contexts, **data))
    return record


def test_offline_queries_once_and_on_policy_every_round():
    """4 contexts × N = 3: offline spends 12 queries on its one batch; on-policy 12 more every round."""
    offline = train(BanditModule(mode="offline", num_samples=3, prefit_steps=2), steps=6)
    assert offline.queries == [12] * 6 and offline.rounds == [0] * 6
    assert all(torch.equal(a, offline.actions[0]) for a in offline.actions)
    on_policy = train(BanditModule(mode="on_policy", num_samples=3, prefit_steps=2), steps=6)
    assert on_policy.queries == [12, 24, 36, 48, 60, 72] and on_policy.rounds == [0, 1, 2, 3, 4, 5]


def test_reuse_multiplies_the_steps_per_sampled_batch():
    record = train(BanditModule(mode="on_policy", num_samples=3, reuse=3, prefit_steps=2), steps=7)
    assert record.rounds == [0, 0, 0, 1, 1, 1, 2]
    assert record.queries == [12, 12, 12, 24, 24, 24, 36]
    assert torch.equal(record.actions[0], record.actions[2]) and not torch.equal(record.actions[2], record.actions[3])


def test_offline_samples_come_from_the_data_policy():
    """Offline actions are π_data draws: over 2,000 contexts × 8 their histogram matches π_data."""
    module = BanditModule(mode="offline", num_samples=8, prefit_steps=0)
    env = make_environment(n_contexts=2000)
    logps = module.policy(env.contexts).detach()
    round_ = module.sample_round(logps, env.as_batch())
    counts = torch.bincount(round_["actions"].flatten(), minlength=100).double() / round_["actions"].numel()
    assert (counts - env.data_logps.double().exp()).abs().max() < 0.01
    assert module.reward_queries == 16_000
    assert torch.equal(round_["rewards"], env.rewards[round_["actions"]])


def test_bad_module_input_names_the_key():
    with pytest.raises(UserInputError, match=r"model\.reuse must be >= 1, got 0"):
        BanditModule(reuse=0)
    with pytest.raises(UserInputError, match=r"model\.mode='online'"):
        BanditModule(mode="online")
    with pytest.raises(UserInputError, match=r"model\.objective=.*not an objective"):
        BanditModule(objective="dpo")
    module = BanditModule(n_actions=50)
    with pytest.raises(UserInputError, match=r"model\.n_actions=50 .* data\.n_actions=100"):
        module.check_batch(make_environment(n_contexts=2).as_batch())


# ---- the shipped configs through the CLI -------------------------------------------------------------------------


@pytest.mark.parametrize("path", BANDIT_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("mode", ["offline", "on_policy"])
def test_shipped_config_trains_through_the_cli(path: Path, mode: str, tmp_path: Path, monkeypatch):
    from lightning_modules.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning_modules"])
    cli = main(["fit", "--config", str(path), "--trainer.max_steps=3", "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}", "--data.init_args.n_contexts=4",
                "--model.init_args.prefit_steps=3", f"--model.init_args.mode={mode}"])
    assert type(cli.model).__name__ == "BanditModule"
    assert type(cli.model.objective).__name__ == OBJECTIVE_OF[path.stem]
    assert cli.trainer.global_step == 3 and len(cli.model.prefit_kl) == 4
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    n = cli.model.num_samples
    assert int(metrics["train/reward_queries"]) == (4 * n if mode == "offline" else 3 * 4 * n)
    assert 0 < float(metrics["train/expected_reward"]) < 1 and float(metrics["train/kl_to_data"]) >= 0


@pytest.mark.parametrize("override, message", [
    ("--model.init_args.reuse=0", "error: model.reuse must be >= 1, got 0"),
    ("--data.init_args.reward=middle", "error: data.init_args.reward: expected one of 'aligned', 'unaligned', got 'middle'"),
    ("--model.init_args.n_actions=50", "error: model.context_dim=100 and model.n_actions=50 must match the data's "
                                       "data.context_dim=100 and data.n_actions=100"),
])
def test_bad_cli_input_is_one_paragraph(override: str, message: str, tmp_path: Path, monkeypatch, capsys):
    from lightning_modules.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning_modules"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/bandit/dpo.yaml"), "--trainer.logger=false", "--trainer.max_steps=1",
              f"--trainer.default_root_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err


def test_every_algorithm_of_the_study_has_a_config():
    from lightning_modules.studies.bandit_study import ALGORITHMS

    assert sorted(p.stem for p in BANDIT_CONFIGS) == sorted(ALGORITHMS) == sorted(OBJECTIVE_OF)


# ---- resume ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_module", [
    lambda: BanditModule(objective=FilteredBC(), mode="offline", num_samples=4, prefit_steps=5),
    lambda: BanditModule(objective=Reinforce(baseline="running", normalize=True), mode="on_policy", num_samples=4,
                         reuse=4, prefit_steps=5),
    lambda: BanditModule(objective=BoNNegative(negatives="mean"), mode="on_policy", num_samples=4, reuse=5,
                         beta=0.5, prefit_steps=5),
], ids=["offline-filtered_bc", "on_policy-reinforce-running", "on_policy-bon_negative"])
def test_resumes_exactly_without_redoing_the_prefit(make_module, tmp_path: Path):
    """A checkpoint at step 6 lands inside a round (reuse 4 and 5) or after the offline batch; the pre-fit ran once."""
    made: list[BanditModule] = []

    def module() -> BanditModule:
        made.append(make_module())
        return made[-1]

    assert_resumes_exactly(module, lambda: BanditDataModule(n_contexts=8), tmp_path, steps=12, every=6)
    full, stopped, resumed = made
    assert len(full.prefit_kl) == 6 and len(stopped.prefit_kl) == 6 and resumed.prefit_kl == []
    assert bool(resumed.prefitted) and resumed.reward_queries == full.reward_queries


# ---- the study ---------------------------------------------------------------------------------------------------


def fake_runs(finals: list[float]) -> list[dict]:
    return [{"final": {"expected_reward": value}} for value in finals]


def test_verdict_is_computed_from_the_numbers():
    from lightning_modules.studies.bandit_study import verdict

    results = {("unaligned", "filtered_bc", "offline"): fake_runs([0.25, 0.30]),
               ("unaligned", "dpo", "on_policy"): fake_runs([0.9, 1.0]),
               ("unaligned", "ipo", "on_policy"): fake_runs([0.6, 0.7]),
               ("unaligned", "bon_negative", "on_policy"): fake_runs([0.95, 0.95]),
               ("aligned", "filtered_bc", "offline"): fake_runs([0.90, 0.92]),
               ("aligned", "dpo", "on_policy"): fake_runs([1.0, 1.0]),
               ("aligned", "ipo", "on_policy"): fake_runs([0.9, 0.9]),
               ("aligned", "bon_negative", "on_policy"): fake_runs([1.0, 1.0])}
    judged = verdict(results, clear_gap=0.1, small_gap=0.1)
    assert judged["unaligned"]["gaps"]["dpo_on_policy"]["gap"] == pytest.approx(0.95 - 0.275)
    assert judged["aligned"]["gaps"]["dpo_on_policy"]["gap"] == pytest.approx(0.09)
    assert judged["reproduced"] and "reproduced" in judged["text"]
    # one IPO seed at or below the baseline's best seed: not "clearly higher"
    results[("unaligned", "ipo", "on_policy")] = fake_runs([0.30, 1.0])
    assert not verdict(results, clear_gap=0.1, small_gap=0.1)["reproduced"]
    # a gap of 0.2 on the aligned reward is not small
    results[("unaligned", "ipo", "on_policy")] = fake_runs([0.6, 0.7])
    results[("aligned", "filtered_bc", "offline")] = fake_runs([0.8, 0.8])
    judged = verdict(results, clear_gap=0.1, small_gap=0.1)
    assert not judged["reproduced"] and "not small" in judged["text"]


def test_study_smoke_and_resume(tmp_path: Path, monkeypatch):
    """Two algorithms × both modes × both rewards × 2 seeds, 4 steps each; then a rerun reuses every cell."""
    from lightning_modules.studies import bandit_study as study

    monkeypatch.setattr(sys, "argv", ["bandit_study"])
    fit_args = ("--trainer.max_steps=4", "--data.init_args.n_contexts=4", "--model.init_args.prefit_steps=3")
    kwargs = dict(out_dir=str(tmp_path), algorithms=("filtered_bc", "dpo"), seeds=(0, 1),
                  config_dir=str(REPO / "configs/bandit"), fit_args=fit_args)
    rows = study.bandit_study(**kwargs)
    assert [(r["reward"], r["algorithm"], r["mode"]) for r in rows] == [
        (reward, algorithm, mode) for reward in ("aligned", "unaligned") for algorithm in ("filtered_bc", "dpo")
        for mode in ("offline", "on-policy")]
    assert [r["reward_queries"] for r in rows[:2]] == [4 * 8, 4 * 4 * 8]  # offline: one batch; on-policy: 4 rounds
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "needs offline filtered_bc" not in summary["verdict"]["text"]  # both rewards judged (ipo / bon missing)
    assert set(summary["verdict"]["unaligned"]["gaps"]) == {"dpo_on_policy"} and not summary["verdict"]["reproduced"]
    assert (tmp_path / "bandit.png").stat().st_size > 10_000
    assert "| unaligned | dpo | on-policy |" in (tmp_path / "summary.md").read_text()
    curve = json.loads((tmp_path / "runs/unaligned/dpo_on_policy/seed_1/result.json").read_text())["curve"]
    assert curve["step"] == [0.0, 1.0, 2.0, 3.0] and curve["train/reward_queries"] == [32.0, 64.0, 96.0, 128.0]

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(study, "run_one", refuse)
    assert study.bandit_study(**kwargs) == rows


def test_study_config_parses_and_names_the_target():
    from lightning_modules.studies.bandit_study import bandit_study
    from lightning_modules.studies.launch import study_parser

    path = REPO / "configs/studies/bandit/study.yaml"
    parser = study_parser(bandit_study)
    init = parser.instantiate(parser.parse_args(["--config", str(path)]))
    assert init.algorithms == ("filtered_bc", "bon_negative", "awr", "dpo", "ipo", "reinforce")
    assert init.seeds == (0, 1, 2) and init.out_dir == "runs/bandit"
    assert set(yaml.safe_load(path.read_text())) <= set(vars(init))
    assert "bandit:" in (REPO / "Makefile").read_text()
