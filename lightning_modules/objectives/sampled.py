"""On-policy ("sampled") objectives: N sampled responses per prompt, each with a scalar reward (SPEC section 5).

Tajwar et al. 2024, "Preference Fine-Tuning of LLMs Should Leverage Suboptimal On-Policy Data", compare
maximum-likelihood objectives (filtered BC, RWR, AWR) with objectives that also push probability *down*
on worse samples (best-of-N with a negative term, REINFORCE, and DPO / IPO on pairs built from the
samples by `lightning_modules.onpolicy.build_pairs`, which reuse the pairwise objectives).

Every function here shares one signature and lives in the same `OBJECTIVES` registry:

    fn(logps, rewards, ref_logps, *, mask=None, beta, **options) -> SampledLossOutput
    logps      (P, N)  logπθ(y_n|x_p) of sample n of prompt p (summed or length-averaged upstream), with grad
    rewards    (P, N)  r(x_p, y_n), no grad
    ref_logps  (P, N)  logπref(y_n|x_p), no grad, or None when the objective does not need it
    mask       (P, N)  bool, False = padding sample (a prompt may have fewer than N); None = all valid

Each loss is linear in the log-probs with detached coefficients, loss_p = Σ_n c_{p,n}·logπθ(y_n|x_p) + const,
so `weights` = c = ∂loss_p/∂logps[p, n]: negative pushes the sample's probability up, positive pushes it
down (the "negative gradient"), 0 at padding. Math in float32; padding entries (which may hold anything,
even NaN) are replaced by 0 before use. Every prompt needs at least one valid sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.objectives.base import OBJECTIVES, Objective, _check_beta, register

Negatives = Literal["worst", "sum", "mean"]
Baseline = Literal["batch", "prompt", "loo", "running", "none"]


@dataclass
class SampledLossOutput:
    """What every sampled objective returns."""

    losses: Tensor  # (P,) per-prompt, unreduced
    weights: Tensor  # (P, N) detached ∂loss_p/∂logps[p, n]; 0 at padding samples


# ----------------------------------------------------------------------------- helpers


def _samples(objective: str, logps: Tensor, rewards: Tensor, ref_logps: Tensor | None,
             mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Check the (P, N) inputs; return logps, rewards, ref_logps in float32 with padding set to 0, and the mask."""
    if logps.dim() != 2 or logps.shape[1] == 0:
        raise ValueError(f"{objective}: logps must have shape (P, N) with N >= 1, got {tuple(logps.shape)}")
    for arg, x in (("rewards", rewards), ("ref_logps", ref_logps), ("mask", mask)):
        if x is not None and x.shape != logps.shape:
            raise ValueError(f"{objective}: {arg} must have shape (P, N) = {tuple(logps.shape)} like logps, "
                             f"got {tuple(x.shape)}")
    if mask is None:
        mask = torch.ones(logps.shape, dtype=torch.bool, device=logps.device)
    elif mask.dtype != torch.bool:
        raise ValueError(f"{objective}: mask must be a bool tensor (True = valid sample), got {mask.dtype}")
    empty = (~mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{objective}: every prompt needs at least one valid sample; mask rows {empty} are all False")
    lp = torch.where(mask, logps.float(), 0.0)
    r = torch.where(mask, rewards.detach().float(), 0.0)
    ref = None if ref_logps is None else torch.where(mask, ref_logps.detach().float(), 0.0)
    return lp, r, ref, mask


def _best(r: Tensor, mask: Tensor) -> Tensor:
    """(P,) index of the highest reward among valid samples (ties: the first)."""
    return r.masked_fill(~mask, float("-inf")).argmax(-1)


def _count(mask: Tensor) -> Tensor:
    """(P, 1) number of valid samples per prompt, float."""
    return mask.sum(-1, keepdim=True).float()


def _linear(weights: Tensor, lp: Tensor, const: Tensor | float = 0.0) -> SampledLossOutput:
    """loss_p = Σ_n weights[p, n]·lp[p, n] + const, with `weights` detached."""
    weights = weights.detach()
    return SampledLossOutput((weights * lp).sum(-1) + const, weights)


def _needs_ref(objective: str, ref: Tensor | None, why: str) -> Tensor:
    if ref is None:
        raise ValueError(f"{objective}: {why} needs ref_logps of shape (P, N), got None")
    return ref


# ----------------------------------------------------------------------------- objectives


@register("filtered_bc")
def filtered_bc_loss(logps: Tensor, rewards: Tensor, ref_logps: Tensor | None = None, *,
                     mask: Tensor | None = None, beta: float) -> SampledLossOutput:
    """Filtered BC / best-of-N NLL (Tajwar et al. 2024, sec. 4): loss_p = −logπθ(y_best|x_p).

    y_best = argmax_n rewards[p, n] over valid samples (ties: the first). Maximum likelihood only: no
    sample is pushed down. `beta` and `ref_logps` are unused. Shapes: (P, N) -> losses (P,).
    """
    _check_beta(beta)
    lp, r, _, m = _samples("filtered_bc", logps, rewards, ref_logps, mask)
    return _linear(-F.one_hot(_best(r, m), lp.shape[1]).float(), lp)


@register("bon_negative")
def bon_negative_loss(logps: Tensor, rewards: Tensor, ref_logps: Tensor | None = None, *,
                      mask: Tensor | None = None, beta: float, negatives: Negatives = "worst",
                      constrained: bool = False) -> SampledLossOutput:
    """Best-of-N NLL plus a negative gradient on worse samples (Tajwar et al. 2024, sec. 4).

    loss_p = −logπθ(y_best) + β·neg_p, over the samples with reward strictly below the best:
    neg_p = ℓ(y_worst) ("worst", ties: the first), Σ ℓ(y) ("sum") or its mean ("mean"), where
    ℓ(y) = logπθ(y) = logps, or logπθ(y) − logπref(y) = logps − ref_logps when `constrained` (same
    gradient, the value is measured against the reference). neg_p = 0 when no sample is worse, so the
    loss is then `filtered_bc`. Symbols: β = beta. Shapes: (P, N) -> losses (P,).
    """
    _check_beta(beta)
    lp, r, ref, m = _samples("bon_negative", logps, rewards, ref_logps, mask)
    if constrained:
        ref = _needs_ref("bon_negative", ref, "constrained=True")
    n = lp.shape[1]
    best = _best(r, m)
    worse = m & (r < r.gather(-1, best[:, None]))  # (P, N)
    if negatives == "worst":
        coef = F.one_hot(r.masked_fill(~m, float("inf")).argmin(-1), n).float() * worse
    elif negatives == "sum":
        coef = worse.float()
    elif negatives == "mean":
        coef = worse.float() / worse.sum(-1, keepdim=True).clamp_min(1)
    else:
        raise ValueError(f"bon_negative: negatives must be 'worst', 'sum' or 'mean', got {negatives!r}")
    const = -beta * (coef * ref).sum(-1) if constrained else 0.0
    return _linear(beta * coef - F.one_hot(best, n).float(), lp, const)


def _clipped_exp(x: Tensor, temperature: float, max_weight: float | None, objective: str) -> Tensor:
    if not temperature > 0:
        raise ValueError(f"{objective}: temperature must be > 0, got {temperature}")
    if max_weight is not None and not max_weight > 0:
        raise ValueError(f"{objective}: max_weight must be > 0 or None, got {max_weight}")
    w = torch.exp(x / temperature)
    return w if max_weight is None else w.clamp_max(max_weight)


@register("rwr")
def rwr_loss(logps: Tensor, rewards: Tensor, ref_logps: Tensor | None = None, *, mask: Tensor | None = None,
             beta: float, temperature: float = 1.0, max_weight: float | None = None) -> SampledLossOutput:
    """Reward-weighted regression (Peters & Schaal 2007): loss_p = −Σ_n w_n logπθ(y_n) / n_p.

    w_n = min(exp(r_n / τ), max_weight) (no clip when max_weight is None), r_n = rewards[p, n],
    τ = temperature, n_p = number of valid samples of prompt p. `beta`, `ref_logps` unused. (P, N) -> (P,).
    """
    _check_beta(beta)
    lp, r, _, m = _samples("rwr", logps, rewards, ref_logps, mask)
    w = _clipped_exp(r, temperature, max_weight, "rwr") * m
    return _linear(-w / _count(m), lp)


@register("awr")
def awr_loss(logps: Tensor, rewards: Tensor, ref_logps: Tensor | None = None, *, mask: Tensor | None = None,
             beta: float, temperature: float = 1.0, max_weight: float | None = 20.0) -> SampledLossOutput:
    """Advantage-weighted regression (Peng et al. 2019), as in the bandit study of Tajwar et al. 2024.

    A_n = r_n − mean of the prompt's valid rewards, w_n = min(exp(A_n / τ), max_weight),
    loss_p = −Σ_n w_n logπθ(y_n) / n_p; τ = temperature. `beta`, `ref_logps` unused. (P, N) -> (P,).
    """
    _check_beta(beta)
    lp, r, _, m = _samples("awr", logps, rewards, ref_logps, mask)
    advantages = r - r.sum(-1, keepdim=True) / _count(m)
    w = _clipped_exp(advantages, temperature, max_weight, "awr") * m
    return _linear(-w / _count(m), lp)


def reinforce_rewards(logps: Tensor, rewards: Tensor, ref_logps: Tensor | None = None, *, mask: Tensor | None = None,
                      kl_coef: float = 0.0, entropy_coef: float = 0.0) -> Tensor:
    """The shaped reward r' of `reinforce_loss`, (P, N), detached, 0 at padding (e.g. to feed a running baseline).

    r' = r − kl_coef·(logπθ − logπref) − entropy_coef·logπθ. The last term is the entropy bonus:
    ∇H(π) = E[−logπ(y)·∇logπ(y)], so adding −logπθ(y) to the reward is the score-function estimator of
    the entropy gradient (rarer samples get a larger reward).
    """
    return _shaped(*_samples("reinforce", logps, rewards, ref_logps, mask), kl_coef, entropy_coef)


def _shaped(lp: Tensor, r: Tensor, ref: Tensor | None, m: Tensor, kl_coef: float, entropy_coef: float) -> Tensor:
    if not (kl_coef >= 0 and entropy_coef >= 0):
        raise ValueError(f"reinforce: kl_coef and entropy_coef must be >= 0, got {kl_coef} and {entropy_coef}")
    lp = lp.detach()
    shaped = r - entropy_coef * lp
    if kl_coef > 0:
        shaped = shaped - kl_coef * (lp - _needs_ref("reinforce", ref, "kl_coef > 0"))
    return shaped * m


@register("reinforce")
def reinforce_loss(logps: Tensor, rewards: Tensor, ref_logps: Tensor | None = None, *, mask: Tensor | None = None,
                   beta: float, baseline: Baseline = "prompt", normalize: bool = False, kl_coef: float = 0.0,
                   entropy_coef: float = 0.0, running_baseline: float | None = None) -> SampledLossOutput:
    """REINFORCE (Williams 1992) with a baseline: loss_p = −Σ_n Â_n logπθ(y_n) / n_p.

    Â_n = r'_n − b with r' = `reinforce_rewards` (reward minus kl_coef·(logπθ − logπref) minus
    entropy_coef·logπθ, all detached). b by `baseline`: "batch" mean of r' over all valid samples;
    "prompt" mean of the prompt's r'; "loo" mean of the prompt's *other* valid samples (0 for a prompt with
    one sample); "running" the scalar `running_baseline` the caller keeps (an EMA, see
    `lightning_modules.onpolicy.RunningBaseline`); "none" 0. `normalize` divides Â by its population
    std over the batch's valid samples (+1e-8), the bandit study's "normalized baseline". `beta` unused.
    Shapes: (P, N) -> losses (P,).
    """
    _check_beta(beta)
    if (baseline == "running") != (running_baseline is not None):
        raise ValueError(f"reinforce: running_baseline is required with baseline='running' and only then; "
                         f"got baseline={baseline!r}, running_baseline={running_baseline!r}")
    lp, r, ref, m = _samples("reinforce", logps, rewards, ref_logps, mask)
    shaped = _shaped(lp, r, ref, m, kl_coef, entropy_coef)  # (P, N) r', detached
    count, total = _count(m), shaped.sum(-1, keepdim=True)  # (P, 1)
    if baseline == "batch":
        b = total.sum() / count.sum()
    elif baseline == "prompt":
        b = total / count
    elif baseline == "loo":
        b = torch.where(count > 1, (total - shaped) / (count - 1).clamp_min(1), 0.0)
    elif baseline == "running":
        b = torch.tensor(float(running_baseline), device=lp.device)
    elif baseline == "none":
        b = torch.zeros((), device=lp.device)
    else:
        raise ValueError(f"reinforce: baseline must be batch, prompt, loo, running or none, got {baseline!r}")
    advantages = (shaped - b) * m
    if normalize:
        advantages = advantages / (advantages[m].std(correction=0) + 1e-8)
    return _linear(-advantages / count, lp)


# ----------------------------------------------------------------------------- typed configs


class SampledObjective(Objective):
    """A configured on-policy objective: called on (P, N) samples, not on pairs; see the module docstring."""

    inputs = "samples"

    @property
    def needs_reference(self) -> bool:
        """Whether the call needs `ref_logps` (computed at sampling time by the on-policy module)."""
        return False

    @property
    def uses_running_baseline(self) -> bool:
        """Whether the call needs `running_baseline` (the caller keeps a `RunningBaseline`)."""
        return False

    def __call__(self, logps: Tensor, rewards: Tensor, ref_logps: Tensor | None = None, *,  # type: ignore[override]
                 mask: Tensor | None = None, beta: float,
                 running_baseline: float | None = None) -> SampledLossOutput:
        """Per-prompt losses; `running_baseline` is passed on only when `uses_running_baseline`."""
        extra = {"running_baseline": running_baseline} if self.uses_running_baseline else {}
        return OBJECTIVES[self.name](logps, rewards, ref_logps, mask=mask, beta=beta, **self.options(), **extra)


class FilteredBC(SampledObjective):
    """Filtered BC: −logπθ(y_best), the NLL of the best of the N samples. No options."""

    name = "filtered_bc"


class BoNNegative(SampledObjective):
    """Best-of-N NLL plus β times the log-prob of the worse samples (a negative gradient)."""

    name = "bon_negative"

    def __init__(self, negatives: Negatives = "worst", constrained: bool = False):
        """Best-of-N with negatives.

        Args:
            negatives: which worse samples are pushed down: the worst one, the sum or the mean over all worse ones.
            constrained: use logπθ − logπref of the negatives in the loss (needs reference log-probs).
        """
        self.negatives = negatives
        self.constrained = constrained

    @property
    def needs_reference(self) -> bool:
        return self.constrained


class RWR(SampledObjective):
    """Reward-weighted regression: −Σ_n min(exp(r_n/τ), max_weight)·logπθ(y_n) / n."""

    name = "rwr"

    def __init__(self, temperature: float = 1.0, max_weight: float | None = None):
        """RWR options.

        Args:
            temperature: τ > 0 of the weights exp(r/τ).
            max_weight: clip the weights at this value; null = no clip.
        """
        self.temperature = temperature
        self.max_weight = max_weight


class AWR(SampledObjective):
    """Advantage-weighted regression: −Σ_n min(exp(A_n/τ), max_weight)·logπθ(y_n) / n, A = r − prompt mean."""

    name = "awr"

    def __init__(self, temperature: float = 1.0, max_weight: float | None = 20.0):
        """AWR options.

        Args:
            temperature: τ > 0 of the weights exp(A/τ).
            max_weight: clip the weights at this value (bandit study: 20); null = no clip.
        """
        self.temperature = temperature
        self.max_weight = max_weight


class Reinforce(SampledObjective):
    """REINFORCE with a baseline, optional KL-to-reference penalty and entropy bonus in the reward."""

    name = "reinforce"

    def __init__(self, baseline: Baseline = "prompt", normalize: bool = False, kl_coef: float = 0.0,
                 entropy_coef: float = 0.0):
        """REINFORCE options.

        Args:
            baseline: batch mean, per-prompt mean, leave-one-out mean, running (EMA kept by the module) or none.
            normalize: divide the advantages by their std over the batch's valid samples.
            kl_coef: subtract kl_coef·(logπθ − logπref) from the reward (> 0 needs reference log-probs).
            entropy_coef: add −entropy_coef·logπθ(y) to the reward (score-function entropy bonus).
        """
        self.baseline = baseline
        self.normalize = normalize
        self.kl_coef = kl_coef
        self.entropy_coef = entropy_coef

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def uses_running_baseline(self) -> bool:
        return self.baseline == "running"
