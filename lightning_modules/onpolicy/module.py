"""`OnPolicyModule`: preference learning on responses sampled from the current policy (SPEC section 5).

    model:
      class_path: lightning_modules.onpolicy.OnPolicyModule
      init_args:
        objective: Sigmoid                  # pairwise (DPO, IPO, ...) on built pairs, or FilteredBC, BoNNegative,
                                            # RWR, AWR, Reinforce on all n samples (lightning_modules.objectives)
        reward: {class_path: lightning_modules.rewards.MinLength, init_args: {max_length: 64}}
        sampling: {num_samples: 4, max_new_tokens: 64, temperature: 1.0, top_k: 0, top_p: 1.0}
        iterations_per_batch: 1             # sample reuse: training steps per sampling round
    data:
      class_path: datamodules.PreferenceDataModule
      init_args: {return_prompts: true}     # the prompts to sample from (and the offline pairs to mix in)

A training step either starts a sampling round or reuses the current one. A round takes the prompts
of the step's pair batch, samples n responses to each from the current policy (`sampler`), scores them
with `reward`, computes their reference log-probs once, and (pairwise objectives) builds pairs from
the rewards: best vs worst or all pairs, skipping gaps of `min_reward_gap` or less. Every step trains
on the round; after `iterations_per_batch` steps the next step samples a new round, so the prompts of
the batches in between are not sampled from (sample reuse spends fewer prompts per step). Steps are
micro-batches: under gradient accumulation, `iterations_per_batch` counts `training_step` calls (with
trainer.accumulate_grad_batches=a and reuse 1, an optimizer step averages a fresh rounds; reuse r·a
spends one round on r optimizer steps, each seeing it a times).
A running REINFORCE baseline is stepped once per round, when it is sampled, so reuse does not fold a
round into the EMA twice.
`mixing_ratio` m blends in the batch's own offline pairs: loss = (1 − m)·on-policy + m·offline.

Logged per round: `train/samples/reward_mean`, `reward_median`, `response_length` (tokens), the
fraction of candidate pairs kept (`pairs_kept`); per step the KL estimate to the reference on the
trained samples (`train/kl`, mean of logπ − logπref), and every `log_samples_every` rounds a few
prompt → response texts in TensorBoard. Validation and test sample from their prompts with the same
settings (a fixed seed) and log `val/samples/reward_mean` etc.; the loss there is the offline one.
"""

from __future__ import annotations

import statistics
import zlib
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from datamodules.utils.errors import UserInputError
from lightning_modules.dpo import DPOModule, weighted_mean
from lightning_modules.logprobs import sequence_forward
from lightning_modules.models.zero import is_partitioned
from lightning_modules.objectives import Objective, SampledObjective, Sigmoid
from lightning_modules.onpolicy.buffer import SampleRound
from lightning_modules.onpolicy.pairs import PairMode, RunningBaseline, build_pairs
from lightning_modules.onpolicy.sampler import Sampling, prompt_ids_of, round_seed, sample_responses
from lightning_modules.rewards import RewardFunction
from lightning_modules.sams.context import sample_pair_contexts

CHECKPOINT_KEY = "onpolicy"  # under checkpoint["prefopt"]
EVAL_SEED_OFFSET = 10**9  # validation / test rounds draw from seeds no training round uses


