"""`SamSPretrainModule`: pretrain the scheduler with the SFT loss, the policy frozen (SPEC section 6, step 5).

    python -m lightning_modules fit --config configs/sams/pretrain_scheduler.yaml   # writes <run dir>/sams_scheduler.pt
    # then, for DPO: model.init_args.sample_scheduler.init_args.pretrained: <that file>

Each training batch of preference pairs goes through the frozen policy once (no gradient, no optimizer step);
the scheduler selects as in DPO training, with the per-pair SFT loss (the chosen response's per-token NLL) as
the loss whose relative decrease gives r_B, and the reference-free margin β·(logπ(y_w) − logπ(y_l)) and
logπ(y_w) for r_S. Only the scheduler learns. At the end of fit its networks are written atomically to
`save_path` (relative paths: inside the run directory), in the layout `SamS(pretrained=...)` reads.

The policy has no optimizer, so Lightning's step counter does not advance: bound the run with
`trainer.max_epochs` / `trainer.limit_train_batches`, not `max_steps`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_modules.dpo import DPOModule
from lightning_modules.logprobs import concatenated_forward
from lightning_modules.objectives import PreferenceLossOutput, nll_loss
from lightning_modules.runtime.run_dir import resolve_in_run_dir
from lightning_modules.sams.context import pair_contexts
from lightning_modules.sams.scheduler import SamS


class SamSPretrainModule(DPOModule):
    """The scheduler trained on a frozen policy's SFT loss; writes its networks to `save_path`."""

    def __init__(self, model_name_or_path: str, sample_scheduler: SamS | None = None,
                 save_path: str = "sams_scheduler.pt", **kwargs: Any):
        """Scheduler pretraining.

        Args:
            model_name_or_path: the (SFT) policy the scheduler will later serve; frozen here.
            sample_scheduler: the scheduler to pretrain (its sizes must match the DPO run's); default SamS().
            save_path: where the pretrained networks go (relative: inside the run directory).
            **kwargs: DPOModule's (beta for the margin, average_logps, dtype, ...); no reference is loaded.
        """
        super().__init__(model_name_or_path, reference="none", sample_scheduler=sample_scheduler or SamS(), **kwargs)
        self.save_path = save_path
        self.automatic_optimization = False  # nothing of the policy is optimized; the scheduler steps itself

    def configure_model(self) -> None:
        super().configure_model()
        self.policy.requires_grad_(False)
        self.policy.eval()

    def configure_optimizers(self) -> None:
        return None  # the policy is frozen; the scheduler's AdamW lives in SamS

    def model_step(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            policy = concatenated_forward(self.policy, batch, average=self.average_logps,
                                          output_hidden_states=stage == "train", packed=self.packing)
        sft = nll_loss(policy.chosen_logps, policy.chosen_counts, average=not self.average_logps)  # (B,) per token
        if stage != "train":
            return sft.mean(), {}
        # the reference-free implicit rewards β·logπ give the margin of r_S; the SFT loss is the batch loss of r_B
        out = PreferenceLossOutput(losses=sft, chosen_rewards=self.beta * policy.chosen_logps.float(),
                                   rejected_rewards=self.beta * policy.rejected_logps.float())
        _, metrics = self.select_pairs(pair_contexts(policy.pooled_hidden), out, policy.chosen_logps,
                                       batch.get("label_flipped"))
        return sft.mean(), metrics

    def on_train_end(self) -> None:
        super().on_train_end()
        path = resolve_in_run_dir(self.save_path, self.trainer)
        if self.trainer.is_global_zero:  # every rank holds the same networks
            self.sample_scheduler.save_pretrained(path)
            rank_zero_info(f"SamS: pretrained scheduler written to {path} (use it as "
                           "model.init_args.sample_scheduler.init_args.pretrained)")
