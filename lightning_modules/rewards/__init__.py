"""Reward functions for on-policy preference learning (SPEC section 5), one interface, chosen in YAML.

- `base`: `RewardFunction` (`reward(prompts, responses)` → floats; `setup`, `state_dict`) and `RewardContext`.
- `length`: `MinLength`, `MaxLength`, `ModeLength`, the programmatic length rewards of Tajwar et al. 2024.
- `synthetic`: `Synthetic`, the synthetic task's own reward (aligned / unaligned).
- `model`: `RewardModel`, any Hugging Face sequence-classification reward model (loaded lazily).

In a config: `reward: {class_path: lightning_modules.rewards.MinLength, init_args: {max_length: 64}}`.
Importing this package loads neither torch nor transformers.
"""

from lightning_modules.rewards.base import RewardContext, RewardFunction
from lightning_modules.rewards.length import LengthReward, MaxLength, MinLength, ModeLength
from lightning_modules.rewards.model import RewardModel
from lightning_modules.rewards.synthetic import Synthetic

REWARDS: dict[str, type[RewardFunction]] = {cls.name: cls for cls in (MinLength, MaxLength, ModeLength, Synthetic,
                                                                       RewardModel)}

__all__ = ["REWARDS", "LengthReward", "MaxLength", "MinLength", "ModeLength", "RewardContext", "RewardFunction",
           "RewardModel", "Synthetic"]
