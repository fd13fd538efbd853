"""`SFTModule`: supervised fine-tuning, the negative log-likelihood of the response tokens."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_modules.logprobs import sequence_forward
from lightning_modules.objectives import NLLReduction, reduce_nll
from lightning_modules.policy import PolicyModule

class SFTModule(PolicyModule):
    """Train the policy to imitate the responses of an SFT dataset (prompt tokens are not trained on)."""

    def __init__(self, model_name_or_path: str, reduction: NLLReduction = "token_mean", **kwargs: Any):
        """SFT on (prompt, response) batches from `datamodules.SFTDataModule`.

        Args:
            model_name_or_path: hub id or local folder of the initial policy (HF `from_pretrained` layout).
            reduction: how token NLLs become the loss: token_mean, sequence_mean or sum.
            **kwargs: optimizer, lr_scheduler, dtype, gradient_checkpointing, generation (see `PolicyModule`).
        """
        super().__init__(model_name_or_path, **kwargs)
        self.reduction = reduction

    def model_step(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        logps, counts, _ = sequence_forward(self.policy, batch, packed=self.packing)
        loss = reduce_nll(logps, counts, self.reduction)
        token_nll = reduce_nll(logps, counts, "token_mean").detach()
        return loss, {"nll_per_token": token_nll, "ppl": token_nll.exp()}
