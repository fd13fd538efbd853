"""The categorical bandit of the on-policy study (SPEC section 5): its contexts, data policy and rewards.

Tajwar et al. 2024 ("Preference fine-tuning of LLMs should leverage suboptimal, on-policy data"),
section 4's didactic bandit:
- contexts: `n_contexts` vectors of `context_dim` Uniform[0, 1] values (the rewards ignore them);
- actions: `n_actions` equal bins over [−1, 1]; an action is its bin index a ∈ {0, ..., n_actions − 1};
- π_data, the data (and reference) policy: the normalized histogram over those bins of `data_draws`
  draws of tanh(x), x ~ Cauchy(loc −0.7, scale 0.4). Its interior mode is near bin 20 (tanh(−0.7) = −0.60);
  the Cauchy tails pile up in the two edge bins (about 7 % of the mass in bin 0 and 4 % in bin 99);
- rewards, a Gaussian bump in the bin index: `aligned` r(a) = exp(−((a − 20)/10)²), optimal where π_data
  has mass; `unaligned` r(a) = exp(−((a − 70)/10)²), optimal where π_data has about 0.2 % per bin.

Everything is a table: actions are discrete, so π_data is a (A,) vector of log-probs and a reward is
a (A,) lookup. `BanditDataModule` serves the whole environment as the batch of every training step
(the module samples actions itself: from π_data once (offline) or from the current policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.resumable import RandomOrderSampler, ResumableDataLoader
from datamodules.utils.errors import UserInputError

RewardName = Literal["aligned", "unaligned"]
REWARD_CENTERS: dict[str, float] = {"aligned": 20.0, "unaligned": 70.0}  # optimal bin of each reward


def bin_index(values: Tensor, n_actions: int) -> Tensor:
    """The bin (0 .. n_actions − 1) of each value in [−1, 1]; bins are [−1 + 2i/A, −1 + 2(i+1)/A), the last closed."""
    return ((values + 1) / 2 * n_actions).floor().long().clamp(0, n_actions - 1)


def data_policy_counts(n_actions: int = 100, draws: int = 10_000, loc: float = -0.7, scale: float = 0.4,
                       generator: torch.Generator | None = None) -> Tensor:
    """The histogram (A,) long of `draws` draws of tanh(Cauchy(loc, scale)) over `n_actions` bins of [−1, 1]."""
    x = torch.empty(draws, dtype=torch.float64).cauchy_(loc, scale, generator=generator)
    return torch.bincount(bin_index(torch.tanh(x), n_actions), minlength=n_actions)


def bump_reward(actions: Tensor, center: float, width: float = 10.0) -> Tensor:
    """r(a) = exp(−((a − center) / width)²) for integer actions (any shape), in float32."""
    return torch.exp(-(((actions.float() - center) / width) ** 2))


def reward_table(name: RewardName, n_actions: int = 100, width: float = 10.0) -> Tensor:
    """The reward of every action, (A,): `aligned` peaks at bin 20, `unaligned` at bin 70."""
    return bump_reward(torch.arange(n_actions), REWARD_CENTERS[name], width)


@dataclass(frozen=True)
class BanditEnvironment:
    """The whole environment as tensors (the batch `BanditDataModule` serves)."""

    contexts: Tensor  # (C, D) float32, Uniform[0, 1]
    data_logps: Tensor  # (A,) float32, log π_data(a)
    rewards: Tensor  # (A,) float32, r(a)

    def as_batch(self) -> dict[str, Tensor]:
        return {"contexts": self.contexts, "data_logps": self.data_logps, "rewards": self.rewards}


def make_environment(reward: RewardName = "unaligned", n_contexts: int = 64, context_dim: int = 100,
                     n_actions: int = 100, data_draws: int = 10_000, data_loc: float = -0.7, data_scale: float = 0.4,
                     reward_width: float = 10.0, seed: int = 0) -> BanditEnvironment:
    """Build the environment from its settings (see `BanditDataModule`); the same `seed` gives the same tensors."""
    generator = torch.Generator().manual_seed(seed)
    counts = data_policy_counts(n_actions, data_draws, data_loc, data_scale, generator)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise UserInputError(
            f"data.data_draws={data_draws}: the data policy's histogram has empty bins {empty[:10]}"
            f"{' ...' if len(empty) > 10 else ''}, where log π_data = −inf (the KL to it and DPO's reference would be "
            "infinite); draw more (data.data_draws) or use fewer actions (data.n_actions)")
    data_logps = (counts.double() / counts.sum()).log().float()
    contexts = torch.rand(n_contexts, context_dim, generator=generator)
    return BanditEnvironment(contexts, data_logps, reward_table(reward, n_actions, reward_width))


class _SameBatch(Dataset):
    """`length` items, each the same environment batch."""

    def __init__(self, batch: dict[str, Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.batch


def _only(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Collate a batch of one item: the item itself."""
    return items[0]


