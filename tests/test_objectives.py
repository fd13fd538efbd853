"""Tests for `lightning_modules.objectives`: every loss against numbers worked out by hand.

Expected values are written as plain-Python arithmetic (math.log / math.exp on floats), never by
calling the code under test. The shared 2-pair batch below is used throughout:

    pair 0: Δθ = -1 - (-3) =  2.0, Δref = -1.5 - (-2.0) =  0.5, h =  1.5
    pair 1: Δθ = -2 - (-1) = -1.0, Δref = -2.0 - (-1.5) = -0.5, h = -0.5
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from lightning_modules.objectives import (
    CDPO,
    MRPO,
    OBJECTIVE_CLASSES,
    OBJECTIVES,
    PreferenceLossOutput,
    nll_loss,
    preference_metrics,
)

PC, PR, RC, RR = [-1.0, -2.0], [-3.0, -1.0], [-1.5, -2.0], [-2.0, -1.5]
H = [1.5, -0.5]  # h = Δθ − Δref per pair, see the module docstring
BETA = 0.5


def t(xs: list) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def neg_log_sigmoid(x: float) -> float:
    """−log σ(x) = log(1 + e^{−x}) on a plain float."""
    return math.log(1.0 + math.exp(-x))


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    assert actual.shape == (len(expected),)
    torch.testing.assert_close(actual, t(expected), rtol=tol, atol=tol)


def batch() -> tuple[torch.Tensor, ...]:
    return t(PC), t(PR), t(RC), t(RR)


def dpo_rewards() -> tuple[list[float], list[float]]:
    # β(pc − rc) and β(pr − rr) by hand
    return [0.5 * (-1.0 + 1.5), 0.5 * (-2.0 + 2.0)], [0.5 * (-3.0 + 2.0), 0.5 * (-1.0 + 1.5)]


def assert_same(a: PreferenceLossOutput, b: PreferenceLossOutput) -> None:
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- single reference, by hand


def test_sigmoid_hand_values() -> None:
    out = OBJECTIVES["sigmoid"](*batch(), beta=BETA)
    close(out.losses, [math.log(1 + math.exp(-0.75)), math.log(1 + math.exp(0.25))])
    chosen, rejected = dpo_rewards()
    close(out.chosen_rewards, chosen)
    close(out.rejected_rewards, rejected)
    assert chosen == [0.25, 0.0] and rejected == [-0.5, 0.25]


def test_cdpo_hand_values() -> None:
    out = OBJECTIVES["cdpo"](*batch(), beta=BETA, label_smoothing=0.1)
    expected = [0.9 * neg_log_sigmoid(0.75) + 0.1 * neg_log_sigmoid(-0.75),
                0.9 * neg_log_sigmoid(-0.25) + 0.1 * neg_log_sigmoid(0.25)]
    close(out.losses, expected)
    close(out.chosen_rewards, dpo_rewards()[0])
    close(out.rejected_rewards, dpo_rewards()[1])


def test_ipo_hand_values() -> None:
    out = OBJECTIVES["ipo"](*batch(), beta=BETA)  # 1/(2β) = 1
    close(out.losses, [(1.5 - 1.0) ** 2, (-0.5 - 1.0) ** 2])  # [0.25, 2.25]
    close(out.chosen_rewards, dpo_rewards()[0])


def test_hinge_both_sides() -> None:
    out = OBJECTIVES["hinge"](*batch(), beta=1.0)
    close(out.losses, [0.0, 1.5])  # βh = 1.5 → past the hinge; βh = −0.5 → 1 − (−0.5)
    out = OBJECTIVES["hinge"](*batch(), beta=BETA)
    close(out.losses, [1 - 0.75, 1 + 0.25])  # both inside the margin
    pc = t(PC).requires_grad_()
    OBJECTIVES["hinge"](pc, t(PR), t(RC), t(RR), beta=1.0).losses.sum().backward()
    close(pc.grad, [0.0, -1.0])  # no gradient once the margin is met


def test_sft_hand_values() -> None:
    out = OBJECTIVES["sft"](*batch(), beta=BETA)
    close(out.losses, [1.0, 2.0])
    close(out.chosen_rewards, dpo_rewards()[0])
    close(out.rejected_rewards, dpo_rewards()[1])


# --------------------------------------------------------------------- multi reference, by hand

RC2 = [[-1.5, -1.0], [-2.0, -3.0]]  # (B, K=2); column 0 is the main reference
RR2 = [[-2.0, -2.5], [-1.5, -1.52]]
ALPHA = [0.25, 0.75]


def harmonic(logps: list[float]) -> float:
    """logπ̃ = −log Σ_k α_k / π_k, written out for K = 2."""
    return -math.log(ALPHA[0] * math.exp(-logps[0]) + ALPHA[1] * math.exp(-logps[1]))


def test_mrpo_hand_values() -> None:
    out = OBJECTIVES["mrpo"](t(PC), t(PR), t(RC2), t(RR2), beta=BETA, alphas=t(ALPHA))
    mix_w = [harmonic(RC2[0]), harmonic(RC2[1])]
    mix_l = [harmonic(RR2[0]), harmonic(RR2[1])]
    assert mix_w[0] == pytest.approx(-math.log(0.25 * math.exp(1.5) + 0.75 * math.exp(1.0)))
    losses = [neg_log_sigmoid(BETA * ((PC[i] - mix_w[i]) - (PR[i] - mix_l[i]))) for i in (0, 1)]
    close(out.losses, losses)
    close(out.chosen_rewards, [BETA * (PC[i] - mix_w[i]) for i in (0, 1)])
    close(out.rejected_rewards, [BETA * (PR[i] - mix_l[i]) for i in (0, 1)])


def test_mrpo_ctro_clipping_hand_values() -> None:
    eps = 0.1
    # pair 0: b_w = (-1.5 - 1.0)/2 = -1.25, b_l = (-2.0 - 2.5)/2 = -2.25, s = 1.25/3.5
    s0 = 1.25 / 3.5
    # chosen: bounds [-1.5(1+ε s0), -1.5(1−ε s0)] = [-1.5536, -1.4464]; aux -1.0 → upper bound
    w0 = -1.5 * (1 - eps * s0)
    # rejected: bounds [-2.0(1+ε(1−s0)), -2.0(1−ε(1−s0))] = [-2.1286, -1.8714]; -2.5 → lower bound
    l0 = -2.0 * (1 + eps * (1 - s0))
    # pair 1: b_w = -2.5, b_l = -1.51, s = 2.5/4.01
    s1 = 2.5 / 4.01
    w1 = -2.0 * (1 + eps * s1)  # bounds [-2.1247, -1.8753]; aux -3.0 → lower bound
    l1 = -1.52  # bounds [-1.5565, -1.4435] contain -1.52: unchanged
    mix_w = [harmonic([-1.5, w0]), harmonic([-2.0, w1])]
    mix_l = [harmonic([-2.0, l0]), harmonic([-1.5, l1])]
    out = OBJECTIVES["mrpo"](t(PC), t(PR), t(RC2), t(RR2), beta=BETA, alphas=t(ALPHA),
                             clip_epsilon=eps)
    close(out.losses, [neg_log_sigmoid(BETA * ((PC[i] - mix_w[i]) - (PR[i] - mix_l[i])))
                       for i in (0, 1)])
    close(out.chosen_rewards, [BETA * (PC[i] - mix_w[i]) for i in (0, 1)])
    close(out.rejected_rewards, [BETA * (PR[i] - mix_l[i]) for i in (0, 1)])
    unclipped = OBJECTIVES["mrpo"](t(PC), t(PR), t(RC2), t(RR2), beta=BETA, alphas=t(ALPHA))
    assert not torch.allclose(out.losses, unclipped.losses)


def test_mrpo_ctro_zero_epsilon_is_dpo_on_main_reference() -> None:
    out = OBJECTIVES["mrpo"](t(PC), t(PR), t(RC2), t(RR2), beta=BETA, alphas=t(ALPHA),
                             clip_epsilon=0.0)
    main = OBJECTIVES["sigmoid"](t(PC), t(PR), t(RC2)[:, 0], t(RR2)[:, 0], beta=BETA)
    assert_same(out, main)


def test_mdpo_hand_values() -> None:
    out = OBJECTIVES["mdpo"](t(PC), t(PR), t(RC2), t(RR2), beta=BETA, alphas=t(ALPHA))
    losses = [sum(ALPHA[k] * neg_log_sigmoid(BETA * ((PC[i] - PR[i]) - (RC2[i][k] - RR2[i][k])))
                  for k in (0, 1)) for i in (0, 1)]
    close(out.losses, losses)
    close(out.chosen_rewards, [BETA * (PC[0] - (0.25 * -1.5 + 0.75 * -1.0)),
                               BETA * (PC[1] - (0.25 * -2.0 + 0.75 * -3.0))])
    close(out.rejected_rewards, [BETA * (PR[0] - (0.25 * -2.0 + 0.75 * -2.5)),
                                 BETA * (PR[1] - (0.25 * -1.5 + 0.75 * -1.52))])


# --------------------------------------------------------------------- identities


def test_dpo_is_ln2_when_policy_equals_reference() -> None:
    x, y = torch.randn(3), torch.randn(3)
    close(OBJECTIVES["sigmoid"](x, y, x, y, beta=0.1).losses, [math.log(2)] * 3)


def test_cdpo_zero_smoothing_is_sigmoid() -> None:
    assert_same(OBJECTIVES["cdpo"](*batch(), beta=BETA, label_smoothing=0.0),
                OBJECTIVES["sigmoid"](*batch(), beta=BETA))


def test_reference_free_is_sigmoid_with_zero_reference() -> None:
    zeros = torch.zeros(2)
    out = OBJECTIVES["sigmoid"](t(PC), t(PR), zeros, zeros, beta=BETA)
    close(out.losses, [neg_log_sigmoid(BETA * 2.0), neg_log_sigmoid(BETA * -1.0)])
    close(out.chosen_rewards, [BETA * -1.0, BETA * -2.0])  # β logπθ(y_w)


@pytest.mark.parametrize("name", ["mrpo", "mdpo"])
def test_single_reference_is_sigmoid(name: str) -> None:
    out = OBJECTIVES[name](t(PC), t(PR), t(RC)[:, None], t(RR)[:, None], beta=BETA, alphas=t([1.0]))
    assert_same(out, OBJECTIVES["sigmoid"](*batch(), beta=BETA))


@pytest.mark.parametrize("name,options", [("mrpo", {}), ("mrpo", {"clip_epsilon": 0.1}),
                                          ("mdpo", {})])
def test_identical_references_are_sigmoid(name: str, options: dict) -> None:
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(4, generator=g) for _ in range(4))
    alphas = torch.rand(4, 3, generator=g) + 0.05  # random, not normalized
    out = OBJECTIVES[name](pc, pr, rc[:, None].expand(4, 3), rr[:, None].expand(4, 3),
                           beta=0.3, alphas=alphas, **options)
    assert_same(out, OBJECTIVES["sigmoid"](pc, pr, rc, rr, beta=0.3))


@pytest.mark.parametrize("name", ["mrpo", "mdpo"])
def test_alpha_vector_broadcast_and_normalization(name: str) -> None:
    fn, args = OBJECTIVES[name], (t(PC), t(PR), t(RC2), t(RR2))
    as_vector = fn(*args, beta=BETA, alphas=t(ALPHA))
    assert_same(as_vector, fn(*args, beta=BETA, alphas=t([ALPHA, ALPHA])))
    assert_same(as_vector, fn(*args, beta=BETA, alphas=t([1.0, 3.0])))  # ∝ [0.25, 0.75]
    assert_same(as_vector, fn(*args, beta=BETA, alphas=ALPHA))  # plain list


# --------------------------------------------------------------------- gradients, dtypes, shapes


def test_sigmoid_gradient_matches_hand_formula() -> None:
    pc = t(PC).requires_grad_()
    OBJECTIVES["sigmoid"](pc, t(PR), t(RC), t(RR), beta=BETA).losses.sum().backward()
    # d/dpc −log σ(βh) = −β σ(−βh) = −β / (1 + e^{βh})
    close(pc.grad, [-BETA / (1 + math.exp(BETA * h)) for h in H])


def registry_args(name: str, dtype: torch.dtype = torch.float32) -> tuple[tuple, dict]:
    pc, pr = t(PC).to(dtype).requires_grad_(), t(PR).to(dtype).requires_grad_()
    if name in ("mrpo", "mdpo"):
        return (pc, pr, t(RC2).to(dtype), t(RR2).to(dtype)), {"alphas": t(ALPHA)}
    return (pc, pr, t(RC).to(dtype), t(RR).to(dtype)), {}


PAIRWISE = sorted(name for name, cls in OBJECTIVE_CLASSES.items() if cls.inputs == "pairs")


@pytest.mark.parametrize("name", PAIRWISE)  # the sampled objectives: tests/test_sampled_objectives.py
def test_registry_signature_shapes_and_detached_rewards(name: str) -> None:
    fn = OBJECTIVES[name]
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:4]] == ["policy_chosen_logps", "policy_rejected_logps",
                                            "ref_chosen_logps", "ref_rejected_logps"]
    assert params[4].name == "beta" and params[4].kind is inspect.Parameter.KEYWORD_ONLY
    for dtype in (torch.float32, torch.bfloat16):
        args, options = registry_args(name, dtype)
        out = fn(*args, beta=BETA, **options)
        assert isinstance(out, PreferenceLossOutput)
        for x in (out.losses, out.chosen_rewards, out.rejected_rewards):
            assert x.shape == (2,) and x.dtype == torch.float32
        assert out.losses.requires_grad
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_mrpo_float16_large_magnitudes_are_finite() -> None:
    half = torch.float16
    pc = torch.tensor([-3000.0, -2500.0], dtype=half)
    pr = torch.tensor([-3100.0, -2400.0], dtype=half)
    rc = torch.tensor([[-3000.0, -2900.0], [-2600.0, -2450.0]], dtype=half)
    rr = torch.tensor([[-3050.0, -3200.0], [-2300.0, -2500.0]], dtype=half)
    for clip in (None, 0.1):
        out = OBJECTIVES["mrpo"](pc, pr, rc, rr, beta=0.1, alphas=[0.5, 0.5], clip_epsilon=clip)
        assert torch.isfinite(out.losses).all() and torch.isfinite(out.chosen_rewards).all()
    # pair 0 with equal weights: logπ̃(y_w) = −log(½e^{3000} + ½e^{2900}) ≈ −3000 + log 2
    expected = 0.1 * (-3000 - (-3000 + math.log(2)))
    assert out.chosen_rewards[0].item() == pytest.approx(expected, abs=1e-3)


# --------------------------------------------------------------------- errors


def test_clear_errors() -> None:
    pc, pr, rc, rr = batch()
    with pytest.raises(ValueError, match="alphas"):
        OBJECTIVES["mrpo"](pc, pr, t(RC2), t(RR2), beta=BETA)
    with pytest.raises(ValueError, match="alphas"):
        OBJECTIVES["mdpo"](pc, pr, t(RC2), t(RR2), beta=BETA, alphas=t([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \(B, K\)"):
        OBJECTIVES["mrpo"](pc, pr, rc, rr, beta=BETA, alphas=t([1.0]))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        OBJECTIVES["sigmoid"](pc, pr, t(RC2), rr, beta=BETA)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        OBJECTIVES["ipo"](pc, pr[:1], rc, rr, beta=BETA)
    for bad in (-0.1, 0.5):
        with pytest.raises(ValueError, match="label_smoothing"):
            OBJECTIVES["cdpo"](pc, pr, rc, rr, beta=BETA, label_smoothing=bad)
    with pytest.raises(ValueError, match="beta"):
        OBJECTIVES["ipo"](pc, pr, rc, rr, beta=0.0)
    with pytest.raises(TypeError):  # an option the loss does not use is not silently ignored
        OBJECTIVES["sigmoid"](pc, pr, rc, rr, beta=BETA, label_smoothing=0.1)


# --------------------------------------------------------------------- metrics and NLL


def test_preference_metrics_hand_values() -> None:
    out = PreferenceLossOutput(losses=t([0.2, 0.6]).requires_grad_(),
                               chosen_rewards=t([0.3, -0.1]), rejected_rewards=t([0.1, 0.2]))
    m = preference_metrics(out, t([-1.0, -2.0]).requires_grad_(), t([-3.0, -4.0]))
    expected = {"loss": 0.4, "rewards/chosen": 0.1, "rewards/rejected": 0.15,
                "rewards/margins": (0.2 + -0.3) / 2, "rewards/accuracies": 0.5,
                "logps/chosen": -1.5, "logps/rejected": -3.5}
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key].shape == () and not m[key].requires_grad
        assert m[key].item() == pytest.approx(value, abs=1e-6), key
    tie = PreferenceLossOutput(t([0.1]), t([0.2]), t([0.2]))  # a tie is not a correct ranking
    assert preference_metrics(tie, t([-1.0]), t([-1.0]))["rewards/accuracies"].item() == 0.0


def test_nll_loss_sum_and_average() -> None:
    logps, counts = t([-6.0, -2.0]), torch.tensor([3, 4])
    close(nll_loss(logps), [6.0, 2.0])
    close(nll_loss(logps, counts, average=True), [2.0, 0.5])
    with pytest.raises(ValueError, match="token_counts"):
        nll_loss(logps, average=True)


# --------------------------------------------------------------------- typed configs


def test_registry_and_typed_configs_name_the_same_objectives() -> None:
    assert set(OBJECTIVE_CLASSES) == set(OBJECTIVES)
    assert {"sigmoid", "mrpo"} <= set(PAIRWISE) and "filtered_bc" not in PAIRWISE


FIRST_ARGUMENTS = {"pairs": ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"],
                   "samples": ["logps", "rewards", "ref_logps"]}
PER_CALL = {"beta", "alphas", "mask", "running_baseline"}  # passed by the module at each call, not configured


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_registered_objective_has_a_typed_config(name: str) -> None:
    cls = OBJECTIVE_CLASSES[name]
    assert cls.name == name and name in OBJECTIVES
    params = inspect.signature(OBJECTIVES[name]).parameters
    assert list(params)[:len(FIRST_ARGUMENTS[cls.inputs])] == FIRST_ARGUMENTS[cls.inputs]
    # the config's constructor arguments are exactly the pure function's options (besides per-call inputs)
    fn_options = {p.name for p in params.values() if p.kind is p.KEYWORD_ONLY and p.name not in PER_CALL}
    assert set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"} == fn_options
    assert (cls.reference_shape == "multi") == ("alphas" in params)


def test_typed_config_calls_its_function_with_its_options() -> None:
    assert_same(CDPO(label_smoothing=0.2)(*batch(), beta=BETA),
                OBJECTIVES["cdpo"](*batch(), beta=BETA, label_smoothing=0.2))
    g = torch.Generator().manual_seed(1)
    rc, rr = -10 * torch.rand(2, 3, generator=g), -10 * torch.rand(2, 3, generator=g)
    alphas = t([0.2, 0.3, 0.5])
    assert_same(MRPO(clip_epsilon=0.1)(t(PC), t(PR), rc, rr, beta=BETA, alphas=alphas),
                OBJECTIVES["mrpo"](t(PC), t(PR), rc, rr, beta=BETA, alphas=alphas, clip_epsilon=0.1))
    assert CDPO(0.1) == CDPO(0.1) != CDPO(0.2) and repr(CDPO(0.1)) == "CDPO(label_smoothing=0.1)"
    with pytest.raises(ValueError, match="label_smoothing"):  # the function still validates the option
        CDPO(label_smoothing=0.7)(*batch(), beta=BETA)
