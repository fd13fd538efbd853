"""Tests for the on-policy objectives (`objectives.sampled`) and pair building (`onpolicy.pairs`), by hand.

Expected values are plain-Python arithmetic, never calls of the code under test. The shared batch has
P = 2 prompts and N = 3 samples; sample (1, 2) is padding, with a reward (5) that would win if it leaked
and NaN log-probs that would poison every loss and gradient if they leaked:

    logps   [[-1.0, -2.0, -3.0], [-0.5, -1.5, nan]]
    rewards [[ 1.0,  3.0,  2.0], [ 0.0,  2.0, 5.0]]     best: sample 1 in both prompts
    ref     [[-1.5, -1.0, -2.0], [-1.0, -1.0, nan]]     logps − ref = [[0.5, -1, -1], [0.5, -0.5, ·]]
    mask    [[T, T, T], [T, T, F]]                      n_p = [3, 2]
"""

from __future__ import annotations

import math

import pytest
import torch

from datamodules.utils.errors import UserInputError
from lightning_modules.objectives import (AWR, OBJECTIVE_CLASSES, OBJECTIVES, RWR, BoNNegative, FilteredBC, Reinforce,
                                          SampledLossOutput, reinforce_rewards)
from lightning_modules.onpolicy import RunningBaseline, build_pairs, gather_pairs

NAN = float("nan")
LP = [[-1.0, -2.0, -3.0], [-0.5, -1.5, NAN]]
R = [[1.0, 3.0, 2.0], [0.0, 2.0, 5.0]]
REF = [[-1.5, -1.0, -2.0], [-1.0, -1.0, NAN]]
MASK = [[True, True, True], [True, True, False]]
SAMPLED = sorted(name for name, cls in OBJECTIVE_CLASSES.items() if cls.inputs == "samples")


def t(xs: list) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def mask() -> torch.Tensor:
    return torch.tensor(MASK)


def run(name: str, **options) -> tuple[SampledLossOutput, torch.Tensor]:
    """The objective on the shared batch, and autograd's ∂(Σ_p loss_p)/∂logps."""
    logps = t(LP).requires_grad_()
    out = OBJECTIVES[name](logps, t(R), t(REF), mask=mask(), beta=options.pop("beta", 0.5), **options)
    (grad,) = torch.autograd.grad(out.losses.sum(), logps)
    return out, grad


def check(name: str, losses: list[float], weights: list[list[float]], **options) -> None:
    """Losses equal the hand values; the weights equal the hand coefficients and autograd's gradient."""
    out, grad = run(name, **options)
    assert out.losses.shape == (2,) and out.losses.dtype == torch.float32
    torch.testing.assert_close(out.losses, t(losses), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.weights, t(weights), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, t(weights), rtol=1e-5, atol=1e-6)
    assert not out.weights.requires_grad


# --------------------------------------------------------------------- best-of-N


def test_filtered_bc_hand_values() -> None:
    # −logπ(best): p0 best = sample 1 (r 3) → 2.0;
    # p1 best among valid = sample 1 (r 2; the padding's 5 is out) → 1.5
    check("filtered_bc", [2.0, 1.5], [[0, -1, 0], [0, -1, 0]])


@pytest.mark.parametrize(("negatives", "constrained", "losses", "coef"), [
    # worst: p0 sample 0 (r 1): 2 + 0.5·(−1) = 1.5;  p1 sample 0 (r 0): 1.5 + 0.5·(−0.5) = 1.25
    ("worst", False, [1.5, 1.25], [[1, 0, 0], [1, 0, 0]]),
    # sum: p0 worse = {0, 2}: 2 + 0.5·(−1 − 3) = 0.0;  p1 worse = {0}: 1.25
    ("sum", False, [0.0, 1.25], [[1, 0, 1], [1, 0, 0]]),
    # mean: p0: 2 + 0.5·(−4 / 2) = 1.0;  p1: 1.25
    ("mean", False, [1.0, 1.25], [[0.5, 0, 0.5], [1, 0, 0]]),
    # constrained worst: ℓ = logπ − logπref: p0: 2 + 0.5·(−1 + 1.5) = 2.25;  p1: 1.5 + 0.5·(−0.5 + 1) = 1.75
    ("worst", True, [2.25, 1.75], [[1, 0, 0], [1, 0, 0]]),
    # constrained sum: p0: 2 + 0.5·((−1 + 1.5) + (−3 + 2)) = 1.75;  p1: 1.75
    ("sum", True, [1.75, 1.75], [[1, 0, 1], [1, 0, 0]]),
    # constrained mean: p0: 2 + 0.5·(−0.5 / 2) = 1.875;  p1: 1.75
    ("mean", True, [1.875, 1.75], [[0.5, 0, 0.5], [1, 0, 0]]),
])
def test_bon_negative_hand_values(negatives, constrained, losses, coef) -> None:
    # weights = −1 at the best sample, +β·coef at the negatives (same gradient constrained or not)
    weights = [[0.5 * c - (n == 1) for n, c in enumerate(row)] for row in coef]
    check("bon_negative", losses, weights, negatives=negatives, constrained=constrained)


