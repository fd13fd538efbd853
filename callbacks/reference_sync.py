"""`ReferenceSync`: TR-DPO's periodic update of a live reference model towards the policy.

Trust-region DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment",
arXiv:2404.09656, section 3) refreshes the reference every τ optimizer steps:

    soft:  π_ref ← α·π_θ + (1 − α)·π_ref        hard:  π_ref ← π_θ

applied parameter by parameter. Symbols → variables: τ = `every_n_steps`, α = `alpha`,
π_θ = `pl_module.policy`, π_ref = `pl_module.reference.model`. Floating buffers follow the same rule;
other buffers (integer counters, masks) are copied. The reference stays frozen and in eval mode.

The reference is not part of the module's checkpoint (`DPOModule` rebuilds it from its source), so
once synced, this callback saves the synced weights with the checkpoint and restores them on resume.
Under DeepSpeed ZeRO-3 the reference and the policy are partitioned alike; the update and the
checkpointed weights are then gathered one module at a time (`lightning_modules.models.zero`).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from datamodules.utils.errors import UserInputError
from lightning_modules.models.zero import gathered_state_dict, is_partitioned, load_gathered_state_dict

SyncMode = Literal["soft", "hard"]
CHECKPOINT_KEY = "reference_sync/reference"


def live_reference_model(pl_module: L.LightningModule) -> nn.Module:
    """The model inside `pl_module.reference` when it is a live (frozen model) reference; else a UserInputError."""
    reference = getattr(pl_module, "reference", None)
    model = getattr(reference, "model", None)
    if not isinstance(model, nn.Module):
        mode = getattr(pl_module, "reference_mode", type(reference).__name__)
        raise UserInputError(
            f"ReferenceSync needs a live reference model to update, but the module's reference is {mode!r} "
            f"({type(reference).__name__}). Use model.reference='live' or remove the ReferenceSync callback."
        )
    return model


def layout(model: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """(shape, dtype) of every parameter and buffer; a ZeRO-3 partitioned parameter's full shape (`ds_shape`)."""
    return {n: (getattr(t, "ds_shape", t.shape), t.dtype) for n, t in [*model.named_parameters(), *model.named_buffers()]}


def check_same_layout(reference: nn.Module, policy: nn.Module) -> None:
    """Raise a UserInputError unless both models have the same parameter and buffer names, shapes and dtypes."""
    ref, pol = layout(reference), layout(policy)
    if ref == pol:
        return
    only_ref, only_pol = sorted(ref.keys() - pol.keys()), sorted(pol.keys() - ref.keys())
    differ = sorted(n for n in ref.keys() & pol.keys() if ref[n] != pol[n])
    detail = "; ".join(f"{what}: {names[:3]}{' ...' if len(names) > 3 else ''}" for what, names in
                       [("only in the reference", only_ref), ("only in the policy", only_pol),
                        ("different shape or dtype", differ)] if names)
    raise UserInputError(
        f"ReferenceSync needs a reference with the policy's exact architecture ({detail}). "
        "A different or quantized model (model.reference_name_or_path) cannot be synced towards the policy."
    )


@torch.no_grad()
def sync_reference(reference: nn.Module, policy: nn.Module, alpha: float, mode: SyncMode = "soft") -> None:
    """In place: ref ← α·θ + (1 − α)·ref (soft) or ref ← θ (hard), for every parameter and buffer.

    Under DeepSpeed ZeRO-3 (both models partitioned) this is a collective on every rank, one module at
    a time (`sync_partitioned`).
    """
    check_same_layout(reference, policy)
    if is_partitioned(reference) or is_partitioned(policy):
        sync_partitioned(reference, policy, alpha, mode)
    else:
        theta = {**dict(policy.named_parameters()), **dict(policy.named_buffers())}
        for name, ref in [*reference.named_parameters(), *reference.named_buffers()]:
            update(ref, theta[name], alpha, mode)
    reference.eval()
    reference.requires_grad_(False)


