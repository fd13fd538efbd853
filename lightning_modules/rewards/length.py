"""Programmatic length rewards (SPEC section 5): shorter, longer, or as long as the SFT policy usually is.

These are the rewards behind the relabelled AlpacaFarm preference sets of Tajwar et al. 2024
("Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data", section 5),
`..._minlength`, `..._maxlength` and `..._modelength`. With `n` the response length in `unit`
(`response_length`) and `L` = `max_length`, every reward lies in [0, 1]:

    min_length   r = 1 − min(n, L) / L            shorter is better; the empty response scores 1
    max_length   r = min(n, L) / L                longer is better, saturating at L
    mode_length  r = max(0, 1 − |n − m| / L)      m = the mode of the SFT policy's response lengths

Example (unit "words", L = 4): "a b c" has n = 3, so min_length 0.25, max_length 0.75, and with
m = 2 mode_length 0.75. The prompt is ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

from datamodules.chat import Prompt
from datamodules.utils.errors import UserInputError
from lightning_modules.rewards.base import RewardContext, RewardFunction

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Unit = Literal["words", "characters", "tokens"]
UNITS: tuple[str, ...] = get_args(Unit)


def response_lengths(responses: Sequence[str], unit: Unit, tokenizer: PreTrainedTokenizerBase | None = None
                     ) -> list[int]:
    """Length of each response: whitespace-separated words, characters, or tokens of `tokenizer`
    (no special tokens added)."""
    if unit == "words":
        return [len(r.split()) for r in responses]
    if unit == "characters":
        return [len(r) for r in responses]
    if tokenizer is None:
        raise RuntimeError("unit='tokens' counts with the policy's tokenizer, which is given by "
                           "setup(context) (context.tokenizer): call setup before scoring")
    return [len(ids) for ids in tokenizer(list(responses), add_special_tokens=False)["input_ids"]] if responses else []


def length_mode(lengths: Sequence[int]) -> int:
    """The most frequent length; a tie goes to the smallest (so the estimate is order-independent)."""
    if not lengths:
        raise ValueError("cannot take the mode of no lengths")
    counts = Counter(lengths)
    return min(counts, key=lambda n: (-counts[n], n))


class LengthReward(RewardFunction):
    """Shared part of the length rewards: the unit, `L` = max_length, and the tokenizer for "tokens"."""

    def __init__(self, max_length: int = 256, unit: Unit = "words") -> None:
        """Build the reward.

        Args:
            max_length: L, the length (in `unit`) at which the reward saturates.
            unit: What n counts: "words" (split on whitespace), "characters", or "tokens" (policy tokenizer).
        """
        if max_length < 1:
            raise UserInputError(f"model.init_args.reward.init_args.max_length must be >= 1, got {max_length}")
        if unit not in UNITS:
            raise UserInputError(f"model.init_args.reward.init_args.unit={unit!r}: use one of {list(UNITS)}")
        self.max_length, self.unit = max_length, unit
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def setup(self, context: RewardContext) -> None:
        """Keep the policy's tokenizer (only "tokens" uses it)."""
        if self.unit == "tokens":
            self.tokenizer = context.tokenizer

    def lengths(self, responses: Sequence[str]) -> list[int]:
        """n of each response, in `unit`."""
        return response_lengths(responses, self.unit, self.tokenizer)


class MinLength(LengthReward):
    """Shorter is better: r = 1 − min(n, L) / L (the `_minlength` relabelling of Tajwar et al. 2024)."""

    name = "min_length"

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        L = self.max_length
        return [1.0 - min(n, L) / L for n in self.lengths(responses)]


class MaxLength(LengthReward):
    """Longer is better: r = min(n, L) / L (the `_maxlength` relabelling of Tajwar et al. 2024)."""

    name = "max_length"

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        L = self.max_length
        return [min(n, L) / L for n in self.lengths(responses)]


class ModeLength(LengthReward):
    """Closeness to the SFT policy's usual length: r = max(0, 1 − |n − m| / L) (Tajwar et al. 2024, `_modelength`).

    m (`mode`) is the most frequent length among `samples_per_prompt` samples of the initial policy on
    the first `num_prompts` training prompts, estimated once by `setup` (ties: the smallest length),
    unless given. It is part of `state_dict`, so a resumed run keeps it and does not sample again.
    """

    name = "mode_length"

    def __init__(self, max_length: int = 256, unit: Unit = "words", mode: float | None = None, num_prompts: int = 64,
                 samples_per_prompt: int = 4) -> None:
        """Build the reward.

        Args:
            max_length: L, the distance from the mode (in `unit`) at which the reward reaches 0.
            unit: What n counts: "words" (split on whitespace), "characters", or "tokens" (policy tokenizer).
            mode: m, the target length; None estimates it in `setup` from the SFT policy's samples.
            num_prompts: How many training prompts (the first ones) the mode is estimated on.
            samples_per_prompt: Sampled responses per prompt for the mode estimate.
        """
        super().__init__(max_length, unit)
        for key, value in (("num_prompts", num_prompts), ("samples_per_prompt", samples_per_prompt)):
            if value < 1:
                raise UserInputError(f"model.init_args.reward.init_args.{key} must be >= 1, got {value}")
        self.mode, self.num_prompts, self.samples_per_prompt = mode, num_prompts, samples_per_prompt

    def setup(self, context: RewardContext) -> None:
        """Keep the tokenizer ("tokens"); estimate `mode` from the SFT policy's samples unless it is known."""
        super().setup(context)
        if self.mode is not None:
            return
        prompts = list(context.prompts())[: self.num_prompts]
        if not prompts:
            raise UserInputError("mode_length reward: there are no training prompts to estimate the mode on; "
                                 "set model.init_args.reward.init_args.mode")
        samples = context.generate(prompts, num_samples=self.samples_per_prompt)
        self.mode = float(length_mode(self.lengths([s for per_prompt in samples for s in per_prompt])))

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        if self.mode is None:
            raise RuntimeError("ModeLength.mode is unknown: call setup(context) first (it estimates the mode from "
                               "the SFT policy's samples), load a checkpoint's state_dict, or set "
                               "model.init_args.reward.init_args.mode")
        L, m = self.max_length, self.mode
        return [max(0.0, 1.0 - abs(n - m) / L) for n in self.lengths(responses)]

    def state_dict(self) -> dict[str, Any]:
        """The mode (None until estimated) and the unit it is counted in."""
        return {"mode": self.mode, "unit": self.unit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the mode; a checkpoint counted in another unit is refused (its mode would mean another length)."""
        if state.get("unit", self.unit) != self.unit:
            raise UserInputError(f"mode_length reward: the checkpoint's mode counts {state['unit']}, but "
                                 f"model.init_args.reward.init_args.unit={self.unit!r}; resume with the same unit")
        if state.get("mode") is not None:
            self.mode = float(state["mode"])
