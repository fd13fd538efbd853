"""`PolicyModule`: the plumbing every training module shares, and nothing else.

Loads a Hugging Face causal LM (`from_pretrained`, so a hub id and a local folder take the same path)
in `configure_model` (so DeepSpeed ZeRO-3 can shard it), builds the injected optimizer and LR
schedule, and logs metric dicts as `stage/name`. Subclasses implement `model_step(batch, stage)`.

Every training run also gets, from `lightning_modules/runtime`: the non-finite guard (a NaN/inf
loss or gradient norm on any rank skips the step on every rank), the resume contract's RNG states
in checkpoints, and a checkpoint plus a non-zero exit on SIGTERM / SIGINT. Subclasses that override
`on_save_checkpoint` / `on_load_checkpoint` call `super()`.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedModel

from datamodules.utils.errors import UserInputError
from lightning_modules.models.generation import generate_with_datamodule
from lightning_modules.models.loading import Dtype, load_causal_lm
from lightning_modules.models.adapters import LoraSpec, load_lora_policy
from lightning_modules.models.zero import complete_deepspeed_config, hf_zero3_config
from lightning_modules.runtime import rng
from lightning_modules.runtime.guard import NonFiniteGuard
from lightning_modules.runtime.rng import RNGRestore
from lightning_modules.runtime.run_dir import mark_latest, run_dir_of
from lightning_modules.runtime.signals import StopSignals, TrainingInterrupted
from lightning_modules.optim import LinearWarmupDecay, OptimizerFactory, SchedulerFactory
from lightning_modules.packing import supports_packing


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
        max_nonfinite_steps: int = 5,
        packed_sequences: bool = True,
        torch_compile: bool = False,
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
            max_nonfinite_steps: stop after this many optimizer steps in a row skipped for a NaN/inf loss or gradient (0 = never).
            packed_sequences: run forwards padding-free (lightning_modules.packing) where the attention supports it; false = padded.
            torch_compile: compile the policy's forward with torch.compile (dynamic shapes; the first steps pay the compile).
        """
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.generation = dict(generation or {})
        self.lora = lora
        if max_nonfinite_steps < 0:
            raise UserInputError(f"model.max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.guard = NonFiniteGuard(max_consecutive=max_nonfinite_steps)
        self.packed_sequences = packed_sequences
        self.torch_compile = torch_compile
        self._rng_restore = RNGRestore()
        self._stop_signals = StopSignals()
        self._bad_loss = False  # a micro-batch of the current optimizer step had a non-finite loss (on some rank)
        self._engine_step_pending = False  # DeepSpeed: the engine stepped; read its gradient norm after the step
        self.policy: PreTrainedModel | PeftModel | None = None  # PeftModel with `lora`

    def setup(self, stage: str) -> None:
        complete_deepspeed_config(self._trainer)  # DeepSpeed's micro-batch size, before Lightning reads it

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        # ZeRO-3: weights load into their partitions while this lives (models/zero.py); None otherwise
        self._hf_deepspeed_config = hf_zero3_config(self._trainer)
        if self._hf_deepspeed_config is not None and self.lora is not None and self.lora.base_quantization != "none":
            raise UserInputError(
                f"model.lora.base_quantization={self.lora.base_quantization!r} (QLoRA) is not supported under DeepSpeed "
                "ZeRO-3: bitsandbytes' 4-bit weights cannot be partitioned. A 4-bit 7B base is about 4 GB, so it "
                "needs no partitioning: use configs/strategy/single_gpu_lora_4bit_reference.yaml (one GPU) or add "
                "configs/strategy/ddp.yaml (several GPUs); or keep ZeRO-3 with a float base "
                "(model.lora.base_quantization=none)")
        if self.lora is None:
            self.policy = load_causal_lm(self.model_name_or_path, dtype=self.dtype_name)
        else:  # a peft PeftModelForCausalLM: called, `.generate`d and `.device`d like the HF model it wraps
            device = self.trainer.strategy.root_device if self._trainer is not None else None  # 4-bit base only
            self.policy = load_lora_policy(self.model_name_or_path, self.lora, dtype=self.dtype_name, device=device)
        # from_pretrained returns eval mode and Lightning keeps module modes: train with dropout as configured.
        self.policy.train()
        if self.gradient_checkpointing:
            self.policy.activation_checkpointing_enable()
            self.policy.config.use_cache = False
        if self.torch_compile:  # in place (nn.Module.compile): parameter names, checkpoints and exports are unchanged
            self.policy.compile(dynamic=True)

    @property
    def packing(self) -> bool:
        """Whether this module's policy forwards run padding-free (`packed_sequences` and a supporting attention)."""
        return self.packed_sequences and supports_packing(self.policy)

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
        loss = self._step_and_log(batch, "train")
        if not self._on_any_rank(not bool(torch.isfinite(loss.detach()).all())):
            return loss * self._deepspeed_accumulation_factor()
        self._bad_loss = True  # the whole optimizer step is skipped, and counted once (on_before_optimizer_step)
        # Not None: Lightning refuses None under DDP. A zero loss keeps every rank's backward (and DDP's
        # all-reduce) in step; `on_before_optimizer_step` then drops the gradients, so nothing is updated.
        # DeepSpeed steps its own gradient buffers whatever `p.grad` holds, so there every rank returns NaN
        # instead: all gradients are NaN and the engine skips the step on every rank (see on_before_optimizer_step).
        finite = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
        return finite * float("nan") if self._deepspeed_engine() is not None else finite * 0.0

    # ---- the non-finite guard, the resume contract and stop signals (lightning_modules/runtime) -------------------
    def _on_any_rank(self, flag: bool) -> bool:
        """True when `flag` holds on any rank (one all-reduce under DDP), so every rank takes the same branch."""
        trainer = self._trainer
        return bool(trainer.strategy.reduce_boolean_decision(flag, all=False)) if trainer is not None else flag

    def _record_step(self, *, bad: bool, what: str) -> None:
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else None
        self.guard.record(bad, step=self.global_step + 1, what=what, lr=lr)
        self.log("train/skipped_steps", float(self.guard.skipped), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip the update (drop every gradient) when a micro-batch's loss, or the gradient norm, is non-finite on
        any rank; one verdict per optimizer step, however many micro-batches it accumulated.

        Under DeepSpeed the gradients live in the engine, not in `p.grad`: the engine skips a step whose
        gradient norm is not finite itself (every ZeRO stage, DeepSpeed's defaults), and
        `on_train_batch_end` reads that norm after the step. (DeepSpeed accumulates itself: this hook then
        runs on every micro-batch, and only the accumulation boundary is a step.)
        """
        engine = self._deepspeed_engine()
        if engine is not None:
            self._engine_step_pending = bool(engine.is_gradient_accumulation_boundary())
            return
        if self._bad_loss:  # drop the (meaningless) gradients
            self._bad_loss = False
            for p in self.parameters():
                p.grad = None
            self._record_step(bad=True, what="loss")
            return
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.zeros(())
        bad = self._on_any_rank(not bool(torch.isfinite(norm)))
        if bad:
            for p in self.parameters():
                p.grad = None  # the optimizer leaves parameters without a gradient untouched
        self._record_step(bad=bad, what="gradient norm")

    def on_fit_start(self) -> None:
        mark_latest(self.trainer)  # <root>/latest -> this run's version_N

    def on_train_start(self) -> None:
        # After Lightning registered its own handlers, whose teardown restores the pre-fit ones on every exit path.
        self._stop_signals.install()
        # Lightning 2.6.6 restores the training loader's position only when it builds the loader after loading the
        # checkpoint. With max_epochs set, `configure_optimizers` (our schedule's total step count) builds it first,
        # so the position waits unused and a resumed run would replay the epoch: hand it over here, before the first
        # batch is drawn (the loader's iterator reads it lazily).
        fit_loop = self.trainer.fit_loop
        if fit_loop.restarting and getattr(fit_loop, "_combined_loader_states_to_load", None):
            fit_loop._load_combined_loader_states()

    def on_train_end(self) -> None:
        self._stop_signals.uninstall()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._rng_restore.apply(self.global_rank)  # first batch after resuming: the saved RNG states

    def _deepspeed_engine(self) -> Any:
        """The DeepSpeed engine training this module, or None (no trainer, or another strategy)."""
        trainer = self._trainer
        return getattr(trainer.strategy, "deepspeed_engine", None) if trainer is not None else None

    def _deepspeed_accumulation_factor(self) -> int:
        """What the loss handed to backward is multiplied by, so that gradients are the mean over micro-batches.

        Lightning divides the loss by `accumulate_grad_batches`, and DeepSpeed's `engine.backward` divides it
        again (Lightning 2.6.6 / DeepSpeed 0.19.8), so DeepSpeed would accumulate 1/N² of the gradient sum. Measured:
        ZeRO-3 with N = 2 matched DDP only at twice the learning rate. Undo one division: N under DeepSpeed, else 1.
        """
        return self.trainer.accumulate_grad_batches if self._deepspeed_engine() is not None else 1

    def _record_engine_step(self) -> None:
        """DeepSpeed: count the step as skipped when a micro-batch's loss was non-finite (its NaN gradients made the
        engine skip) or the engine found the gradient norm non-finite (then it did not step). The norm is the same
        on every rank (all-reduced by the engine); None (not computed) counts as finite."""
        self._engine_step_pending = False
        norm = self._deepspeed_engine().get_global_grad_norm()
        bad_norm = norm is not None and not math.isfinite(float(norm))
        bad_loss, self._bad_loss = self._bad_loss, False
        self._record_step(bad=bad_loss or bad_norm, what="loss" if bad_loss else "gradient norm (DeepSpeed)")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After a DeepSpeed step, the guard reads its gradient norm. On SIGTERM / SIGINT (any rank): write a
        checkpoint after this step, then exit 128 + signal."""
        if self._engine_step_pending:
            self._record_engine_step()
        received = self._stop_signals.received
        if not self._on_any_rank(received is not None):
            return
        trainer = self.trainer
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or run_dir_of(trainer) / "checkpoints"
        path = str(Path(folder) / f"interrupted-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        signum = received or signal.SIGTERM
        rank_zero_warn(f"{signal.Signals(signum).name} received: stopped after step {trainer.global_step} and wrote "
                       f"{path}; resume with --ckpt_path {path}")
        raise TrainingInterrupted(signum, path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["prefopt"] = {"rng_states": rng.collect(), "guard": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("prefopt", {})
        self._rng_restore.load(state.get("rng_states"))
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step_and_log(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step_and_log(batch, "test")

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, Any]]:
        """Generate one response per prompt of a `PromptDataModule` batch (greedy unless configured)."""
        responses = generate_with_datamodule(self.trainer, self.policy, batch["prompt"], **self.generation)
        return [{"prompt": p, "response": r} for p, r in zip(batch["prompt"], responses)]