class OnPolicyModule(DPOModule):
    """Pairwise or sampled objectives on responses sampled from the current policy and scored by `reward`."""

    selects_batch_pairs = False  # a sample scheduler selects among the sampled pairs, not the offline mix-in

    def __init__(self, model_name_or_path: str, objective: Objective = Sigmoid(), reward: RewardFunction | None = None,
                 sampling: Sampling = Sampling(), pairs: PairMode = "best_worst", min_reward_gap: float = 0.0,
                 iterations_per_batch: int = 1, mixing_ratio: float = 0.0, baseline_decay: float = 0.9,
                 log_samples_every: int = 10, reference: Literal["live", "none"] = "live", **kwargs: Any):
        """On-policy preference learning.

        Args:
            model_name_or_path: hub id or local folder of the initial (SFT) policy.
            objective: pairwise (Sigmoid, IPO, ... on built pairs) or sampled (FilteredBC, BoNNegative, RWR, AWR, Reinforce).
            reward: scores sampled responses (lightning_modules.rewards: MinLength, MaxLength, ModeLength, Synthetic, RewardModel).
            sampling: n samples per prompt and the generation settings (temperature, top_k, top_p, max_new_tokens, seed).
            pairs: pairwise objectives: best_worst (one pair per prompt) or all (every pair of the n samples).
            min_reward_gap: keep a pair only when its reward gap exceeds this.
            iterations_per_batch: training steps (micro-batches) on each sampling round (sample reuse); 1 = fresh samples.
            mixing_ratio: weight m of the batch's offline pairs: loss = (1 − m)·on-policy + m·offline.
            baseline_decay: decay of the running-mean baseline (Reinforce with baseline=running).
            log_samples_every: write a few sampled texts to TensorBoard every this many rounds (0 = never).
            reference: live (a frozen copy of the initial policy, or reference_name_or_path) or none (Δref = 0).
            **kwargs: DPOModule's (beta, average_logps, reference_name_or_path, reference_quantization, optimizer, lora, ...).
        """
        if reference not in ("live", "none"):
            raise UserInputError(f"model.reference={reference!r}: on-policy samples are new every round, so their "
                                 "reference log-probs come from a live reference (live) or none at all (none)")
        if reward is None or not callable(reward):
            raise UserInputError(f"model.reward={reward!r}: give the reward of the sampled responses, e.g. "
                                 "{class_path: lightning_modules.rewards.MinLength, init_args: {max_length: 64}}")
        if iterations_per_batch < 1 or not 0 <= mixing_ratio <= 1 or min_reward_gap < 0 or log_samples_every < 0:
            raise UserInputError(f"model.iterations_per_batch={iterations_per_batch} (>= 1), model.mixing_ratio="
                                 f"{mixing_ratio} (in [0, 1]), model.min_reward_gap={min_reward_gap} (>= 0) and "
                                 f"model.log_samples_every={log_samples_every} (>= 0): one is out of range")
        super().__init__(model_name_or_path, objective=objective, reference=reference, **kwargs)
        if self.sample_scheduler is not None and isinstance(objective, SampledObjective):
            raise UserInputError(f"model.sample_scheduler with model.objective={objective!r}: SamS selects among "
                                 "pairs; on-policy it holds with a pairwise objective (Sigmoid, IPO, ...) on the "
                                 "sampled pairs")
        self.reward = reward
        self.sampling = sampling
        self.pair_mode = pairs
        self.min_reward_gap = min_reward_gap
        self.iterations_per_batch = iterations_per_batch
        self.mixing_ratio = mixing_ratio
        self.log_samples_every = log_samples_every
        self.baseline = RunningBaseline(decay=baseline_decay)
        self.round: SampleRound | None = None
        self.rounds_sampled = 0

    @property
    def sampled_objective(self) -> bool:
        return isinstance(self.objective, SampledObjective)

    def check_objective(self, objective: Objective) -> None:
        if objective.reference_shape == "multi":
            raise UserInputError(f"model.objective={objective!r} takes K references; the on-policy module scores "
                                 "its samples against one reference")

    # ---- the reward's one-time setup (RewardContext) ---------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.trainer.datamodule.tokenizer

    def prompts(self) -> list[Any]:
        items = self.trainer.datamodule.data.get("train", [])
        missing = [i for i, item in enumerate(items[:1]) if "prompt" not in item]
        if missing:
            raise UserInputError("the on-policy module samples from the data's prompts: set "
                                 "data.init_args.return_prompts=true (datamodules.PreferenceDataModule)")
        return [item["prompt"] for item in items]

    def generate(self, prompts: list[Any], *, num_samples: int) -> list[list[str]]:
        """`num_samples` sampled responses per prompt from the policy as it is now (at fit start: the SFT policy)."""
        data = self.trainer.datamodule
        from datamodules.tokenize import encode_prompt  # the template the data module renders prompts with

        ids = [encode_prompt(data.tokenizer, p, data.template, data.insert_eos) for p in prompts]
        sampling = Sampling(**{**vars(self.sampling), "num_samples": max(num_samples, 2)})
        out = self._sample(ids, sampling, seed=round_seed(self.sampling.seed, self.global_rank, -1))
        texts = self._decode(out.responses)
        n = sampling.num_samples
        return [texts[i * n:i * n + num_samples] for i in range(len(prompts))]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.reward.setup(self)  # after a resume's restore: a ModeLength with its mode restored does not re-estimate

    # ---- sampling rounds ---------------------------------------------------------------------------------------
    def _sample(self, prompt_ids: list[list[int]], sampling: Sampling, *, seed: int):
        tokenizer = self.trainer.datamodule.tokenizer
        return sample_responses(self.policy, prompt_ids, sampling, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, seed=seed,
                                synced_gpus=is_partitioned(self.policy))

    def _decode(self, responses: list[list[int]]) -> list[str]:
        return [t.strip() for t in self.trainer.datamodule.tokenizer.batch_decode(responses, skip_special_tokens=True)]

    def sample_round(self, batch: dict[str, Any], *, index: int, seed: int) -> tuple[SampleRound, dict[str, Tensor]]:
        """Sample, score and (pairwise objectives) pair n responses to each prompt of `batch`; plus its metrics."""
        if "prompt" not in batch:
            self.prompts()  # raises the return_prompts error
        out = self._sample(prompt_ids_of(batch), self.sampling, seed=seed)
        n, texts = out.num_samples, self._decode(out.responses)
        prompts = [p for p in batch["prompt"] for _ in range(n)]
        rewards = torch.tensor(self.reward(prompts, texts), dtype=torch.float32).view(-1, n)  # (P, n)
        inputs = {k: v.to(self.device) for k, v in out.inputs.items()}
        ref_logps = self.reference.sequences(inputs).float().view(-1, n)  # (P, n), once per round
        pairs = None if self.sampled_objective else build_pairs(rewards, mode=self.pair_mode,
                                                                min_gap=self.min_reward_gap)
        lengths = torch.tensor([len(r) for r in out.responses], dtype=torch.float32)
        metrics = {"samples/reward_mean": rewards.mean(), "samples/reward_median": rewards.flatten().median(),
                   "samples/response_length": lengths.mean()}
        if pairs is not None:
            metrics["samples/pairs_kept"] = torch.tensor(len(pairs.prompt) / max(pairs.considered, 1))
        self._log_texts(prompts, texts, rewards.flatten().tolist(), index)
        return SampleRound(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           labels=inputs["labels"], rewards=rewards.to(self.device), ref_logps=ref_logps, pairs=pairs,
                           index=index), metrics

    def current_round(self, batch: dict[str, Any]) -> tuple[SampleRound, dict[str, Tensor]]:
        """The round to train on at this step: the current one until it is used up, then a new one from `batch`."""
        metrics: dict[str, Tensor] = {}
        if self.round is None or self.round.uses >= self.iterations_per_batch:
            index = self.rounds_sampled
            self.round, metrics = self.sample_round(batch, index=index,
                                                    seed=round_seed(self.sampling.seed, self.global_rank, index))
            self.rounds_sampled += 1
            if self.sampled_objective and self.objective.uses_running_baseline:  # once per round, not per reuse
                self.round.baseline = self.baseline.step(self._global_mean(self.round.rewards))
        self.round.uses += 1
        return self.round, metrics

    # ---- losses ------------------------------------------------------------------------------------------------
    def round_loss(self, round_: SampleRound) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on the round's samples (all of them) or pairs (the samples they use)."""
        n = round_.num_samples
        if self.sampled_objective:
            rows = torch.arange(round_.input_ids.shape[0], device=round_.input_ids.device)
        else:
            pairs = round_.pairs
            flat = torch.cat([pairs.prompt * n + pairs.chosen, pairs.prompt * n + pairs.rejected])
            rows = flat.unique() if len(flat) else torch.zeros(1, dtype=torch.long, device=flat.device)
        selecting = self.sample_scheduler is not None  # SamS selects among the round's pairs (pairwise objectives)
        inputs = round_.rows(rows)
        logps, _, pooled = sequence_forward(self.policy, inputs, average=self.average_logps,
                                            output_hidden_states=selecting, packed=self.packing)  # (R,), (R, L, D)
        ref = round_.ref_logps.flatten()[rows]
        metrics = {"kl": (logps.detach() - ref).mean()}
        if self.sampled_objective:
            out = self.objective(logps.view(-1, n), round_.rewards, round_.ref_logps.float(), beta=self.beta,
                                 running_baseline=round_.baseline)
            return out.losses.mean(), metrics
        position = torch.full((round_.input_ids.shape[0],), -1, dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(len(rows), device=rows.device)
        chosen = position[round_.pairs.prompt * n + round_.pairs.chosen]
        rejected = position[round_.pairs.prompt * n + round_.pairs.rejected]
        out = self.objective(logps[chosen], logps[rejected], ref[chosen], ref[rejected], beta=self.beta)
        weights = None
        if selecting:  # every rank steps the scheduler, even one with no pair (its collectives must match)
            weights, selection_metrics = self.select_pairs(sample_pair_contexts(pooled, chosen, rejected), out,
                                                           logps[chosen].detach())
            metrics.update(selection_metrics)
        if len(chosen) == 0:  # no pair cleared the gap: a zero loss that still reaches every weight
            return logps.sum() * 0.0, {**metrics, "pairs": torch.tensor(0.0)}
        margins = (out.chosen_rewards - out.rejected_rewards).detach()
        metrics.update({"pairs": torch.tensor(float(len(chosen))), "rewards/margins": margins.mean(),
                        "rewards/accuracies": (margins > 0).float().mean()})
        return weighted_mean(out.losses, weights), metrics

    def offline_loss(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on the batch's own (offline) pairs; a sampled objective sees each pair as 2 samples, rewards 1 / 0."""
        if not self.sampled_objective:
            return super().model_step(batch, stage)
        from lightning_modules.logprobs import concatenated_forward

        policy = concatenated_forward(self.policy, batch, average=self.average_logps, packed=self.packing)
        ref_chosen, ref_rejected = self.reference(batch)
        logps = torch.stack([policy.chosen_logps, policy.rejected_logps], dim=1)  # (B, 2)
        rewards = torch.tensor([[1.0, 0.0]], device=logps.device).expand_as(logps)
        running = None
        if self.objective.uses_running_baseline:  # the on-policy baseline; before any round, the pairs' own mean 0.5
            running = 0.5 if self.baseline.value is None else self.baseline.value
        out = self.objective(logps, rewards, torch.stack([ref_chosen, ref_rejected], dim=1).float(), beta=self.beta,
                             running_baseline=running)
        return out.losses.mean(), {}

    def model_step(self, batch: dict[str, Any], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        if stage != "train":
            return self.evaluation_step(batch, stage)
        round_, metrics = self.current_round(batch)
        loss, step_metrics = self.round_loss(round_)
        metrics.update(step_metrics)
        if self.mixing_ratio > 0:
            offline, _ = self.offline_loss(batch, stage)
            metrics["onpolicy_loss"], metrics["offline_loss"] = loss.detach(), offline.detach()
            loss = (1 - self.mixing_ratio) * loss + self.mixing_ratio * offline
        return loss, metrics

    @torch.no_grad()
    def evaluation_step(self, batch: dict[str, Any], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Offline loss on the batch's pairs, and the reward of responses sampled to its prompts (fixed seed)."""
        loss, metrics = self.offline_loss(batch, stage)
        if "prompt" in batch:
            prompt_ids = prompt_ids_of(batch)
            content = zlib.crc32(repr(prompt_ids).encode())  # the same prompts draw the same samples at every validation
            out = self._sample(prompt_ids, self.sampling,
                               seed=round_seed(self.sampling.seed + EVAL_SEED_OFFSET, self.global_rank, content))
            texts = self._decode(out.responses)
            prompts = [p for p in batch["prompt"] for _ in range(out.num_samples)]
            rewards = torch.tensor(self.reward(prompts, texts), dtype=torch.float32)
            metrics = {**metrics, "samples/reward_mean": rewards.mean(),
                       "samples/response_length": torch.tensor(statistics.fmean(len(r) for r in out.responses))}
        return loss, metrics

    def _global_mean(self, rewards: Tensor) -> Tensor:
        """The mean reward over every rank's round (so a running baseline is the same on every rank)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return rewards
        total = self.trainer.strategy.reduce(torch.stack([rewards.sum(), torch.tensor(float(rewards.numel()),
                                                                                         device=rewards.device)]),
                                             reduce_op="sum")
        return (total[0] / total[1]).view(1)

    @rank_zero_only
    def _log_texts(self, prompts: list[Any], texts: list[str], rewards: list[float], index: int) -> None:
        if not self.log_samples_every or index % self.log_samples_every or self._trainer is None:
            return
        experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if not hasattr(experiment, "add_text"):
            return
        rows = [f"**{p if isinstance(p, str) else p[-1]['content']}** → {t} (reward {r:.3f})"
                for p, t, r in list(zip(prompts, texts, rewards))[:4]]
        experiment.add_text("train/samples", "\n\n".join(rows), self.global_step)

    # ---- the resume contract -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["prefopt"][CHECKPOINT_KEY] = {
            "round": None if self.round is None else self.round.state_dict(), "rounds_sampled": self.rounds_sampled,
            "reward": self.reward.state_dict(), "baseline": self.baseline.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("prefopt", {}).get(CHECKPOINT_KEY)
        if state is None:
            return
        self.round = None if state["round"] is None else SampleRound.from_state_dict(state["round"]).to(self.device)
        self.rounds_sampled = state["rounds_sampled"]
        self.reward.load_state_dict(state["reward"])
        self.baseline.load_state_dict(state["baseline"])
