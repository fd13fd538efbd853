"""The reward interface of on-policy training: `RewardFunction` and the `RewardContext` it is set up with.

A reward scores sampled responses, one float per `(prompt, response)` pair::

    reward = MinLength(max_length=64)          # built from YAML: class_path / init_args
    reward.setup(context)                      # once, at fit start (after a checkpoint is restored)
    reward(["Hi"], ["Hello there"])            # -> [0.96875]
    checkpoint["reward"] = reward.state_dict() # resume contract: load_state_dict on restore

A `RewardFunction` is a `lightning_modules.models.generation.RewardFn` (a callable
`(prompts, responses) -> floats`), so anything that takes one takes a reward function too.
Pure Python: this module imports neither torch nor transformers.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from datamodules.chat import Prompt

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


class RewardContext(Protocol):
    """What `RewardFunction.setup` may use from the training run (provided by the on-policy module)."""

    device: torch.device
    """The device the policy trains on (where a reward model should run)."""
    tokenizer: PreTrainedTokenizerBase
    """The policy's tokenizer (token-count rewards count with it)."""

    def generate(self, prompts: Sequence[Prompt], *, num_samples: int) -> list[list[str]]:
        """`num_samples` sampled responses per prompt from the initial (SFT) policy, one list per prompt."""
        ...

    def prompts(self) -> list[Prompt]:
        """The training prompts (raw strings or chat message lists), in a fixed order."""
        ...


class RewardFunction:
    """Scores responses: `reward(prompts, responses)` → one float per response.

    Subclasses set `name` (their `REWARDS` entry), implement `score`, and store each `__init__`
    argument under an attribute of the same name (`__repr__` shows them). State that must survive a
    resume (e.g. an estimated statistic) goes through `state_dict` / `load_state_dict`.
    """

    name: ClassVar[str]

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """Rewards of `responses[i]` to `prompts[i]`; `ValueError` when the two lengths differ."""
        if len(prompts) != len(responses):
            raise ValueError(f"{type(self).__name__}: got {len(prompts)} prompts but {len(responses)} responses")
        return [float(r) for r in self.score(list(prompts), list(responses))]

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        """The rewards of equally long lists (what subclasses implement; `__call__` checks the lengths)."""
        raise NotImplementedError

    def setup(self, context: RewardContext) -> None:
        """Prepare once per fit (load a model, estimate a statistic); the default does nothing."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this reward unchanged (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (default: nothing to restore)."""

    def options(self) -> dict[str, Any]:
        """The constructor arguments, read from the attributes of the same names."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"
