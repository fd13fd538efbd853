"""`BanditModule`: the on-policy study's categorical bandit, trained with any objective (SPEC section 5).

    model:
      class_path: lightning_modules.bandit.BanditModule
      init_args:
        objective: Sigmoid          # pairwise (Sigmoid = DPO, IPO, ...) on all pairs of the N samples, or
                                    # FilteredBC, BoNNegative, AWR, RWR, Reinforce on the N samples themselves
        mode: on_policy             # on_policy: resample from the current policy; offline: one batch from π_data
        num_samples: 8              # N actions per context
        reuse: 1                    # gradient steps on each sampled batch
    data:
      class_path: datamodules.bandit.BanditDataModule
      init_args: {reward: unaligned, n_contexts: 64}

Before the first training step the policy is fitted to π_data (`policy.fit_to`: KL(π‖π_data), Adam,
`prefit_steps` at `prefit_lr`); a buffer marks it done, so it is part of the weights and a resumed run
does not redo it. A step with `global_step % reuse == 0` starts a sampling round: `on_policy` draws N
actions per context from the current policy, `offline` draws them from π_data at the first round only
and keeps them for every later step. Each round queries C·N rewards (`train/reward_queries` counts
them). Every step trains on the round: sampled objectives on the (C, N) log-probs, pairwise ones on
`build_pairs(mode=pairs)` of them, with log π_data as the reference log-probs.

Logged every step (no sampling in the exact ones): `train/reward`, the mean reward of `eval_samples` fresh
actions per context from the current policy (never counted as queries); `train/expected_reward`, its
exact value Σ_a π(a|x) r(a); `train/kl_to_data` = KL(π‖π_data) and `train/entropy`, exact, all averaged
over contexts; `train/reward_queries`; `train/loss`; `train/sample_reward` (the round's samples).
Resume contract: the round (actions, rewards, baseline), both generators and the query count are in
the checkpoint (`bandit`), so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from datamodules.utils.errors import UserInputError
from lightning_modules.bandit.policy import (BanditPolicy, entropy, expected_reward, fit_to, kl_to,
                                             sample_actions)
from lightning_modules.objectives import FilteredBC, Objective
from lightning_modules.onpolicy.pairs import PairMode, RunningBaseline, build_pairs, gather_pairs
from lightning_modules.optim import OptimizerFactory
from lightning_modules.runtime.run_dir import mark_latest

Mode = Literal["offline", "on_policy"]


def default_optimizer(params) -> torch.optim.Optimizer:
    """Adam, lr 1e-3 (the shipped configs set their own)."""
    return torch.optim.Adam(params, lr=1e-3)


class BanditModule(L.LightningModule):
    """A `BanditPolicy` trained on N sampled actions per context of a `datamodules.bandit.BanditDataModule`."""

    def __init__(
        self,
        objective: Objective = FilteredBC(),
        mode: Mode = "on_policy",
        num_samples: int = 8,
        reuse: int = 1,
        beta: float = 0.1,
        pairs: PairMode = "all",
        min_reward_gap: float = 0.0,
        optimizer: OptimizerFactory = default_optimizer,
        context_dim: int = 100,
        n_actions: int = 100,
        prefit_steps: int = 100,
        prefit_lr: float = 0.01,
        eval_samples: int | None = None,
        baseline_decay: float = 0.9,
        seed: int | None = None,
    ):
        """The bandit learner.

        Args:
            objective: pairwise (Sigmoid = DPO, IPO, ... on pairs of the samples) or sampled (FilteredBC, BoNNegative, AWR, RWR, Reinforce).
            mode: on_policy (N fresh actions per context from the current policy every round) or offline (one round from π_data).
            num_samples: N, actions sampled per context in a round.
            reuse: gradient steps per round (sample reuse); on_policy resamples every `reuse` steps.
            beta: β of the objective (DPO / IPO inverse temperature; weight of bon_negative's negative term).
            pairs: pairwise objectives: all (every pair of the N samples) or best_worst (one pair per context).
            min_reward_gap: pairwise objectives: keep a pair only when its reward gap exceeds this.
            optimizer: optimizer factory called with the policy's parameters (class_path + init_args).
            context_dim: size of a context vector (must match data.context_dim).
            n_actions: number of actions (must match data.n_actions).
            prefit_steps: Adam steps fitting the policy to π_data (min KL(π‖π_data)) before training; 0 = none.
            prefit_lr: learning rate of that pre-fit.
            eval_samples: actions per context drawn (and never counted) for train/reward; default num_samples.
            baseline_decay: decay of the running-mean baseline (Reinforce with baseline=running).
            seed: seed of the sampling generators; default: the run's seed (seed_everything).
        """
        super().__init__()
        for key, value, low in (("num_samples", num_samples, 1), ("reuse", reuse, 1), ("prefit_steps", prefit_steps, 0),
                                ("context_dim", context_dim, 1), ("n_actions", n_actions, 2),
                                ("eval_samples", 1 if eval_samples is None else eval_samples, 1)):
            if value < low:
                raise UserInputError(f"model.{key} must be >= {low}, got {value}")
        if not isinstance(objective, Objective):
            raise UserInputError(f"model.objective={objective!r} is not an objective; use e.g. FilteredBC, BoNNegative, "
                                 "AWR, Reinforce, Sigmoid (DPO) or IPO (`objective: AWR`, or `{class_path: "
                                 "BoNNegative, init_args: {negatives: mean}}`)")
        if objective.reference_shape == "multi":
            raise UserInputError(f"model.objective={objective!r} takes K references; the bandit has one (π_data)")
        if mode not in ("offline", "on_policy"):
            raise UserInputError(f"model.mode={mode!r} is not one of 'offline', 'on_policy'")
        if not beta > 0 or min_reward_gap < 0 or not prefit_lr > 0 or not 0 <= baseline_decay < 1:
            raise UserInputError(f"model.beta={beta} (> 0), model.min_reward_gap={min_reward_gap} (>= 0), "
                                 f"model.prefit_lr={prefit_lr} (> 0) and model.baseline_decay={baseline_decay} "
                                 "(in [0, 1)): one is out of range")
        self.objective = objective
        self.mode = mode
        self.num_samples = num_samples
        self.reuse = reuse
        self.beta = beta
        self.pair_mode = pairs
        self.min_reward_gap = min_reward_gap
        self.optimizer_factory = optimizer
        self.prefit_steps = prefit_steps
        self.prefit_lr = prefit_lr
        self.eval_samples = num_samples if eval_samples is None else eval_samples
        self.policy = BanditPolicy(context_dim, n_actions)
        self.register_buffer("prefitted", torch.zeros((), dtype=torch.bool))  # in the weights: a resume skips it
        seed = torch.initial_seed() if seed is None else seed
        self.sampler = torch.Generator().manual_seed(seed)  # training rounds
        self.evaluator = torch.Generator().manual_seed((seed + 1) % 2**64)  # train/reward (never counted)
        self.baseline = RunningBaseline(decay=baseline_decay)
        self.round: dict[str, Any] | None = None  # actions (C, N), rewards (C, N), baseline, index
        self.reward_queries = 0
        self.prefit_kl: list[float] = []  # KL(π‖π_data) during the pre-fit (this process only)

    @property
    def sampled_objective(self) -> bool:
        return self.objective.inputs == "samples"

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.policy.parameters())

    def on_fit_start(self) -> None:
        mark_latest(self.trainer)  # <root>/latest -> this run's version_N (RunLogger)

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Once per run, before the first training step: fit the policy to π_data."""
        self.check_batch(batch)
        if not bool(self.prefitted):
            if self.prefit_steps:
                self.prefit_kl = fit_to(self.policy, batch["contexts"], batch["data_logps"], steps=self.prefit_steps,
                                        lr=self.prefit_lr)
            self.prefitted.fill_(True)

    def check_batch(self, batch: dict[str, Tensor]) -> None:
        (_, dim), actions = batch["contexts"].shape, batch["data_logps"].shape[0]
        first = self.policy.net[0].in_features
        last = self.policy.net[-1].out_features
        if (dim, actions) != (first, last):
            raise UserInputError(f"model.context_dim={first} and model.n_actions={last} must match the data's "
                                 f"data.context_dim={dim} and data.n_actions={actions}")

    # ---- rounds ------------------------------------------------------------------------------------------------
    def needs_round(self) -> bool:
        if self.round is None:
            return True
        return self.mode == "on_policy" and self.global_step % self.reuse == 0

    def sample_round(self, logps: Tensor, batch: dict[str, Tensor]) -> dict[str, Any]:
        """N actions per context (from π_data offline, else from the current policy's `logps` (C, A)), scored."""
        source = batch["data_logps"].expand_as(logps) if self.mode == "offline" else logps
        actions = sample_actions(source, self.num_samples, self.sampler)  # (C, N)
        rewards = batch["rewards"][actions]  # (C, N): the reward queries
        self.reward_queries += actions.numel()
        running = self.baseline.step(rewards) if getattr(self.objective, "uses_running_baseline", False) else None
        index = 0 if self.round is None else self.round["index"] + 1
        return {"actions": actions, "rewards": rewards, "baseline": running, "index": index}

    # ---- the step ----------------------------------------------------------------------------------------------
    def objective_loss(self, logps: Tensor, rewards: Tensor, ref_logps: Tensor,
                       running_baseline: float | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on (C, N) sample log-probs, or on the pairs built from them; (loss, extra metrics)."""
        if self.sampled_objective:
            out = self.objective(logps, rewards, ref_logps, beta=self.beta, running_baseline=running_baseline)
            return out.losses.mean(), {}
        pairs = build_pairs(rewards, mode=self.pair_mode, min_gap=self.min_reward_gap)
        if len(pairs) == 0:  # no pair cleared the gap: a zero loss that still reaches every weight
            return logps.sum() * 0.0, {"pairs": torch.tensor(0.0)}
        chosen, rejected = gather_pairs(logps, pairs)
        ref_chosen, ref_rejected = gather_pairs(ref_logps, pairs)
        out = self.objective(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta)
        return out.losses.mean(), {"pairs": torch.tensor(float(len(pairs)))}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        contexts, data_logps, reward_of = batch["contexts"], batch["data_logps"], batch["rewards"]
        all_logps = self.policy(contexts)  # (C, A)
        if self.needs_round():
            self.round = self.sample_round(all_logps.detach(), batch)
        actions, rewards = self.round["actions"], self.round["rewards"]
        logps = all_logps.gather(1, actions)  # (C, N)
        loss, extra = self.objective_loss(logps, rewards, data_logps[actions], self.round["baseline"])
        with torch.no_grad():
            current = all_logps.detach()
            evaluation = sample_actions(current, self.eval_samples, self.evaluator)  # not reward queries
            metrics = {"loss": loss.detach(), "reward": reward_of[evaluation].mean(),
                       "expected_reward": expected_reward(current, reward_of).mean(),
                       "kl_to_data": kl_to(current, data_logps).mean(), "entropy": entropy(current).mean(),
                       "reward_queries": torch.tensor(float(self.reward_queries)),
                       "sample_reward": rewards.mean(), **extra}
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False,
                      batch_size=contexts.shape[0])
        return loss

    # ---- resume contract ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bandit"] = {"sampler": self.sampler.get_state(), "evaluator": self.evaluator.get_state(),
                                "round": self.round, "reward_queries": self.reward_queries,
                                "baseline": self.baseline.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["bandit"]
        self.sampler.set_state(state["sampler"])
        self.evaluator.set_state(state["evaluator"])
        self.round = state["round"]
        self.reward_queries = state["reward_queries"]
        self.baseline.load_state_dict(state["baseline"])
