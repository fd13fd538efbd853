"""Preference objectives: pure functions of per-sequence log-probs, chosen by name (`OBJECTIVES`).

Conventions (SPEC.md sections 1-2):
- Inputs are per-sequence log-probs of the response tokens, summed (or length-averaged) upstream:
  `policy_chosen_logps` = logπθ(y_w|x), `policy_rejected_logps` = logπθ(y_l|x), and the same for
  the reference, all of shape (B,); `mrpo` / `mdpo` take K references, shape (B, K).
- Δθ = pc − pr, Δref = rc − rr, h = Δθ − Δref (pc = policy chosen, rr = reference rejected, ...).
- Every objective returns a `PreferenceLossOutput`: per-example, *unreduced* losses (B,) and the
  detached implicit rewards r_w = β(logπθ(y_w) − logπref(y_w)), r_l likewise, each (B,).
- All math is done in float32 (inputs are cast with `.float()`), whatever the input dtype.
- Reference-free DPO (RefDPO's "posterior probability" parameterization) needs no function of
  its own: pass zeros as the reference log-probs, so Δref = 0 and the rewards are β·logπθ(y).
- Sanity identity: with policy == reference, `sigmoid` gives exactly ln 2 ≈ 0.6931 per pair.

Call any entry as
    OBJECTIVES[name](policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                     ref_rejected_logps, beta=beta, **options)
Each function takes only the keyword options it uses; an option it does not know is a
TypeError rather than being silently ignored.

Adding a loss = one function here decorated with `@register("name")`, plus one test in
`tests/test_objectives.py` comparing it with a value computed by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ALPHA_MIN = 1e-6  # floor applied to multi-reference weights before renormalizing


@dataclass
class PreferenceLossOutput:
    """What every objective returns. All fields have shape (B,)."""

    losses: Tensor  # per-example, unreduced
    chosen_rewards: Tensor  # detached, β (logπθ(y_w) − logπref(y_w))
    rejected_rewards: Tensor  # detached, β (logπθ(y_l) − logπref(y_l))


Objective = Callable[..., PreferenceLossOutput]
OBJECTIVES: dict[str, Objective] = {}


def register(name: str) -> Callable[[Objective], Objective]:
    """Decorator adding an objective to `OBJECTIVES` under `name`."""
    def add(fn: Objective) -> Objective:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = fn
        return fn
    return add


# ----------------------------------------------------------------------------- helpers


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _as_pairwise(*named: tuple[str, Tensor], ndim: int) -> list[Tensor]:
    """Cast to float32 and check every tensor has `ndim` dims and the same shape."""
    shape = named[0][1].shape
    for arg, x in named:
        if x.dim() != ndim or x.shape != shape:
            want = "(B,)" if ndim == 1 else "(B, K)"
            raise ValueError(f"{arg} must have shape {want} matching {named[0][0]} "
                             f"{tuple(shape)}, got {tuple(x.shape)}")
    return [x.float() for _, x in named]


def _single_ref(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> list[Tensor]:
    _check_beta(beta)
    return _as_pairwise(("policy_chosen_logps", pc), ("policy_rejected_logps", pr),
                        ("ref_chosen_logps", rc), ("ref_rejected_logps", rr), ndim=1)


def _multi_ref(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float,
               alphas: Tensor | Sequence[float] | None, objective: str) -> list[Tensor]:
    """Validate (B,) policy and (B, K) reference inputs; return them in float32 with α (B, K).

    α is broadcast to (B, K), clamped to ≥ `ALPHA_MIN` and renormalized to sum to 1 per row:
    the papers only give weights "∝" something, and renormalizing keeps the identity
    "K identical references == single-reference DPO" exact.
    """
    _check_beta(beta)
    pc, pr = _as_pairwise(("policy_chosen_logps", pc), ("policy_rejected_logps", pr), ndim=1)
    for arg, x in (("ref_chosen_logps", rc), ("ref_rejected_logps", rr)):
        if x.dim() != 2 or x.shape[0] != pc.shape[0]:
            raise ValueError(f"{objective}: {arg} must have shape (B, K) = ({pc.shape[0]}, K), "
                             f"got {tuple(x.shape)}")
    rc, rr = _as_pairwise(("ref_chosen_logps", rc), ("ref_rejected_logps", rr), ndim=2)
    if alphas is None:
        raise ValueError(f"{objective} requires alphas of shape (K,) or (B, K)")
    a = torch.as_tensor(alphas, device=pc.device).float()
    (B, K) = rc.shape
    if a.dim() not in (1, 2) or a.shape[-1] != K or (a.dim() == 2 and a.shape[0] not in (1, B)):
        raise ValueError(f"{objective}: alphas must have shape (K,) = ({K},) or "
                         f"(B, K) = ({B}, {K}), got {tuple(a.shape)}")
    a = a.expand(B, K).clamp_min(ALPHA_MIN)
    return [pc, pr, rc, rr, a / a.sum(-1, keepdim=True)]


def _rewards(beta: float, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def _ctro_clip(rc: Tensor, rr: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """CTRO clipping (Le et al. 2024, MRPO): pull auxiliary references toward the main one.

    Reference 0 is the main reference. Each auxiliary log-prob logπ_k(y), k ≥ 1, is clamped into
    [(1+ε_y)·logπ_0(y), (1−ε_y)·logπ_0(y)], with ε_w = ε·s, ε_l = ε·(1−s),
    s = |b_w| / (|b_w| + |b_l|) per example and b_y = mean_k logπ_k(y). Shapes (B, K) -> (B, K).
    """
    b_w, b_l = rc.mean(-1).abs(), rr.mean(-1).abs()  # (B,)
    s = b_w / (b_w + b_l).clamp_min(1e-12)  # both zero -> s = 0
    out = []
    for ref, eps_y in ((rc, epsilon * s), (rr, epsilon * (1 - s))):
        main = ref[:, :1]  # (B, 1)
        a, b = (1 + eps_y[:, None]) * main, (1 - eps_y[:, None]) * main
        aux = torch.maximum(torch.minimum(ref[:, 1:], torch.maximum(a, b)), torch.minimum(a, b))
        out.append(torch.cat([main, aux], dim=-1))
    return out[0], out[1]


def _harmonic_mixture(ref_logps: Tensor, alphas: Tensor) -> Tensor:
    """logπ̃(y) = −logsumexp_k(log α_k − logπ_k(y)): (B, K), (B, K) -> (B,), in log space."""
    return -torch.logsumexp(alphas.log() - ref_logps, dim=-1)


# ----------------------------------------------------------------------------- objectives


@register("sigmoid")
def sigmoid_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                 ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
                 beta: float) -> PreferenceLossOutput:
    """DPO (Rafailov et al. 2023, eq. 7): loss = −log σ(β h), h = Δθ − Δref.

    Symbols: logπθ(y_w|x) = policy_chosen_logps, logπref(y_l|x) = ref_rejected_logps, etc.
    Shapes: all inputs (B,); outputs (B,). Zeros as references give reference-free DPO.
    """
    pc, pr, rc, rr = _single_ref(policy_chosen_logps, policy_rejected_logps,
                                 ref_chosen_logps, ref_rejected_logps, beta)
    losses = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))
    return PreferenceLossOutput(losses, *_rewards(beta, pc, pr, rc, rr))


@register("cdpo")
def cdpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
              beta: float, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """Conservative DPO (Mitchell 2023, "cDPO"): labels flipped with probability ε.

    loss = −(1−ε) log σ(βh) − ε log σ(−βh), ε = label_smoothing in [0, 0.5); ε = 0 is DPO.
    Shapes: all inputs (B,); outputs (B,).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    pc, pr, rc, rr = _single_ref(policy_chosen_logps, policy_rejected_logps,
                                 ref_chosen_logps, ref_rejected_logps, beta)
    logits = beta * ((pc - pr) - (rc - rr))
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits)
              - label_smoothing * F.logsigmoid(-logits))
    return PreferenceLossOutput(losses, *_rewards(beta, pc, pr, rc, rr))