def test_best_of_n_ties_take_the_first_sample() -> None:
    logps = t([[-1.0, -2.0, -3.0]]).requires_grad_()
    rewards = t([[2.0, 2.0, 1.0]])  # best: sample 0 (first of the tie); worse: sample 2 only
    out = OBJECTIVES["bon_negative"](logps, rewards, None, beta=0.5, negatives="sum")
    torch.testing.assert_close(out.losses, t([1.0 + 0.5 * -3.0]))
    torch.testing.assert_close(out.weights, t([[-1.0, 0.0, 0.5]]))
    rewards = t([[1.0, 0.0, 0.0]])  # worst: sample 1 (first of the tie)
    out = OBJECTIVES["bon_negative"](logps, rewards, None, beta=0.5, negatives="worst")
    torch.testing.assert_close(out.losses, t([1.0 + 0.5 * -2.0]))


@pytest.mark.parametrize("negatives", ["worst", "sum", "mean"])
@pytest.mark.parametrize("beta", [0.1, 7.0])
def test_bon_negative_is_filtered_bc_without_a_worse_sample(negatives: str, beta: float) -> None:
    logps, rewards = t([[-1.0, -2.0, -3.0], [-0.5, -1.5, -9.0]]), t([[2.0, 2.0, 2.0], [4.0, 1.0, 1.0]])
    only_one = torch.tensor([[True, True, True], [True, False, False]])  # p0 all tied; p1 one valid sample
    neg = OBJECTIVES["bon_negative"](logps, rewards, logps, mask=only_one, beta=beta, negatives=negatives,
                                     constrained=True)
    bc = OBJECTIVES["filtered_bc"](logps, rewards, None, mask=only_one, beta=beta)
    torch.testing.assert_close(neg.losses, t([1.0, 0.5]))  # −logπ of sample 0 in both prompts
    torch.testing.assert_close(neg.losses, bc.losses)
    torch.testing.assert_close(neg.weights, bc.weights)


# --------------------------------------------------------------------- weighted regression


def test_rwr_hand_values() -> None:
    e = math.exp
    # τ = 2: w = exp(r/2); p0: −(e^.5·(−1) + e^1.5·(−2) + e^1·(−3)) / 3
    #                      p1: −(e^0·(−0.5) + e^1·(−1.5)) / 2
    check("rwr", [(e(0.5) + 2 * e(1.5) + 3 * e(1.0)) / 3, (0.5 + 1.5 * e(1.0)) / 2],
          [[-e(0.5) / 3, -e(1.5) / 3, -e(1.0) / 3], [-1 / 2, -e(1.0) / 2, 0]], temperature=2.0)
    # clipped at 2: p0 w = [e^.5 = 1.6487, 2, 2];  p1 w = [1, 2]
    check("rwr", [(e(0.5) + 4 + 6) / 3, (0.5 + 3) / 2], [[-e(0.5) / 3, -2 / 3, -2 / 3], [-1 / 2, -1, 0]],
          temperature=2.0, max_weight=2.0)


