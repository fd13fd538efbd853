"""`DPOModule`: any objective of `lightning_modules.objectives` against any reference provider.

One shared step: policy log-probs (one concatenated forward) → reference log-probs → objective →
metrics. The reference lives in `self.reference`, is never optimized and is left out of checkpoints
(it is rebuilt from its source when the module is configured). Under DeepSpeed ZeRO-3 the default live
reference is loaded again from `model_name_or_path` rather than copied (a copy of partitioned weights
is empty), so it is partitioned like the policy and gathered layer by layer at its forward.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, get_args

from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from datamodules.utils.errors import UserInputError
from lightning_modules.logprobs import PairLogps, concatenated_forward, preference_accuracy
from lightning_modules.objectives import (OBJECTIVE_CLASSES, Objective, PreferenceLossOutput, Sigmoid, nll_loss,
                                          preference_metrics)
from lightning_modules.models.loading import load_causal_lm
from lightning_modules.models.zero import deepspeed_strategy_config, is_partitioned, outside_zero3
from lightning_modules.policy import PolicyModule
from lightning_modules.models.quantization import Quantization, load_reference_model
from lightning_modules.references.providers import (AdapterOffReference, CachedReference, LiveReference, NoReference,
                                         PrecomputedReference,
                                         ReferenceMode)
from lightning_modules.sams.context import pair_contexts
from lightning_modules.sams.scheduler import SamS


# The frozen reference is in eval mode on purpose (no dropout); the policy is put in train mode by
# `PolicyModule.configure_model`, so Lightning's "modules in eval mode" warning is only noise here.
SAMS_KEY = "sams"  # under checkpoint["prefopt"]: the sample scheduler's whole state

warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class DPOModule(PolicyModule):
    """Direct preference optimization and its variants (cDPO, IPO, hinge, Pref-FT) against one reference.

    MRPO / MDPO (K references) are `lightning_modules.multiref.MultiReferenceModule`, this module plus a
    weighting strategy.
    """

    selects_batch_pairs = True  # with a sample scheduler, select among the batch's pairs (on-policy: the sampled ones)

    def __init__(
        self,
        model_name_or_path: str,
        objective: Objective = Sigmoid(),
        beta: float = 0.1,
        sft_weight: float = 0.0,
        dpo_weight: float = 1.0,
        average_logps: bool = False,
        reference: ReferenceMode = "live",
        reference_name_or_path: str | None = None,
        reference_quantization: Quantization = "none",
        sample_scheduler: SamS | None = None,
        **kwargs: Any,
    ):
        """DPO on pair batches from `datamodules.PreferenceDataModule`.

        Args:
            model_name_or_path: hub id or local folder of the initial policy (HF `from_pretrained` layout).
            objective: the loss and its options: Sigmoid, CDPO, IPO, Hinge, PrefFT (`--model.init_args.objective.help CDPO`).
            beta: β, the inverse temperature of the implicit reward β·(logπθ − logπref).
            sft_weight: weight of an added per-token NLL term on the chosen response (0 = off).
            dpo_weight: weight of the preference loss term; 0 with sft_weight > 0 gives pure Pref-FT.
            average_logps: length-normalize sequence log-probs (use with ipo, as TRL does).
            reference: live (frozen model), precomputed (batch columns), cached (data.reference_cache), none (Δref=0).
            reference_name_or_path: live reference model (policy's dtype); default: frozen copy of the initial policy.
            reference_quantization: load the live reference in 8bit or 4bit (nf4) through bitsandbytes, or none.
            sample_scheduler: train on the pairs a learned scheduler selects from each batch (lightning_modules.sams.SamS).
            **kwargs: optimizer, lr_scheduler, dtype, gradient_checkpointing, generation (see `PolicyModule`).
        """
        super().__init__(model_name_or_path, **kwargs)
        if not isinstance(objective, Objective):
            names = ", ".join(cls.__name__ for cls in OBJECTIVE_CLASSES.values())
            raise UserInputError(f"model.objective={objective!r} is not an objective; use one of {names} "
                                 "(e.g. `objective: IPO`, or `{class_path: CDPO, init_args: {label_smoothing: 0.1}}`)")
        if beta <= 0:
            raise UserInputError(f"model.beta must be > 0, got {beta}")
        if reference not in get_args(ReferenceMode):
            raise UserInputError(f"model.reference={reference!r} is not one of {list(get_args(ReferenceMode))}")
        if dpo_weight < 0 or sft_weight < 0 or dpo_weight == sft_weight == 0:
            raise UserInputError(f"model.dpo_weight={dpo_weight} and model.sft_weight={sft_weight} must be >= 0 "
                                 "and not both 0 (total loss = dpo_weight·preference + sft_weight·NLL)")
        self.check_objective(objective)
        self.objective = objective
        self.beta = beta
        self.sft_weight = sft_weight
        self.dpo_weight = dpo_weight
        self.average_logps = average_logps
        self.reference_mode = reference
        self.reference_name_or_path = reference_name_or_path
        self.reference_quantization = reference_quantization
        self.reference = None
        # Not a registered submodule (see lightning_modules/sams/scheduler.py): DDP and ZeRO-3 leave it alone.
        object.__setattr__(self, "sample_scheduler", sample_scheduler)

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference is not None:
            return
        if self.reference_mode == "live":
            self.reference = self.build_live_reference()
        elif self.reference_mode == "precomputed":
            self.reference = PrecomputedReference()
        elif self.reference_mode == "cached":
            self.reference = CachedReference(shape=self.objective.reference_shape, average=self.average_logps)
        else:
            self.reference = NoReference()

    def build_live_reference(self) -> nn.Module:
        """The live reference of `configure_model` (subclasses with several references override this)."""
        if self.lora is not None and self.reference_name_or_path is None \
                and self.reference_quantization in ("none", self.lora.base_quantization):
            # a LoRA policy's reference is its own base model, float or (QLoRA) 4-bit: adapters off, no copy
            return AdapterOffReference(self.policy, average=self.average_logps, packed=self.packed_sequences)
        return self.live_reference(self.reference_name_or_path, "model.reference_name_or_path")

    def live_reference(self, name_or_path: str | None, key: str) -> LiveReference:
        """A frozen reference model (None: the initial policy), in `reference_quantization`, for this strategy.

        Float references are submodules (moved, wrapped and partitioned with the policy). A quantized one is
        loaded whole on this rank's device; under DeepSpeed it is kept out of the engine, which would
        otherwise partition or cast it (bitsandbytes weights cannot be partitioned; SPEC section 3).
        """
        source = name_or_path or self.model_name_or_path
        if self.reference_quantization != "none":
            device = self.trainer.strategy.root_device if self._trainer is not None else None
            with outside_zero3(self._hf_deepspeed_config):
                model = load_reference_model(source, dtype=self.dtype_name, quantization=self.reference_quantization,
                                             device=device)
            return LiveReference(model, average=self.average_logps, packed=self.packed_sequences,
                                 register=deepspeed_strategy_config(self._trainer) is None)
        if name_or_path is None and not is_partitioned(self.policy):
            model = copy.deepcopy(self.policy)
        else:  # a named reference, or (ZeRO-3: a copy of partitions is empty) the policy's own source again
            model = load_causal_lm(source, dtype=self.dtype_name, key=key if name_or_path else "model.model_name_or_path")
        return LiveReference(model, average=self.average_logps, packed=self.packed_sequences)

    def check_objective(self, objective: Objective) -> None:
        """A UserInputError unless this module can train `objective` (here: pairs, one reference)."""
        if objective.inputs == "samples":
            raise UserInputError(f"model.objective={objective!r} trains on N responses sampled per prompt from the "
                                 "current policy and scored by a reward function, not on the dataset's preference "
                                 "pairs: use model.class_path=lightning_modules.onpolicy.OnPolicyModule, which "
                                 "samples, scores and trains on the samples (and builds DPO / IPO pairs from them "
                                 "for the pairwise objectives)")
        if objective.reference_shape == "multi":
            raise UserInputError(f"model.objective={objective!r} takes K references: use model.class_path="
                                 "lightning_modules.multiref.MultiReferenceModule, with the K references in "
                                 "data.init_args.reference_cache and α from model.init_args.weighting")

    def model_step(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        selecting = self.sample_scheduler is not None and stage == "train" and self.selects_batch_pairs
        policy = concatenated_forward(self.policy, batch, average=self.average_logps, output_hidden_states=selecting,
                                      packed=self.packing)
        ref_chosen, ref_rejected = self.reference(batch)
        out, extra = self.preference_losses(policy, ref_chosen, ref_rejected, batch, stage)
        weights, selection_metrics = self.pair_weights(policy, batch, out) if selecting else (None, {})
        loss = self.dpo_weight * weighted_mean(out.losses, weights)
        metrics = {**preference_metrics(out, policy.chosen_logps, policy.rejected_logps), **extra, **selection_metrics}
        metrics["preference_accuracy"] = preference_accuracy(policy, averaged=self.average_logps).mean()
        if self.dpo_weight != 1.0 or self.sft_weight > 0:
            metrics["pref_loss"] = out.losses.detach().mean()
        if self.sft_weight > 0:
            # per-token NLL of the chosen response (already per token when average_logps)
            chosen_nll = nll_loss(policy.chosen_logps, policy.chosen_counts, average=not self.average_logps)
            loss = loss + self.sft_weight * weighted_mean(chosen_nll, weights)
            metrics["sft_nll"] = chosen_nll.mean().detach()
        return loss, metrics

    def pair_weights(self, policy: PairLogps, batch: dict[str, Tensor],
                     out: PreferenceLossOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """(B,) loss weights from the sample scheduler: world size / k on the selected pairs, 0 elsewhere."""
        return self.select_pairs(pair_contexts(policy.pooled_hidden), out, policy.chosen_logps,
                                 batch.get("label_flipped"))

    def select_pairs(self, contexts: Tensor, out: PreferenceLossOutput, chosen_logps: Tensor,
                     flipped: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The scheduler's step on (B, L, D) pair contexts and the objective's output; the (B,) loss weights."""
        selected = self.sample_scheduler.step(contexts, out.losses, out.chosen_rewards - out.rejected_rewards,
                                              chosen_logps, flipped=flipped)
        self.last_selection = selected  # this step's `Selected` (masks, scores, every metric), for callbacks and tests
        self.log_score_histogram(selected.scores)
        # ~15 scheduler metrics through self.log cost more than the scheduler's own step on a small model: hand them
        # to the logger on logging steps only (`last_selection.metrics` has them every step)
        logging = self._trainer is None or self.global_step % self.trainer.log_every_n_steps == 0
        return selected.mask.to(out.losses.dtype) * selected.weight, selected.metrics if logging else {}

    @rank_zero_only
    def log_score_histogram(self, scores: Tensor) -> None:
        """The scheduler's scores u of the global batch, as a TensorBoard histogram every log_every_n_steps."""
        experiment = getattr(self.logger, "experiment", None) if self._trainer is not None and self.logger else None
        if hasattr(experiment, "add_histogram") and self.global_step % self.trainer.log_every_n_steps == 0:
            experiment.add_histogram("train/sams/scores", scores.detach().float().cpu(), self.global_step)

    def preference_losses(self, policy: PairLogps, ref_chosen: Tensor, ref_rejected: Tensor, batch: dict[str, Tensor],
                          stage: str) -> tuple[PreferenceLossOutput, dict[str, Tensor]]:
        """The objective's per-pair output, plus any metrics of its own (subclasses: α, per-reference losses)."""
        return self.objective(policy.chosen_logps, policy.rejected_logps, ref_chosen, ref_rejected, beta=self.beta), {}

    # The reference is rebuilt from its source, so checkpoints hold the policy only.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]
        if self.sample_scheduler is not None:
            checkpoint["prefopt"][SAMS_KEY] = self.sample_scheduler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("prefopt", {}).get(SAMS_KEY)
        if self.sample_scheduler is not None and state is not None:
            self.sample_scheduler.load_state_dict(state)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.reference is not None:
            state_dict = dict(state_dict)
            for key, value in self.reference.state_dict(prefix="reference.").items():
                state_dict.setdefault(key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """values.mean() without weights; Σ weights·values with them (the scheduler's weights: the selected pairs' mean)."""
    return values.mean() if weights is None else (values * weights).sum()