@register("ipo")
def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
             beta: float) -> PreferenceLossOutput:
    """IPO (Azar et al. 2023, eq. 17): loss = (h − 1/(2β))², h = Δθ − Δref; β is the paper's τ.

    Use with length-averaged log-probs (`average_logps=True`), as TRL does.
    Shapes: all inputs (B,); outputs (B,).
    """
    pc, pr, rc, rr = _single_ref(policy_chosen_logps, policy_rejected_logps,
                                 ref_chosen_logps, ref_rejected_logps, beta)
    losses = ((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2
    return PreferenceLossOutput(losses, *_rewards(beta, pc, pr, rc, rr))


@register("hinge")
def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
               ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
               beta: float) -> PreferenceLossOutput:
    """SLiC-style hinge (Zhao et al. 2023, calibration loss): loss = max(0, 1 − βh).

    Shapes: all inputs (B,); outputs (B,).
    """
    pc, pr, rc, rr = _single_ref(policy_chosen_logps, policy_rejected_logps,
                                 ref_chosen_logps, ref_rejected_logps, beta)
    losses = F.relu(1 - beta * ((pc - pr) - (rc - rr)))
    return PreferenceLossOutput(losses, *_rewards(beta, pc, pr, rc, rr))


@register("sft")
def sft_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
             beta: float) -> PreferenceLossOutput:
    """Pref-FT: NLL of the chosen response, loss = −logπθ(y_w|x) = −policy_chosen_logps.

    References and the rejected response do not enter the loss; rewards are reported as usual.
    Sum vs per-token mean is decided upstream (`average_logps`). Shapes: inputs (B,); outputs (B,).
    """
    pc, pr, rc, rr = _single_ref(policy_chosen_logps, policy_rejected_logps,
                                 ref_chosen_logps, ref_rejected_logps, beta)
    return PreferenceLossOutput(nll_loss(pc), *_rewards(beta, pc, pr, rc, rr))


