"""What every preference objective shares: the output type, the registry, input checks, typed configs.

Conventions (SPEC.md sections 1-2):
- Inputs are per-sequence log-probs of the response tokens, summed (or length-averaged) upstream:
  `policy_chosen_logps` = logπθ(y_w|x), `policy_rejected_logps` = logπθ(y_l|x), and the same for
  the reference, all of shape (B,); multi-reference objectives take K references, shape (B, K).
- Δθ = pc − pr, Δref = rc − rr, h = Δθ − Δref (pc = policy chosen, rr = reference rejected, ...).
- Every objective returns a `PreferenceLossOutput`: per-example, *unreduced* losses (B,) and the
  detached implicit rewards r_w = β(logπθ(y_w) − logπref(y_w)), r_l likewise, each (B,).
- All math is done in float32 (inputs are cast with `.float()`), whatever the input dtype.

Two faces of each objective:
- the pure function in `OBJECTIVES[name]`, called as
  `fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=β, **options)`;
- a small typed config class (`Objective` subclass) whose constructor arguments are exactly those
  options, documented, so `--model.init_args.objective.help CDPO` lists them, and whose
  `reference_shape` says whether it takes one reference (B,) or K references (B, K).
On-policy objectives (`sampled.py`, `inputs = "samples"`) share the registry but take N scored
samples per prompt instead of pairs: `fn(logps, rewards, ref_logps, *, mask, beta, **options)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

ALPHA_MIN = 1e-6  # floor applied to multi-reference weights before renormalizing

ReferenceShape = Literal["single", "multi"]  # reference log-probs of shape (B,) or (B, K)
ObjectiveInputs = Literal["pairs", "samples"]  # (chosen, rejected) pairs, or N scored samples per prompt


@dataclass
class PreferenceLossOutput:
    """What every objective returns. All fields have shape (B,)."""

    losses: Tensor  # per-example, unreduced
    chosen_rewards: Tensor  # detached, β (logπθ(y_w) − logπref(y_w))
    rejected_rewards: Tensor  # detached, β (logπθ(y_l) − logπref(y_l))


Objective = Callable[..., PreferenceLossOutput]

LossFn = Callable[..., PreferenceLossOutput]
OBJECTIVES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator adding a pure objective function to `OBJECTIVES` under `name`."""
    def add(fn: LossFn) -> LossFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = fn
        return fn
    return add


class Objective:
    """A configured objective: its constructor arguments are the options of `OBJECTIVES[name]`.

    Subclasses set `name` (the registry entry) and `reference_shape`, and declare their options
    as typed, defaulted `__init__` arguments stored under the same attribute names. `inputs` says
    what the objective trains on: "pairs" (this call signature) or "samples" (N scored samples per
    prompt, `sampled.SampledObjective`, trained by the on-policy module only).
    """

    name: ClassVar[str]
    reference_shape: ClassVar[ReferenceShape] = "single"
    inputs: ClassVar[ObjectiveInputs] = "pairs"

    def options(self) -> dict[str, Any]:
        """The keyword options passed to the pure function (every instance attribute)."""
        return dict(vars(self))

    def __call__(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, *, beta: float, alphas: Tensor | None = None) -> PreferenceLossOutput:
        """Per-example losses; `alphas` (K,) or (B, K) only for `reference_shape == "multi"`."""
        extra = {"alphas": alphas} if self.reference_shape == "multi" else {}
        return OBJECTIVES[self.name](policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta=beta, **self.options(), **extra)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options() == self.options()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.options().items()))))


# ----------------------------------------------------------------------------- input checks

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


# ----------------------------------------------------------------------------- logging


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
