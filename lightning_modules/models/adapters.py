"""Low-rank adapters (LoRA, Hu et al. 2021) on a frozen causal LM, and its adapters-off reference.

`W x` becomes `W x + (α/r)·B A x` with `A` (r × in) random, `B` (out × r) zero, so a freshly
adapted policy equals its base model exactly. Only `A` and `B` train. With adapters disabled the
policy *is* the base model, which is the DPO reference of a LoRA policy: no second copy of the
weights (SPEC section 3). `merged_copy` folds `(α/r)·B A` into `W` for `save_pretrained`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from datamodules.utils.errors import UserInputError


@dataclass(frozen=True)
class LoraSpec:
    """Where and how large the adapters are (the multi-reference study used r=32, α=16, all linears)."""

    r: int = 8
    """Rank of each adapter."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / r)·B A."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Names (last path component) of the nn.Linear layers to adapt."""


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update; `enabled=False` gives the base layer."""

    def __init__(self, base: nn.Linear, spec: LoraSpec):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = spec.alpha / spec.r
        self.lora_A = nn.Parameter(torch.empty(spec.r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, spec.r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.enabled:
            out = out + self.scaling * (self.dropout(x) @ self.lora_A.T @ self.lora_B.T)
        return out

    def merged_weight(self) -> Tensor:
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A)


def lora_layers(model: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in model.modules() if isinstance(m, LoRALinear))


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Freeze `model` and wrap every target `nn.Linear` in a `LoRALinear` (in place)."""
    model.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in spec.target_modules]
    if not targets:
        raise UserInputError(f"model.lora.target_modules={list(spec.target_modules)} match no nn.Linear of the model")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, LoRALinear(module, spec))
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base model (all adapters off) inside the block."""
    layers = list(lora_layers(model))
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.enabled = state


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter folded into its base weight and plain `nn.Linear` layers again."""
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoRALinear):
            with torch.no_grad():
                module.base.weight.copy_(module.merged_weight())
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name) if parent_name else merged, child, module.base)
    return merged.requires_grad_(True)
