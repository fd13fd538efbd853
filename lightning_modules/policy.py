"""`PolicyModule`: the plumbing every training module shares, and nothing else.

Loads a Hugging Face causal LM (`from_pretrained`, so a hub id and a local folder take the same path)
in `configure_model` (so DeepSpeed ZeRO-3 can shard it), builds the injected optimizer and LR
schedule, and logs metric dicts as `stage/name`. Subclasses implement `model_step(batch, stage)`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedModel

from lightning_modules.models.generation import generate_with_datamodule
from lightning_modules.models.loading import Dtype, load_causal_lm
from lightning_modules.models.adapters import LoraSpec, load_lora_policy
from lightning_modules.optim import LinearWarmupDecay, OptimizerFactory, SchedulerFactory

def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW, lr 1e-5, no weight decay: overridden by every shipped config."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class PolicyModule(L.LightningModule):
    """Base LightningModule holding `self.policy`; see subclasses for the objectives."""

    def __init__(
        self,
        model_name_or_path: str,
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: SchedulerFactory = LinearWarmupDecay,
        dtype: Dtype = "float32",
        gradient_checkpointing: bool = False,
        generation: dict[str, Any] | None = None,
        lora: LoraSpec | None = None,
    ):
        """Shared arguments.

        Args:
            model_name_or_path: hub id or local folder of the initial policy (HF `from_pretrained` layout).
            optimizer: optimizer factory called with the policy's parameters (class_path + init_args).
            lr_scheduler: schedule factory called with (optimizer, total_steps); stepped every optimizer step.
            dtype: dtype the policy weights are loaded in.
            gradient_checkpointing: recompute activations in the backward pass to save memory.
            generation: options of `predict` generation (max_new_tokens, do_sample, temperature, top_p, batch_size).
            lora: train LoRA adapters (peft) on a frozen base instead of all weights; base_quantization: 4bit is QLoRA.
        """
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.generation = dict(generation or {})
        self.lora = lora
        self.policy: PreTrainedModel | PeftModel | None = None  # PeftModel with `lora`

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self.lora is None:
            self.policy = load_causal_lm(self.model_name_or_path, dtype=self.dtype_name)
        else:  # a peft PeftModelForCausalLM: called, `.generate`d and `.device`d like the HF model it wraps
            device = self.trainer.strategy.root_device if self._trainer is not None else None  # 4-bit base only
            self.policy = load_lora_policy(self.model_name_or_path, self.lora, dtype=self.dtype_name, device=device)
        # from_pretrained returns eval mode and Lightning keeps module modes: train with dropout as configured.
        self.policy.train()
        if self.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            self.policy.config.use_cache = False

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def model_step(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (loss to optimize, detached scalar metrics named without the stage prefix)."""
        raise NotImplementedError

    def _step_and_log(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        loss, metrics = self.model_step(batch, stage)
        training = stage == "train"
        batch_size = batch[next(k for k in batch if k.endswith("input_ids"))].shape[0]
        options = dict(on_step=training, on_epoch=not training, batch_size=batch_size, sync_dist=not training)
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, **options)
        self.log_dict({f"{stage}/{name}": value for name, value in metrics.items() if name != "loss"}, **options)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step_and_log(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step_and_log(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step_and_log(batch, "test")

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, Any]]:
        """Generate one response per prompt of a `PromptDataModule` batch (greedy unless configured)."""
        responses = generate_with_datamodule(self.trainer, self.policy, batch["prompt"], **self.generation)
        return [{"prompt": p, "response": r} for p, r in zip(batch["prompt"], responses)]