def test_awr_hand_values() -> None:
    e = math.exp
    # p0: mean r = 2, A = [−1, 1, 0];  p1: mean of valid r = 1 (not 7/3), A = [−1, 1];  τ = 1, clip 20 unused
    check("awr", [(e(-1) * 1 + e(1) * 2 + 1 * 3) / 3, (e(-1) * 0.5 + e(1) * 1.5) / 2],
          [[-e(-1) / 3, -e(1) / 3, -1 / 3], [-e(-1) / 2, -e(1) / 2, 0]])
    # τ = 0.5, clip at 2: p0 w = [e^−2, min(e^2, 2) = 2, 1];  p1 w = [e^−2, 2]
    check("awr", [(e(-2) + 4 + 3) / 3, (e(-2) * 0.5 + 3) / 2], [[-e(-2) / 3, -2 / 3, -1 / 3], [-e(-2) / 2, -1, 0]],
          temperature=0.5, max_weight=2.0)


# --------------------------------------------------------------------- REINFORCE


def reinforce_check(advantages: list[list[float]], **options) -> None:
    """loss_p = −Σ_n Â_n logπ_n / n_p, weights −Â_n / n_p, with Â given by hand (padding entry: 0)."""
    counts = [3, 2]
    losses = [-sum(a * lp for a, lp in zip(advantages[p], LP[p][:counts[p]])) / counts[p] for p in (0, 1)]
    weights = [[-a / counts[p] for a in advantages[p]] + [0.0] * (3 - len(advantages[p])) for p in (0, 1)]
    check("reinforce", losses, weights, **options)


@pytest.mark.parametrize(("options", "advantages", "losses"), [
    # prompt: p0 mean 2 → Â [−1, 1, 0];  p1 mean 1 → Â [−1, 1]
    ({"baseline": "prompt"}, [[-1, 1, 0], [-1, 1]], [1 / 3, 0.5]),
    # batch: mean of the 5 valid rewards = 8/5 = 1.6
    ({"baseline": "batch"}, [[-0.6, 1.4, 0.4], [-1.6, 0.4]], [3.4 / 3, -0.1]),
    # loo: p0 b = [(3+2)/2, (1+2)/2, (1+3)/2] = [2.5, 1.5, 2];  p1 b = [2, 0]
    ({"baseline": "loo"}, [[-1.5, 1.5, 0], [-2, 2]], [0.5, 1.0]),
    ({"baseline": "running", "running_baseline": 1.0}, [[0, 2, 1], [-1, 1]], [7 / 3, 0.5]),
    ({"baseline": "none"}, [[1, 3, 2], [0, 2]], [13 / 3, 1.5]),
    # normalize: prompt Â over valid samples [−1, 1, 0, −1, 1], mean 0, population std √(4/5)
    ({"baseline": "prompt", "normalize": True}, [[-1 / math.sqrt(0.8), 1 / math.sqrt(0.8), 0],
                                                 [-1 / math.sqrt(0.8), 1 / math.sqrt(0.8)]],
     [1 / 3 / math.sqrt(0.8), 0.5 / math.sqrt(0.8)]),
    # KL 0.5: r' = r − 0.5(logπ − logπref): p0 [0.75, 3.5, 2.5] (mean 2.25), p1 [−0.25, 2.25] (mean 1)
    ({"baseline": "prompt", "kl_coef": 0.5}, [[-1.5, 1.25, 0.25], [-1.25, 1.25]], [1.75 / 3, 0.625]),
    # entropy 0.1: r' = r − 0.1·logπ (rarer samples gain): p0 [1.1, 3.2, 2.3], p1 [0.05, 2.15]
    ({"baseline": "none", "entropy_coef": 0.1}, [[1.1, 3.2, 2.3], [0.05, 2.15]], [14.4 / 3, 1.625]),
])
def test_reinforce_hand_values(options: dict, advantages: list, losses: list[float]) -> None:
    # the gradient is −Â/n_p: the KL and entropy terms shape the reward but are not differentiated
    reinforce_check(advantages, **options)
    out, _ = run("reinforce", **options)
    torch.testing.assert_close(out.losses, t(losses), rtol=1e-5, atol=1e-5)


