"""`DPOModule`: any pairwise objective from `objectives.OBJECTIVES` against any reference provider.

One shared step: policy log-probs (one concatenated forward) → reference log-probs → objective →
metrics. The reference lives in `self.reference`, is never optimized and is left out of checkpoints
(it is rebuilt from its source when the module is configured).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, get_args

from torch import Tensor

from lightning_modules.errors import UserInputError
from lightning_modules.logprobs import concatenated_forward
from lightning_modules.objectives import OBJECTIVES, preference_metrics
from lightning_modules.policy import PolicyModule, load_causal_lm
from lightning_modules.quantization import Quantization, load_reference_model
from lightning_modules.references import (AdapterOffReference, CachedReference, LiveReference, NoReference,
                                         PrecomputedReference,
                                         ReferenceMode)


# The frozen reference is in eval mode on purpose (no dropout); the policy is put in train mode by
# `PolicyModule.configure_model`, so Lightning's "modules in eval mode" warning is only noise here.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def objective_option_names(name: str) -> set[str]:
    """Keyword options an objective accepts besides `beta` (e.g. {"label_smoothing"} for cdpo)."""
    params = inspect.signature(OBJECTIVES[name]).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "beta"}


class DPOModule(PolicyModule):
    """Direct preference optimization and its pairwise variants (cDPO, IPO, hinge, Pref-FT)."""

    def __init__(
        self,
        model_name_or_path: str,
        objective: str = "sigmoid",
        beta: float = 0.1,
        objective_options: dict[str, Any] | None = None,
        sft_weight: float = 0.0,
        dpo_weight: float = 1.0,
        average_logps: bool = False,
        reference: ReferenceMode = "live",
        reference_name_or_path: str | None = None,
        reference_quantization: Quantization = "none",
        **kwargs: Any,
    ):
        """DPO on pair batches from `datamodules.PreferenceDataModule`.

        Args:
            model_name_or_path: hub id or local folder of the initial policy (HF `from_pretrained` layout).
            objective: name in `lightning_modules.objectives.OBJECTIVES` (sigmoid, cdpo, ipo, hinge, sft, ...).
            beta: β, the inverse temperature of the implicit reward β·(logπθ − logπref).
            objective_options: extra keyword options of the objective, e.g. {label_smoothing: 0.1} for cdpo.
            sft_weight: weight of an added per-token NLL term on the chosen response (0 = off).
            dpo_weight: weight of the preference loss term; 0 with sft_weight > 0 gives pure Pref-FT.
            average_logps: length-normalize sequence log-probs (use with ipo, as TRL does).
            reference: live (frozen model), precomputed (batch columns), cached (data.reference_cache), none (Δref=0).
            reference_name_or_path: live reference model (policy's dtype); default: frozen copy of the initial policy.
            reference_quantization: load the live reference in 8bit or 4bit (nf4) through bitsandbytes, or none.
            **kwargs: optimizer, lr_scheduler, dtype, gradient_checkpointing, generation (see `PolicyModule`).
        """
        super().__init__(model_name_or_path, **kwargs)
        if objective not in OBJECTIVES:
            raise UserInputError(f"model.objective={objective!r} is not one of {sorted(OBJECTIVES)}")
        if beta <= 0:
            raise UserInputError(f"model.beta must be > 0, got {beta}")
        if reference not in get_args(ReferenceMode):
            raise UserInputError(f"model.reference={reference!r} is not one of {list(get_args(ReferenceMode))}")
        if dpo_weight < 0 or sft_weight < 0 or dpo_weight == sft_weight == 0:
            raise UserInputError(f"model.dpo_weight={dpo_weight} and model.sft_weight={sft_weight} must be >= 0 "
                                 "and not both 0 (total loss = dpo_weight·preference + sft_weight·NLL)")
        accepted = objective_option_names(objective)
        unknown = sorted(set(objective_options or {}) - accepted)
        if unknown:
            raise UserInputError(f"model.objective_options has {unknown}, which objective {objective!r} does not take; "
                                 f"it accepts {sorted(accepted) or 'no options'}")
        self.objective = objective
        self.beta = beta
        self.objective_options = dict(objective_options or {})
        self.sft_weight = sft_weight
        self.dpo_weight = dpo_weight
        self.average_logps = average_logps
        self.reference_mode = reference
        self.reference_name_or_path = reference_name_or_path
        self.reference_quantization = reference_quantization
        self.reference = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference is not None:
            return
        if self.reference_mode == "live" and self.lora is not None and self.reference_name_or_path is None \
                and self.reference_quantization == "none":  # a LoRA policy's reference is its base model
            self.reference = AdapterOffReference(self.policy, average=self.average_logps)
        elif self.reference_mode == "live":
            source = self.reference_name_or_path or self.model_name_or_path
            if self.reference_quantization != "none":  # quantized at load time, kept out of the optimizer
                model = load_reference_model(source, dtype=self.dtype_name, quantization=self.reference_quantization)
            elif self.reference_name_or_path is None:
                model = copy.deepcopy(self.policy)
            else:
                model = load_causal_lm(self.reference_name_or_path, dtype=self.dtype_name)
            self.reference = LiveReference(model, average=self.average_logps)
        elif self.reference_mode == "precomputed":
            self.reference = PrecomputedReference()
        elif self.reference_mode == "cached":  # objectives taking α take all K references
            multi = "alphas" in objective_option_names(self.objective)
            self.reference = CachedReference(multi=multi, average=self.average_logps)
        else:
            self.reference = NoReference()

    def model_step(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        policy = concatenated_forward(self.policy, batch, average=self.average_logps)
        ref_chosen, ref_rejected = self.reference(batch)
        out = OBJECTIVES[self.objective](
            policy.chosen_logps, policy.rejected_logps, ref_chosen, ref_rejected,
            beta=self.beta, **self.objective_options,
        )
        loss = self.dpo_weight * out.losses.mean()
        metrics = preference_metrics(out, policy.chosen_logps, policy.rejected_logps)
        if self.dpo_weight != 1.0 or self.sft_weight > 0:
            metrics["pref_loss"] = out.losses.detach().mean()
        if self.sft_weight > 0:
            chosen_nll = -policy.chosen_logps
            if not self.average_logps:
                chosen_nll = chosen_nll / policy.chosen_counts.clamp(min=1)
            loss = loss + self.sft_weight * chosen_nll.mean()
            metrics["sft_nll"] = chosen_nll.mean().detach()
        return loss, metrics

    # The reference is rebuilt from its source, so checkpoints hold the policy only.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.reference is not None:
            state_dict = dict(state_dict)
            for key, value in self.reference.state_dict(prefix="reference.").items():
                state_dict.setdefault(key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
