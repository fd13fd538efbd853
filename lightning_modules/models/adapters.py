"""LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023) policies through peft, and their adapters-off reference.

    policy = load_lora_policy("runs/demo/sft/export", LoraSpec(r=16, alpha=32))   # a peft PeftModelForCausalLM
    with adapters_disabled(policy):                                              # ... run as its base model
        logps = concatenated_forward(policy, batch)

peft replaces every target linear layer `W` by `W x + (α/r)·B A x` with `A` (r × in, Kaiming-uniform)
and `B` (out × r) zero, so a freshly adapted policy equals its base model exactly. Only `A` and `B`
train (peft freezes the rest). With adapters disabled (peft's `disable_adapter()`) the policy *is*
its base model, which is the DPO reference of a LoRA policy: no second copy of the weights (SPEC
section 3). The returned `PeftModelForCausalLM` is called, `.generate`s and reports `.device` like the
Hugging Face model it wraps, but its own `save_pretrained` writes only the adapter: export with
`merged_copy` (a plain model with the adapters folded in).

QLoRA (`LoraSpec.base_quantization: 4bit`): the base is loaded with its linear layers stored nf4
through bitsandbytes (`quantization.load_quantized_causal_lm`), then `peft.prepare_model_for_kbit_training`
(freezes the base and casts fp16/bf16 *non*-quantized parameters, i.e. embeddings, norms and the tied
output head, to float32 for stable training; the nf4 weights stay 4-bit, so memory still shrinks;
with `dtype: float32` it only freezes), then LoRA on top. On CPU the quantized layers never use bnb's
fused AVX512-BF16 kernel: see `quantization.load_quantized_causal_lm(cpu_fused_kernel=False)`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import PreTrainedModel

from datamodules.utils.errors import UserInputError
from lightning_modules.models.loading import Dtype, load_causal_lm
from lightning_modules.models.quantization import load_quantized_causal_lm
from lightning_modules.models.zero import writable

BaseQuantization = Literal["none", "4bit"]
QUANTIZATION_KEY = "model.lora.base_quantization"


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
    """Names (last path component) of the linear layers to adapt."""
    base_quantization: BaseQuantization = "none"
    """none: base weights in dtype; 4bit: nf4 via bitsandbytes (QLoRA), and the DPO reference is that 4-bit base."""


def lora_config(spec: LoraSpec) -> LoraConfig:
    """The peft `LoraConfig` of `spec` (B = 0 at init: a fresh policy equals its base)."""
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM")


def apply_lora(model: PreTrainedModel, spec: LoraSpec, *, seed: int | None = None) -> PeftModel:
    """Freeze `model` and wrap it (in place: its target layers are replaced) in a peft LoRA `PeftModel`.

    The adapters are then initialised again by `init_adapters` from `seed` (default: the seed torch was last
    seeded with, i.e. the run's `seed_everything`), so that every strategy starts from the same A.
    """
    try:
        peft_model = get_peft_model(model, lora_config(spec))
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        if "not found" not in str(error):
            raise
        raise UserInputError(f"model.lora.target_modules={list(spec.target_modules)} match no linear layer "
                             f"of the model ({error})") from error
    init_adapters(peft_model, torch.initial_seed() if seed is None else seed)
    return peft_model


def init_adapters(model: PeftModel, seed: int) -> None:
    """peft's own LoRA initialisation (A Kaiming-uniform, B = 0), layer by layer from a generator seeded with `seed`.

    Two reasons it is redone after `get_peft_model`:
    - under ZeRO-3 the adapters are created inside `deepspeed.zero.Init`, so peft's in-place init writes
      into empty placeholders and B would keep `nn.Linear`'s random values (the fresh policy would not be
      its base). `zero.writable` gathers each layer's adapters for the init and re-partitions them;
    - the values then depend on `seed` only, not on how many random numbers loading drew before (which
      differs between strategies), so one process, DDP and ZeRO-3 start from the same adapters.
    The global RNG state is left as it was.
    """
    from peft.tuners.lora import LoraLayer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in model.modules():
            if not isinstance(layer, LoraLayer):
                continue
            for adapter in layer.lora_A:
                params = [*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters()]
                with torch.no_grad(), writable(params):
                    layer.reset_lora_parameters(adapter, init_lora_weights=True)


def load_lora_policy(
    name_or_path: str,
    spec: LoraSpec,
    *,
    dtype: Dtype = "float32",
    device: str | torch.device | None = None,
) -> PeftModel:
    """Load the base model (float, or nf4 for QLoRA) and put fresh LoRA adapters on it.

    Args:
        name_or_path: hub id or local folder of the base (HF `from_pretrained` layout).
        spec: adapter shape and the base's storage (`spec.base_quantization`).
        dtype: dtype of the float base, or of the 4-bit base's float parts and compute.
        device: where a 4-bit base is quantized (bitsandbytes quantizes while loading); default
            `quantization.default_device()`. Ignored for a float base (loads on CPU, moves with the module).
    """
    if spec.base_quantization not in get_args(BaseQuantization):
        raise UserInputError(f"{QUANTIZATION_KEY}: {spec.base_quantization!r} is not one of "
                             f"{list(get_args(BaseQuantization))}")
    if spec.base_quantization == "none":
        return apply_lora(load_causal_lm(name_or_path, dtype=dtype), spec)
    base = load_quantized_causal_lm(name_or_path, quantization=spec.base_quantization, dtype=dtype, device=device,
                                    config_key=QUANTIZATION_KEY, cpu_fused_kernel=False)
    # Gradient checkpointing is left to PolicyModule (`gradient_checkpointing`), not forced on here.
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return apply_lora(base, spec)


def has_adapters(model: nn.Module) -> bool:
    """Whether `model` is a peft model (a LoRA / QLoRA policy)."""
    return isinstance(model, PeftModel)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base model (all adapters off) inside the block; a model without adapters is unchanged."""
    with model.disable_adapter() if has_adapters(model) else nullcontext():
        yield model


