"""The synthetic task's own reward (`datamodules.synthetic.SyntheticReward`) behind the `RewardFunction` interface."""

from __future__ import annotations

from datamodules.chat import Prompt
from datamodules.synthetic.task import SyntheticReward, Variant
from lightning_modules.rewards.base import RewardFunction


class Synthetic(RewardFunction):
    """The synthetic task's reward in [0, 1]: `aligned` (positional word match against the target) or
    `unaligned` (min length in words, `max(0, 1 − words / max_words)`); see `datamodules.synthetic.task`.

    A prompt is the raw task instruction, or a message list whose last turn is the instruction.
    """

    name = "synthetic"

    def __init__(self, variant: Variant = "aligned", max_words: int = 16) -> None:
        """Build the reward.

        Args:
            variant: "aligned" (word match against the target) or "unaligned" (shorter is better).
            max_words: Response length (in words) at which the "unaligned" reward reaches 0.
        """
        self.reward = SyntheticReward(variant, max_words)
        self.variant, self.max_words = variant, max_words

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        return self.reward(prompts, responses)
