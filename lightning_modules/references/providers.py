"""Reference policies behind one interface: `provider(batch) -> (ref_chosen_logps, ref_rejected_logps)`.

Each returns tensors of shape (B,) (or (B, K) for several references). Modes (SPEC section 3):

- `live`: a frozen model (by default a copy of the initial policy), always in `eval()` with
  dropout off, run under `no_grad` through the same `concatenated_forward` as the policy.
- `precomputed`: log-probs already stored in the batch (e.g. RefDPO's `chosen_logprob`).
- `cached`: the (B, K) columns `ref_chosen_logps` / `ref_rejected_logps` that
  `datamodules.PreferenceDataModule(reference_cache=...)` reads from the cache built by
  `lightning_modules.references.cache_builder`; no model, no forward pass. Single-reference objectives get
  (B,) (K must be 1), multi-reference ones (`reference_shape == "multi"`: MRPO, MDPO) the full (B, K).
- `live` with K models (`LiveReferences`, MRPO / MDPO): K frozen models that share the policy's
  tokenizer, scored on the policy's batch and read as K cached references.
- `none`: reference-free DPO, Δref = 0 (RefDPO's "posterior probability" parameterization).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from datamodules.utils.errors import UserInputError
from lightning_modules.objectives import ReferenceShape
from lightning_modules.logprobs import PairLogps, concatenated_forward, sequence_forward
from lightning_modules.packing import supports_packing
from lightning_modules.models.adapters import adapters_disabled

ReferenceMode = Literal["live", "precomputed", "cached", "none"]


class LiveReference(nn.Module):
    """A frozen causal LM scored with the policy's own log-prob helper."""

    def __init__(self, model: nn.Module, *, average: bool = False, register: bool = True, packed: bool = False):
        """`register=False` holds `model` without making it a submodule: no DeepSpeed engine, `.to()` or
        checkpoint sees it (a quantized reference under DeepSpeed, placed on its device when loaded).
        `packed`: score padding-free (`lightning_modules.packing`) where the model's attention supports it."""
        super().__init__()
        if register:
            self.model = model
        else:
            object.__setattr__(self, "model", model)
        self.model.eval()
        self.model.requires_grad_(False)
        self.average = average
        self.packed = packed and supports_packing(model)
        self.forward_calls = 0  # counted so tests can assert when no reference pass happens
        self.train(False)  # this wrapper too, not only the wrapped model (nn.Module starts in train mode)

    def train(self, mode: bool = True) -> "LiveReference":
        """Stay in eval mode whatever the trainer asks: a reference never uses dropout."""
        return super().train(False)

    @torch.no_grad()
    def pair_logps(self, batch: dict[str, Tensor], *, average: bool | None = None) -> PairLogps:
        """Log-probs and token counts of both sides (`average`: None = this reference's own setting)."""
        self.forward_calls += 1
        return concatenated_forward(self.model, batch, average=self.average if average is None else average,
                                    packed=self.packed)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = self.pair_logps(batch)
        return out.chosen_logps, out.rejected_logps

    @torch.no_grad()
    def sequences(self, inputs: dict[str, Tensor]) -> Tensor:
        """(N,) log-probs of N right-padded sequences `input_ids` / `attention_mask` / `labels` (on-policy samples)."""
        self.forward_calls += 1
        return sequence_forward(self.model, inputs, average=self.average, packed=self.packed)[0]


class AdapterOffReference(nn.Module):
    """The reference of a LoRA / QLoRA policy: the same peft model with its adapters disabled (no second copy).

    Runs in eval mode under no_grad inside `adapters_disabled` (peft's `disable_adapter()`), then
    restores the policy's mode. For QLoRA it is the 4-bit base. The policy is held without
    registering it as a submodule, so the reference neither owns nor switches the mode of the
    policy's weights.
    """

    def __init__(self, policy: nn.Module, *, average: bool = False, packed: bool = False):
        super().__init__()
        object.__setattr__(self, "_policy", policy)
        self.average = average
        self.packed = packed and supports_packing(policy)
        self.forward_calls = 0

    @torch.no_grad()
    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        self.forward_calls += 1
        policy = self._policy
        was_training = policy.training
        policy.eval()  # a reference never uses dropout
        try:
            with adapters_disabled(policy):
                out = concatenated_forward(policy, batch, average=self.average, packed=self.packed)
        finally:
            policy.train(was_training)
        return out.chosen_logps, out.rejected_logps

    @torch.no_grad()
    def sequences(self, inputs: dict[str, Tensor]) -> Tensor:
        """(N,) log-probs of N right-padded sequences under the base model (adapters off, eval mode)."""
        self.forward_calls += 1
        policy = self._policy
        was_training = policy.training
        policy.eval()
        try:
            with adapters_disabled(policy):
                return sequence_forward(policy, inputs, average=self.average, packed=self.packed)[0]
        finally:
            policy.train(was_training)


