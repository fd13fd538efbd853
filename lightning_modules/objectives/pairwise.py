"""Pairwise objectives with one reference: DPO (sigmoid), cDPO, IPO, hinge, Pref-FT.

Each is a pure function in `OBJECTIVES` (see `base` for conventions) plus its typed config class.
Reference-free DPO (RefDPO's "posterior probability" parameterization) needs no function of its
own: pass zeros as the reference log-probs, so Δref = 0 and the rewards are β·logπθ(y).
Sanity identity: with policy == reference, `sigmoid` gives exactly ln 2 ≈ 0.6931 per pair.

Adding a loss = one function decorated with `@register("name")`, one `Objective` subclass naming
its options, and one test in `tests/test_objectives.py` comparing it with a value computed by hand.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.objectives.base import Objective, PreferenceLossOutput, _rewards, _single_ref, register
from lightning_modules.objectives.likelihood import nll_loss


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
def prefft_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
             beta: float) -> PreferenceLossOutput:
    """Pref-FT: NLL of the chosen response, loss = −logπθ(y_w|x) = −policy_chosen_logps.

    References and the rejected response do not enter the loss; rewards are reported as usual.
    Sum vs per-token mean is decided upstream (`average_logps`). Shapes: inputs (B,); outputs (B,).
    """
    pc, pr, rc, rr = _single_ref(policy_chosen_logps, policy_rejected_logps,
                                 ref_chosen_logps, ref_rejected_logps, beta)
    return PreferenceLossOutput(nll_loss(pc), *_rewards(beta, pc, pr, rc, rr))



# ----------------------------------------------------------------------------- typed configs


class Sigmoid(Objective):
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(β h). No options."""

    name = "sigmoid"


class CDPO(Objective):
    """Conservative DPO: −(1−ε) log σ(βh) − ε log σ(−βh)."""

    name = "cdpo"

    def __init__(self, label_smoothing: float = 0.0):
        """cDPO options.

        Args:
            label_smoothing: ε in [0, 0.5), the assumed probability that a preference label is flipped (0 = DPO).
        """
        self.label_smoothing = label_smoothing


class IPO(Objective):
    """IPO (Azar et al. 2023, eq. 17): (h − 1/(2β))²; use with average_logps=true. No options."""

    name = "ipo"


class Hinge(Objective):
    """SLiC-style hinge: max(0, 1 − βh). No options."""

    name = "hinge"


class PrefFT(Objective):
    """Pref-FT: −logπθ(y_w|x), the NLL of the chosen response only (no negative gradient). No options."""

    name = "sft"