def test_reinforce_leave_one_out_with_a_single_sample_uses_zero() -> None:
    single = torch.tensor([[True, False, False], [True, True, False]])
    logps = t(LP).requires_grad_()
    out = OBJECTIVES["reinforce"](logps, t(R), None, mask=single, beta=0.5, baseline="loo")
    # p0: one sample, b = 0, Â = 1 → −(1·(−1)) / 1 = 1;  p1: b = [2, 0] → 1.0 as above
    torch.testing.assert_close(out.losses, t([1.0, 1.0]))
    torch.testing.assert_close(out.weights, t([[-1.0, 0, 0], [1.0, -1.0, 0]]))


def test_reinforce_rewards_sign_of_the_entropy_bonus() -> None:
    shaped = reinforce_rewards(t(LP).requires_grad_(), t(R), t(REF), mask=mask(), kl_coef=0.5, entropy_coef=0.1)
    assert not shaped.requires_grad
    # r − 0.5(logπ − logπref) − 0.1·logπ: p0 [1 − 0.25 + 0.1, 3 + 0.5 + 0.2, 2 + 0.5 + 0.3], padding 0
    torch.testing.assert_close(shaped, t([[0.85, 3.7, 2.8], [-0.25 + 0.05, 2.25 + 0.15, 0.0]]))


# --------------------------------------------------------------------- shared contract and errors


@pytest.mark.parametrize("name", SAMPLED)
def test_every_sampled_objective_is_float32_with_detached_weights(name: str) -> None:
    logps = t(LP).nan_to_num().to(torch.bfloat16).requires_grad_()
    options = {"running_baseline": 0.0, "baseline": "running"} if name == "reinforce" else {}
    out = OBJECTIVES[name](logps, t(R), t(REF), mask=mask(), beta=0.5, **options)
    assert isinstance(out, SampledLossOutput) and out.losses.dtype == out.weights.dtype == torch.float32
    assert out.losses.shape == (2,) and out.weights.shape == (2, 3)
    assert out.losses.requires_grad and not out.weights.requires_grad
    assert out.weights[1, 2].item() == 0.0 and torch.isfinite(out.losses).all()


def test_clear_errors() -> None:
    lp, r, ref, m = t(LP), t(R), t(REF), mask()
    fn = OBJECTIVES
    with pytest.raises(ValueError, match=r"logps must have shape \(P, N\)"):
        fn["rwr"](lp[0], r[0], None, beta=0.5)
    with pytest.raises(ValueError, match="rewards must have shape"):
        fn["awr"](lp, r[:, :2], None, beta=0.5)
    with pytest.raises(ValueError, match="ref_logps must have shape"):
        fn["filtered_bc"](lp, r, ref[:1], beta=0.5)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        fn["filtered_bc"](lp, r, None, mask=m.float(), beta=0.5)
    with pytest.raises(ValueError, match=r"mask rows \[1\] are all False"):
        fn["filtered_bc"](lp, r, None, mask=torch.tensor([[True, False, False], [False] * 3]), beta=0.5)
    with pytest.raises(ValueError, match="constrained=True needs ref_logps"):
        fn["bon_negative"](lp, r, None, mask=m, beta=0.5, constrained=True)
    with pytest.raises(ValueError, match="negatives"):
        fn["bon_negative"](lp, r, None, mask=m, beta=0.5, negatives="all")
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logps"):
        fn["reinforce"](lp, r, None, mask=m, beta=0.5, kl_coef=0.1)
    with pytest.raises(ValueError, match="running_baseline is required"):
        fn["reinforce"](lp, r, None, mask=m, beta=0.5, baseline="running")
    with pytest.raises(ValueError, match="running_baseline"):  # given but unused is refused too
        fn["reinforce"](lp, r, None, mask=m, beta=0.5, running_baseline=1.0)
    with pytest.raises(ValueError, match="baseline must be"):
        fn["reinforce"](lp, r, None, mask=m, beta=0.5, baseline="ema")
    with pytest.raises(ValueError, match="temperature"):
        fn["rwr"](lp, r, None, mask=m, beta=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="max_weight"):
        fn["awr"](lp, r, None, mask=m, beta=0.5, max_weight=-1.0)
    with pytest.raises(ValueError, match="beta"):
        fn["bon_negative"](lp, r, None, mask=m, beta=0.0)


# --------------------------------------------------------------------- typed configs