class PrecomputedReference(nn.Module):
    """Reference log-probs read from batch columns (summed log-probs, as RefDPO ships them)."""

    def __init__(self, chosen_key: str = "ref_chosen_logps", rejected_key: str = "ref_rejected_logps"):
        super().__init__()
        self.chosen_key, self.rejected_key = chosen_key, rejected_key

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        missing = [k for k in (self.chosen_key, self.rejected_key) if k not in batch]
        if missing:
            raise UserInputError(
                f"reference='precomputed' needs batch columns {missing}, but the batch has {sorted(batch)}. "
                "Point the data module's reference columns at the dataset's stored log-probs."
            )
        return batch[self.chosen_key].float(), batch[self.rejected_key].float()


class CachedReference(nn.Module):
    """Reference log-probs of K cached references, read from (B, K) batch columns."""

    forward_calls = 0  # model passes: none, ever (the counter `LiveReference` increments)

    def __init__(self, *, shape: ReferenceShape = "single", average: bool = False):
        """`shape`: "multi" returns (B, K); "single" requires K = 1 and returns (B,). `average`: divide by counts."""
        super().__init__()
        self.shape, self.average = shape, average

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        chosen, rejected = batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps")
        if chosen is None or rejected is None or chosen.dim() != 2:
            got = "missing" if chosen is None else f"of shape {tuple(chosen.shape)}"
            raise UserInputError(
                f"reference='cached' reads (B, K) batch columns ref_chosen_logps / ref_rejected_logps from "
                f"data.reference_cache, but they are {got}. List the reference(s) under "
                "data.init_args.reference_cache (for a dataset's own log-prob columns use reference='precomputed')."
            )
        chosen, rejected = chosen.float(), rejected.float()
        if self.average:  # each reference divides by its own token counts (SPEC section 1)
            chosen = chosen / batch["ref_chosen_counts"].clamp(min=1)
            rejected = rejected / batch["ref_rejected_counts"].clamp(min=1)
        if self.shape == "multi":
            return chosen, rejected  # (B, K)
        if chosen.shape[1] != 1:
            raise UserInputError(
                f"model.objective takes one reference, but data.reference_cache lists K={chosen.shape[1]}; keep one "
                "reference there, or train MRPO / MDPO with lightning_modules.multiref.MultiReferenceModule."
            )
        return chosen[:, 0], rejected[:, 0]  # (B,)


class NoReference(nn.Module):
    """Reference-free: Δref = 0, so the implicit reward is β·logπθ(y|x)."""

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        n = batch["chosen_input_ids"].shape[0]
        zeros = torch.zeros(n, device=batch["chosen_input_ids"].device)
        return zeros, zeros.clone()

    def sequences(self, inputs: dict[str, Tensor]) -> Tensor:
        return torch.zeros(inputs["input_ids"].shape[0], device=inputs["input_ids"].device)


class LiveReferences(CachedReference):
    """K live references that share the policy's tokenizer, read as K cached ones (MRPO / MDPO).

    `columns(batch)` scores the policy's own pair batch with each model and returns the (B, K) columns
    a reference cache would give (summed log-probs, and token counts, which are the policy's since the
    tokenizer is shared); `forward` then reads them exactly as `CachedReference` does.
    """

    def __init__(self, references: list[LiveReference], *, average: bool = False):
        super().__init__(shape="multi", average=average)
        self.references = nn.ModuleList(references)

    @property
    def forward_calls(self) -> int:
        return sum(reference.forward_calls for reference in self.references)

    def columns(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`ref_chosen_logps`, `ref_rejected_logps` (float32) and `ref_*_counts`, each (B, K)."""
        outs = [reference.pair_logps(batch, average=False) for reference in self.references]

        def stack(field: str) -> Tensor:
            return torch.stack([getattr(out, field) for out in outs], dim=1)

        return {"ref_chosen_logps": stack("chosen_logps").float(), "ref_rejected_logps": stack("rejected_logps").float(),
                "ref_chosen_counts": stack("chosen_counts"), "ref_rejected_counts": stack("rejected_counts")}

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "ref_chosen_logps" not in batch:
            batch = {**batch, **self.columns(batch)}
        return super().forward(batch)