def has_4bit_base(model: nn.Module) -> bool:
    """Whether `model` holds bitsandbytes 4-bit weights (two nf4 codes per uint8 byte): a QLoRA policy."""
    return any(p.dtype == torch.uint8 for p in model.parameters())


def merged_copy(model: PeftModel) -> PreTrainedModel:
    """A plain HF model equal to `model` with every adapter folded into its base weight; `model` is not touched.

    Float base: a deep copy, then peft's `merge_and_unload` (W ← W + (α/r)·B A). 4-bit (QLoRA) base:
    merging into the nf4 layers would re-quantize W + (α/r)·B A (lossy, and the result would still
    be a bitsandbytes model), so the merge happens in a float copy instead: see `dequantized_base`.
    """
    if not has_4bit_base(model):
        merged = copy.deepcopy(model).merge_and_unload()
    else:
        config = copy.deepcopy(model.peft_config[model.active_adapter])
        float_model = get_peft_model(dequantized_base(model), config)
        set_peft_model_state_dict(float_model, get_peft_model_state_dict(model))  # the trained A, B
        merged = float_model.merge_and_unload()
    return merged.requires_grad_(True)


def merged_state_dict(model: PeftModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of `model`'s base with every active adapter folded in (W + (α/r)·B A), under the base's keys.

    `state` is `model`'s full state dict, e.g. gathered from ZeRO-3 partitions (`zero.gathered_state_dict`),
    where `merged_copy`'s deep copy is not possible. Float bases only: the sums are taken in float32 and
    cast back to each weight's dtype, as peft's merge does. The keys lose peft's `base_model.model.`
    prefix and `.base_layer`, and the adapter tensors are dropped, so `model.get_base_model().save_pretrained(
    ..., state_dict=...)` writes a plain model.
    """
    from peft.tuners.lora import LoraLayer

    merged = dict(state)
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter in layer.active_adapters:
            a, b = merged[f"{name}.lora_A.{adapter}.weight"], merged[f"{name}.lora_B.{adapter}.weight"]
            delta = (b.float() @ a.float()) * layer.scaling[adapter]
            weight = merged[f"{name}.base_layer.weight"]
            merged[f"{name}.base_layer.weight"] = (weight.float() + (delta.T if layer.fan_in_fan_out else delta)
                                                   ).to(weight.dtype)
    prefix = "base_model.model."
    return {key.removeprefix(prefix).replace(".base_layer.", "."): value for key, value in merged.items()
            if ".lora_" not in key}


def dequantized_base(model: PeftModel) -> PreTrainedModel:
    """A float (CPU) copy of the 4-bit base of `model`, in the 4-bit layers' compute dtype (PolicyModule's `dtype`).

    The architecture and the float parts (embeddings, norms, output head: frozen, never quantized)
    are loaded again from the base's `name_or_path`; every nf4 linear weight is then overwritten by
    its dequantization (nf4 code × block absmax). So the merged export is the model that was
    trained and whose adapters-off forward was the reference (up to float rounding), not the
    original float checkpoint plus adapters fitted to the quantized one.
    """
    import bitsandbytes as bnb

    base = model.get_base_model()
    quantized = {name.removesuffix(".base_layer"): layer for name, layer in base.named_modules()
                 if isinstance(layer, bnb.nn.Linear4bit)}
    dtype = next(iter(quantized.values())).compute_dtype or torch.float32
    float_model = load_causal_lm(base.name_or_path, dtype=str(dtype).removeprefix("torch."))
    with torch.no_grad():
        for name, layer in quantized.items():
            state = layer.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):  # bnb's fused-CPU layout, never used for QLoRA
                raise RuntimeError(f"{name}: 4-bit weight is in bitsandbytes' packed CPU layout; cannot dequantize")
            weight = bnb.functional.dequantize_4bit(layer.weight.data, state)
            float_model.get_submodule(name).weight.copy_(weight.to("cpu", dtype))
    return float_model
