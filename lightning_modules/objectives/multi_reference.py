"""Multi-reference objectives: MRPO (harmonic mixture of K references, optional CTRO clipping) and MDPO.

References arrive as (B, K) log-probs; α, per example (B, K) or global (K,), comes from the caller
(a weighting strategy, or fixed weights), is clamped to ≥ 1e-6 and renormalized per row. All math
is in log space and float32 (the original notebook cast to float16 and diverged to NaN).
Identities (tested): K = 1 is `sigmoid`; K identical references are `sigmoid`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.objectives.base import Objective, PreferenceLossOutput, _multi_ref, _rewards, register


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

def per_reference_dpo_losses(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                             ref_rejected_logps: Tensor, beta: float) -> Tensor:
    """(B, K): the DPO loss of every pair against every reference, −log σ(β(Δθ − Δref_k)), in float32.

    MDPO's per-reference terms; `MultiReferenceModule` also logs their batch means (monitoring).
    """
    delta_policy = policy_chosen_logps.float() - policy_rejected_logps.float()
    return -F.logsigmoid(beta * (delta_policy[:, None] - (ref_chosen_logps.float() - ref_rejected_logps.float())))


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
    per_ref = per_reference_dpo_losses(pc, pr, rc, rr, beta)  # (B, K)
    losses = (a * per_ref).sum(-1)
    return PreferenceLossOutput(losses, *_rewards(beta, pc, pr, (a * rc).sum(-1), (a * rr).sum(-1)))


# ----------------------------------------------------------------------------- typed configs


class MRPO(Objective):
    """MRPO (Le et al. 2024): DPO against the α-weighted harmonic mixture of K references."""

    name = "mrpo"
    reference_shape = "multi"

    def __init__(self, clip_epsilon: float | None = None):
        """MRPO options.

        Args:
            clip_epsilon: ε of CTRO clipping of the auxiliary references around reference 0 (paper: 0.1); null = off.
        """
        self.clip_epsilon = clip_epsilon


class MDPO(Objective):
    """Multi-DPO: Σ_k α_k · (−log σ(β(Δθ − Δref_k))). No options."""

    name = "mdpo"
    reference_shape = "multi"