class BanditDataModule(L.LightningDataModule):
    """The bandit environment as a data module: every training batch is the whole environment.

    A batch is `{"contexts": (C, D), "data_logps": (A,), "rewards": (A,)}`; `lightning_modules.bandit.BanditModule`
    samples N actions per context from it (π_data or the current policy) and looks their rewards up.
    """

    def __init__(
        self,
        reward: RewardName = "unaligned",
        n_contexts: int = 64,
        context_dim: int = 100,
        n_actions: int = 100,
        data_draws: int = 10_000,
        data_loc: float = -0.7,
        data_scale: float = 0.4,
        reward_width: float = 10.0,
        seed: int = 0,
        steps_per_epoch: int = 100,
    ):
        """The environment's settings (the defaults are SPEC section 5's).

        Args:
            reward: aligned (optimum at bin 20, where π_data has mass) or unaligned (optimum at bin 70, where it has little).
            n_contexts: contexts per batch (the policy is trained on all of them at every step).
            context_dim: size of each Uniform[0, 1] context vector (the policy's input size).
            n_actions: number of actions, equal bins over [−1, 1].
            data_draws: draws of tanh(Cauchy(data_loc, data_scale)) whose histogram is π_data.
            data_loc: location of the Cauchy distribution behind π_data.
            data_scale: scale of the Cauchy distribution behind π_data.
            reward_width: width w of the reward bump exp(−((a − center)/w)²), in bins.
            seed: seed of π_data's draws and of the contexts (the environment; the run's seed_everything is the training's).
            steps_per_epoch: training steps per Lightning epoch (each step gets the same batch; bookkeeping only).
        """
        super().__init__()
        if reward not in REWARD_CENTERS:
            raise UserInputError(f"data.reward={reward!r} is not one of {list(REWARD_CENTERS)}")
        for key, value in (("n_contexts", n_contexts), ("context_dim", context_dim), ("data_draws", data_draws),
                           ("steps_per_epoch", steps_per_epoch)):
            if value < 1:
                raise UserInputError(f"data.{key} must be >= 1, got {value}")
        if n_actions < 2:
            raise UserInputError(f"data.n_actions must be >= 2 (one action is no choice), got {n_actions}")
        if not (data_scale > 0 and math.isfinite(data_scale)) or not reward_width > 0:
            raise UserInputError(f"data.data_scale ({data_scale}) and data.reward_width ({reward_width}) must be > 0")
        self.reward = reward
        self.n_contexts = n_contexts
        self.context_dim = context_dim
        self.n_actions = n_actions
        self.data_draws = data_draws
        self.data_loc = data_loc
        self.data_scale = data_scale
        self.reward_width = reward_width
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self.environment: BanditEnvironment | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.environment is None:
            self.environment = make_environment(self.reward, self.n_contexts, self.context_dim, self.n_actions,
                                                self.data_draws, self.data_loc, self.data_scale, self.reward_width,
                                                self.seed)

    def train_dataloader(self) -> ResumableDataLoader:
        """`steps_per_epoch` batches, each the environment; its position is kept in checkpoints (exact mid-epoch resume)."""
        self.setup()
        return ResumableDataLoader(_SameBatch(self.environment.as_batch(), self.steps_per_epoch), batch_size=1,
                                   sampler=RandomOrderSampler(self.steps_per_epoch, shuffle=False), collate_fn=_only)