@register("mrpo")
def mrpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *, beta: float,
              alphas: Tensor | Sequence[float] | None = None,
              clip_epsilon: float | None = None) -> PreferenceLossOutput:
    """Multi-reference preference optimization (Le et al. 2024, MRPO).

    Mixture reference: logπ̃(y) = −logsumexp_k(log α_k − logπ_k(y)), the α-weighted harmonic
    mixture of the K references (ref_*_logps[:, k] = logπ_k(y)). Then
        loss = −log σ(β[(logπθ(y_w) − logπ̃(y_w)) − (logπθ(y_l) − logπ̃(y_l))]),
    chosen reward = β(logπθ(y_w) − logπ̃(y_w)), rejected likewise.
    clip_epsilon = ε enables CTRO clipping of the auxiliary references (k ≥ 1) around the main
    reference 0 before mixing (see `_ctro_clip`); the paper uses ε = 0.1. None disables it.
    α (`alphas`, (K,) or (B, K), required) is clamped to ≥ 1e-6 and renormalized per row.
    Shapes: policy (B,), references (B, K); outputs (B,). K = 1 is DPO.
    """
    pc, pr, rc, rr, a = _multi_ref(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                   ref_rejected_logps, beta, alphas, "mrpo")
    if clip_epsilon is not None:
        if not clip_epsilon >= 0:
            raise ValueError(f"clip_epsilon must be >= 0 or None, got {clip_epsilon}")
        rc, rr = _ctro_clip(rc, rr, clip_epsilon)
    mix_c, mix_r = _harmonic_mixture(rc, a), _harmonic_mixture(rr, a)  # (B,)
    losses = -F.logsigmoid(beta * ((pc - mix_c) - (pr - mix_r)))
    return PreferenceLossOutput(losses, *_rewards(beta, pc, pr, mix_c, mix_r))


@register("mdpo")
def mdpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *, beta: float,
              alphas: Tensor | Sequence[float] | None = None) -> PreferenceLossOutput:
    """Multi-DPO: α-weighted sum of K DPO losses, one per reference.

    loss = Σ_k α_k · (−log σ(β(Δθ − Δref_k))),
    Δref_k = ref_chosen_logps[:, k] − ref_rejected_logps[:, k].
    Rewards use the α-weighted mean reference: β(logπθ(y_w) − Σ_k α_k logπ_k(y_w)), same for y_l.
    α (`alphas`, (K,) or (B, K), required) is clamped to ≥ 1e-6 and renormalized per row.
    Shapes: policy (B,), references (B, K); outputs (B,). K = 1 is DPO.
    """
    pc, pr, rc, rr, a = _multi_ref(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                   ref_rejected_logps, beta, alphas, "mdpo")
    per_ref = -F.logsigmoid(beta * ((pc - pr)[:, None] - (rc - rr)))  # (B, K)
    losses = (a * per_ref).sum(-1)
    return PreferenceLossOutput(losses, *_rewards(beta, pc, pr, (a * rc).sum(-1), (a * rr).sum(-1)))


# ----------------------------------------------------------------------------- standalone


def nll_loss(logps: Tensor, token_counts: Tensor | None = None, *,
             average: bool = False) -> Tensor:
    """Per-example negative log-likelihood −logπθ(y|x) in float32, shape (B,) -> (B,).

    With average=True it is divided by `token_counts` (B,) (clamped to ≥ 1), i.e. per-token mean.
    """
    losses = -logps.float()
    if not average:
        return losses
    if token_counts is None or token_counts.shape != logps.shape:
        got = None if token_counts is None else tuple(token_counts.shape)
        raise ValueError(f"average=True needs token_counts of shape {tuple(logps.shape)}, "
                         f"got {got}")
    return losses / token_counts.float().clamp_min(1.0)


def preference_metrics(out: PreferenceLossOutput, policy_chosen_logps: Tensor,
                       policy_rejected_logps: Tensor) -> dict[str, Tensor]:
    """Detached scalar batch means for logging; the module prefixes the stage (`train/...`)."""
    chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    return {
        "loss": out.losses.detach().mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().float().mean(),
        "logps/rejected": policy_rejected_logps.detach().float().mean(),
    }


__all__ = ["OBJECTIVES", "PreferenceLossOutput", "register", "nll_loss", "preference_metrics",
           "sigmoid_loss", "cdpo_loss", "ipo_loss", "hinge_loss", "sft_loss", "mrpo_loss",
           "mdpo_loss"]
