"""The non-finite guard of the shared training step.

A step whose loss or gradient norm is NaN or ±inf on any rank is skipped on every rank (no
optimizer update), counted (`skipped`, logged as `train/skipped_steps`), and after
`max_consecutive` such steps in a row training stops with `NonFiniteTrainingError` naming the
step and the likely causes. Its counters travel in checkpoints (`state_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from datamodules.utils.errors import UserInputError


class NonFiniteTrainingError(UserInputError):
    """Training produced non-finite values for too many steps in a row (printed as one paragraph, exit 2)."""


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; `record(bad, step, what)` raises after `max_consecutive` bad steps in a row."""

    max_consecutive: int = 5
    skipped: int = 0
    consecutive: int = 0

    def record(self, bad: bool, *, step: int, what: str, lr: float | None = None) -> None:
        """One optimizer step's verdict: `bad` = non-finite `what` ("loss" or "gradient norm") on some rank."""
        if not bad:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
            at_lr = f" (learning rate {lr:.3g})" if lr is not None else ""
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: the {what} was NaN or infinite for {self.consecutive} steps in a "
                f"row ({self.skipped} skipped in total), so these optimizer steps were skipped. Likely causes: a "
                f"learning rate too high{at_lr}, float16 overflow (use bfloat16 or float32), or non-finite values in "
                "the data (e.g. NaN reference log-probs). Checkpoints written before this step are intact; raise "
                "model.init_args.max_nonfinite_steps to tolerate longer streaks."
            )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