@pytest.mark.parametrize(("config", "options"), [
    (FilteredBC(), {}),
    (BoNNegative(negatives="mean", constrained=True), {"negatives": "mean", "constrained": True}),
    (RWR(temperature=2.0, max_weight=2.0), {"temperature": 2.0, "max_weight": 2.0}),
    (AWR(temperature=0.5, max_weight=2.0), {"temperature": 0.5, "max_weight": 2.0}),
    (Reinforce(baseline="loo", normalize=True, kl_coef=0.5, entropy_coef=0.1),
     {"baseline": "loo", "normalize": True, "kl_coef": 0.5, "entropy_coef": 0.1}),
])
def test_typed_config_calls_its_function_with_its_options(config, options: dict) -> None:
    assert config.inputs == "samples" and config.options() == options
    # running_baseline is passed on only to an objective that uses it (here: none), as alphas for pairs
    out = config(t(LP), t(R), t(REF), mask=mask(), beta=0.5, running_baseline=3.0)
    want = OBJECTIVES[config.name](t(LP), t(R), t(REF), mask=mask(), beta=0.5, **options)
    torch.testing.assert_close(out.losses, want.losses)
    torch.testing.assert_close(out.weights, want.weights)
    if options:  # the options matter: the defaults give another loss
        assert not torch.allclose(type(config)()(t(LP), t(R), t(REF), mask=mask(), beta=0.5).losses, out.losses)


def test_typed_config_flags_for_the_module() -> None:
    assert [c.needs_reference for c in (FilteredBC(), RWR(), AWR(), BoNNegative(), Reinforce())] == [False] * 5
    assert BoNNegative(constrained=True).needs_reference and Reinforce(kl_coef=0.1).needs_reference
    running = Reinforce(baseline="running")
    assert running.uses_running_baseline and not Reinforce().uses_running_baseline
    out = running(t(LP), t(R), None, mask=mask(), beta=0.5, running_baseline=1.0)
    torch.testing.assert_close(out.losses, t([7 / 3, 0.5]))  # as the "running" row of the hand table
    assert repr(running) == "Reinforce(baseline='running', normalize=False, kl_coef=0.0, entropy_coef=0.0)"


def test_dpo_module_refuses_a_sampled_objective() -> None:
    from lightning_modules.dpo import DPOModule

    with pytest.raises(UserInputError, match=r"FilteredBC\(\) trains on N responses sampled per prompt.*"
                                             r"model\.class_path=lightning_modules\.onpolicy\.OnPolicyModule"):
        DPOModule(model_name_or_path="unused", objective=FilteredBC())  # fails before any model is loaded


# --------------------------------------------------------------------- pairs


def pairs_of(pairs) -> list[tuple[int, int, int]]:
    return list(zip(pairs.prompt.tolist(), pairs.chosen.tolist(), pairs.rejected.tolist()))


def test_build_pairs_best_worst() -> None:
    pairs = build_pairs(t(R), mask=mask())
    # p0: best 1 (r 3) vs worst 0 (r 1); p1: best 1 (r 2) vs worst 0 (r 0), the padding's r 5 is out
    assert pairs_of(pairs) == [(0, 1, 0), (1, 1, 0)] and pairs.considered == 2
    assert pairs.prompt.dtype == pairs.chosen.dtype == torch.long
    kept = build_pairs(t(R), mask=mask(), min_gap=1.5)  # both gaps are 2 > 1.5
    assert pairs_of(kept) == pairs_of(pairs)
    none = build_pairs(t(R), mask=mask(), min_gap=2.0)  # the gap must be strictly larger
    assert pairs_of(none) == [] and none.considered == 2 and none.kept_fraction == 0.0
    unmasked = build_pairs(t(R))  # without the mask p1's best is sample 2
    assert pairs_of(unmasked) == [(0, 1, 0), (1, 2, 0)]


def test_build_pairs_all() -> None:
    pairs = build_pairs(t(R), mode="all", mask=mask())
    # p0: (0,1) gap 2 → 1 over 0; (0,2) gap 1 → 2 over 0; (1,2) gap 1 → 1 over 2; p1: only (0,1) is valid
    assert pairs_of(pairs) == [(0, 1, 0), (0, 2, 0), (0, 1, 2), (1, 1, 0)]
    assert pairs.considered == 4 and pairs.kept_fraction == 1.0
    wide = build_pairs(t(R), mode="all", mask=mask(), min_gap=1.0)  # gaps of exactly 1 are dropped
    assert pairs_of(wide) == [(0, 1, 0), (1, 1, 0)] and wide.considered == 4 and wide.kept_fraction == 0.5


