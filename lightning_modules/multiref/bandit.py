"""TSW: Thompson sampling over the K references as bandit arms (SPEC section 4).

Each reference k has a Beta(a[k], b[k]) posterior over "training against k improves the policy",
starting at a = b = `prior`. Every optimizer step:
1. draw θ[k] ~ Beta(a[k], b[k]) and pick the arm k* = argmax θ; α is one-hot on k*, so the step is
   single-reference DPO (MDPO) against reference k*;
2. draw a random subset of `subset_size` validation pairs and measure the policy's preference accuracy
   on it, before the step and after it (the same pairs, so the comparison is not subset noise);
3. reward: accuracy went up → a[k*] += 1, else b[k*] += 1.
Validation and test batches use the posterior mean a / (a + b), normalized.

The draws come from a numpy generator seeded with `seed`; it is the same on every rank (so is the
policy, hence the accuracy), and its state is saved with a, b: a resumed run draws what the
uninterrupted one would have.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.utils.errors import UserInputError
from lightning_modules.multiref.base import WeightingContext, WeightingStrategy
from lightning_modules.multiref.signals import ReferenceSignals, normalized


class TSW(WeightingStrategy):
    """Thompson sampling: each step trains against one reference drawn from Beta posteriors of "accuracy went up"."""

    def __init__(self, prior: float = 5.0, subset_size: int = 32, seed: int = 0):
        """Bandit settings.

        Args:
            prior: a = b of every arm's Beta prior (the paper used 5 or 10).
            subset_size: validation pairs scored before and after each step (the reward's sample).
            seed: seed of the arm and subset draws (the same on every rank).
        """
        if not prior > 0 or subset_size < 1:
            raise UserInputError(f"model.weighting: TSW needs prior > 0 and subset_size >= 1, got prior={prior}, "
                                 f"subset_size={subset_size}")
        self.prior, self.subset_size, self.seed = float(prior), int(subset_size), int(seed)
        self.a: np.ndarray | None = None
        self.b: np.ndarray | None = None
        self.rng = np.random.default_rng(self.seed)
        self.arm: int | None = None
        self.subset: list[int] = []
        self.accuracy_before: float | None = None
        self.last_reward: float | None = None

    @property
    def prepared(self) -> bool:
        return self.a is not None

    def prepare(self, context: WeightingContext) -> None:
        if context.validation_size() == 0:
            raise UserInputError("model.weighting=TSW rewards each step with validation accuracy, but the validation "
                                 "split is empty: set data.init_args.val_split or give a validation file")
        self.a = np.full(context.num_references, self.prior)
        self.b = np.full(context.num_references, self.prior)

    def before_step(self, context: WeightingContext) -> None:
        self.arm = int(np.argmax(self.rng.beta(self.a, self.b)))
        size = min(self.subset_size, context.validation_size())
        self.subset = sorted(int(i) for i in self.rng.choice(context.validation_size(), size=size, replace=False))
        self.accuracy_before = context.validation_accuracy(self.subset)

    def alphas(self, signals: ReferenceSignals, *, training: bool, context: WeightingContext) -> Tensor:
        k = signals.num_references
        if self.a is None or len(self.a) != k:
            raise RuntimeError(f"TSW was prepared for {None if self.a is None else len(self.a)} references, "
                               f"the batch has {k}")
        if training and self.arm is not None:
            return torch.nn.functional.one_hot(torch.tensor(self.arm), k).float()
        return normalized(torch.as_tensor(self.a / (self.a + self.b), dtype=torch.float32))

    def after_step(self, context: WeightingContext) -> None:
        if self.arm is None:
            return
        improved = context.validation_accuracy(self.subset) > self.accuracy_before
        if improved:
            self.a[self.arm] += 1
        else:
            self.b[self.arm] += 1
        self.last_reward = float(improved)
        self.arm, self.subset, self.accuracy_before = None, [], None

    def state_dict(self) -> dict[str, Any]:
        return {"a": None if self.a is None else self.a.tolist(), "b": None if self.b is None else self.b.tolist(),
                "rng": copy.deepcopy(self.rng.bit_generator.state), "last_reward": self.last_reward}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.a = None if state["a"] is None else np.asarray(state["a"], dtype=np.float64)
        self.b = None if state["b"] is None else np.asarray(state["b"], dtype=np.float64)
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.last_reward = state["last_reward"]
        self.arm, self.subset, self.accuracy_before = None, [], None

    def __repr__(self) -> str:
        return f"TSW(prior={self.prior}, subset_size={self.subset_size}, seed={self.seed})"