def update(ref: torch.Tensor, theta: torch.Tensor, alpha: float, mode: SyncMode) -> None:
    new = theta.to(ref.device)
    if mode == "hard" or not ref.is_floating_point():
        ref.copy_(new)
    else:
        ref.mul_(1.0 - alpha).add_(new, alpha=alpha)


def sync_partitioned(reference: nn.Module, policy: nn.Module, alpha: float, mode: SyncMode) -> None:
    """`sync_reference` for ZeRO-3 models: per module, gather θ (read-only) and ref (rank 0 writes), update.

    Every rank computes the same update on the gathered weights; leaving the context re-partitions
    rank 0's. Only two modules' weights are whole at a time. A parameter shared by two modules (tied
    embeddings) is updated once, as `named_parameters` lists it once.
    """
    import deepspeed

    policy_modules = dict(policy.named_modules())
    done: set[int] = set()
    for name, ref_module in reference.named_modules():
        theta_module = policy_modules[name]
        pairs = [(p, theta_module.get_parameter(n)) for n, p in ref_module.named_parameters(recurse=False)
                 if id(p) not in done]
        done.update(id(p) for p, _ in pairs)
        with deepspeed.zero.GatheredParameters([t for _, t in pairs], modifier_rank=None), \
                deepspeed.zero.GatheredParameters([p for p, _ in pairs], modifier_rank=0):
            for ref, theta in pairs:
                update(ref, theta, alpha, mode)
        for n, buffer in ref_module.named_buffers(recurse=False):  # buffers are whole on every rank
            update(buffer, theta_module.get_buffer(n), alpha, mode)


class ReferenceSync(L.Callback):
    """TR-DPO: move the live reference towards the policy every `every_n_steps` optimizer steps."""

    def __init__(self, every_n_steps: int = 512, alpha: float = 0.6, mode: SyncMode = "soft"):
        """Reference update schedule.

        Args:
            every_n_steps: τ, optimizer steps between two updates (counted by trainer.global_step).
            alpha: α, weight of the policy in the soft update α·θ + (1 − α)·ref (ignored in hard mode).
            mode: soft (weighted average, TR-DPO^α) or hard (copy the policy, TR-DPO^τ).
        """
        if every_n_steps < 1:
            raise UserInputError(f"ReferenceSync.every_n_steps must be >= 1, got {every_n_steps}")
        if not 0.0 <= alpha <= 1.0:
            raise UserInputError(f"ReferenceSync.alpha must be in [0, 1], got {alpha}")
        if mode not in ("soft", "hard"):
            raise UserInputError(f"ReferenceSync.mode must be 'soft' or 'hard', got {mode!r}")
        self.every_n_steps = every_n_steps
        self.alpha = alpha
        self.mode = mode
        self.syncs = 0
        self.last_synced_step = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Fail before the first step, not after τ of them.
        check_same_layout(live_reference_model(pl_module), pl_module.policy)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # `global_step` counts optimizer steps: with gradient accumulation it stays put on the
        # micro-batches that do not step, so `last_synced_step` keeps one step from syncing twice.
        step = trainer.global_step
        if step > self.last_synced_step and step % self.every_n_steps == 0:
            sync_reference(live_reference_model(pl_module), pl_module.policy, self.alpha, self.mode)
            self.syncs += 1
            self.last_synced_step = step
        pl_module.log("train/reference_syncs", float(self.syncs), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"syncs": self.syncs, "last_synced_step": self.last_synced_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.syncs = state_dict["syncs"]
        self.last_synced_step = state_dict["last_synced_step"]

    # Under ZeRO-3 both hooks are collectives (every rank calls them); the weights are gathered to rank 0's checkpoint.
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.syncs > 0:
            model = live_reference_model(pl_module)
            checkpoint[CHECKPOINT_KEY] = gathered_state_dict(model) if is_partitioned(model) else model.state_dict()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY in checkpoint:
            model = live_reference_model(pl_module)
            if is_partitioned(model):
                load_gathered_state_dict(model, checkpoint[CHECKPOINT_KEY])
            else:
                model.load_state_dict(checkpoint[CHECKPOINT_KEY])