def test_build_pairs_ties_and_single_samples() -> None:
    rewards = t([[2.0, 2.0, 1.0], [1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[True] * 3, [True] * 3, [True, False, False]])
    everything = build_pairs(rewards, mode="all", mask=m)
    # p0: (0,1) tie dropped, (0,2), (1,2); p1: all three tied; p2: one valid sample, no candidate
    assert pairs_of(everything) == [(0, 0, 2), (0, 1, 2)] and everything.considered == 3 + 3
    best_worst = build_pairs(rewards, mask=m)  # p0: 0 (first of the tie) vs 2; p1: tie, no pair
    assert pairs_of(best_worst) == [(0, 0, 2)] and best_worst.considered == 2


def test_gather_pairs() -> None:
    pairs = build_pairs(t(R), mode="all", mask=mask())  # [(0,1,0), (0,2,0), (0,1,2), (1,1,0)]
    chosen, rejected = gather_pairs(t(LP), pairs)
    torch.testing.assert_close(chosen, t([-2.0, -3.0, -2.0, -1.5]))
    torch.testing.assert_close(rejected, t([-1.0, -1.0, -3.0, -0.5]))
    per_reference = torch.arange(12.0).reshape(2, 3, 2)  # (P, N, K): value = 6p + 2n + k
    chosen, rejected = gather_pairs(per_reference, pairs)
    torch.testing.assert_close(chosen[3], t([6 + 2, 6 + 3]))
    torch.testing.assert_close(rejected[2], t([4.0, 5.0]))
    with pytest.raises(ValueError, match="values must have shape"):
        gather_pairs(t([1.0, 2.0]), pairs)


def test_build_pairs_errors() -> None:
    with pytest.raises(ValueError, match="mode"):
        build_pairs(t(R), mode="random")
    with pytest.raises(ValueError, match="min_gap"):
        build_pairs(t(R), min_gap=-1.0)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        build_pairs(t(R), mask=mask()[:, :2])
    with pytest.raises(ValueError, match="rewards must have shape"):
        build_pairs(t(R[0]))


# --------------------------------------------------------------------- running baseline


def test_running_baseline_ema_and_step() -> None:
    b = RunningBaseline(decay=0.9)
    assert b.value is None
    assert b.update(t(R), mask()) == pytest.approx(8 / 5)  # first update: the valid mean, 8/5
    assert b.update(t([4.0])) == pytest.approx(0.9 * 1.6 + 0.1 * 4.0)  # 1.84
    fresh = RunningBaseline(decay=0.5)
    assert fresh.step(t([2.0, 4.0])) == pytest.approx(3.0)  # first batch: its own mean
    assert fresh.step(t([7.0])) == pytest.approx(3.0)  # then the value before the batch...
    assert fresh.value == pytest.approx(0.5 * 3 + 0.5 * 7)  # ...which the batch then updates to 5
    with pytest.raises(ValueError, match="decay"):
        RunningBaseline(decay=1.0)


def test_running_baseline_state_dict_round_trip() -> None:
    batches = [t([1.0, 2.0]), t([5.0]), t([0.0, 3.0])]
    uninterrupted = RunningBaseline(decay=0.8)
    values = [uninterrupted.step(x) for x in batches]
    first = RunningBaseline(decay=0.8)
    first.step(batches[0])
    state = first.state_dict()
    resumed = RunningBaseline()  # default decay 0.9, replaced by the saved 0.8
    resumed.load_state_dict(state)
    assert resumed.decay == 0.8 and resumed.value == pytest.approx(1.5)
    assert [resumed.step(x) for x in batches[1:]] == pytest.approx(values[1:])
    assert resumed.state_dict() == pytest.approx(uninterrupted.state_dict())
    empty = RunningBaseline()
    empty.load_state_dict(RunningBaseline().state_dict())
    assert empty.value is None
