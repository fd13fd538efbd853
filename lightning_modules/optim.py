"""Optimizer and learning-rate schedule injection.

Modules take an `optimizer` factory (called with the trainable parameters) and an `lr_scheduler`
factory (called with the optimizer and the total number of optimizer steps), both chosen in YAML
by `class_path`, e.g.::

    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 5.0e-7, weight_decay: 0.0}
    lr_scheduler:
      class_path: lightning_modules.optim.LinearWarmupDecay
      init_args: {warmup_ratio: 0.1}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

OptimizerFactory = Callable[[Iterable], Optimizer]
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]


def linear_warmup_decay(step: int, *, warmup_steps: int, total_steps: int, final_ratio: float = 0.0) -> float:
    """LR multiplier: 0 → 1 linearly over `warmup_steps`, then 1 → `final_ratio` linearly at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / remaining)
    return 1.0 - (1.0 - final_ratio) * progress


def constant_with_warmup(step: int, *, warmup_steps: int) -> float:
    """LR multiplier: linear warmup over `warmup_steps`, then constant 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def check_warmup_ratio(warmup_ratio: float) -> None:
    """Reject a warmup fraction outside [0, 1) with a message naming the key."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"lr_scheduler.warmup_ratio must be in [0, 1), got {warmup_ratio}")


class LinearWarmupDecay(LambdaLR):
    """Linear warmup for `warmup_ratio` of training, then linear decay (the RefDPO / DPO default)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.1, final_ratio: float = 0.0):
        """Build the schedule.

        Args:
            optimizer: optimizer whose learning rate is scheduled.
            total_steps: total optimizer steps of the run (filled in by the module from the trainer).
            warmup_ratio: fraction of `total_steps` spent warming up linearly from 0.
            final_ratio: learning-rate multiplier reached at the last step.
        """
        check_warmup_ratio(warmup_ratio)
        warmup = int(round(warmup_ratio * total_steps))
        super().__init__(
            optimizer,
            lambda step: linear_warmup_decay(step, warmup_steps=warmup, total_steps=total_steps, final_ratio=final_ratio),
        )


class ConstantWithWarmup(LambdaLR):
    """Linear warmup for `warmup_ratio` of training, then a constant learning rate."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.0):
        """Build the schedule.

        Args:
            optimizer: optimizer whose learning rate is scheduled.
            total_steps: total optimizer steps of the run (filled in by the module from the trainer).
            warmup_ratio: fraction of `total_steps` spent warming up linearly from 0.
        """
        check_warmup_ratio(warmup_ratio)
        warmup = int(round(warmup_ratio * total_steps))
        super().__init__(optimizer, lambda step: constant_with_warmup(step, warmup_steps=warmup))
