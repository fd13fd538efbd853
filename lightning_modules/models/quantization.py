"""Frozen reference models, optionally stored 8-bit or 4-bit (nf4) through bitsandbytes (SPEC section 3), and
the 4-bit base of a QLoRA policy.

    model = load_reference_model("runs/demo/sft/export", quantization="4bit")
    logps = concatenated_forward(model, batch)          # same helper as the policy

One path on every device: `transformers.BitsAndBytesConfig` passed to `from_pretrained`, which swaps
each `nn.Linear` except the output head (tied to the embedding, kept float) for a bitsandbytes layer
built from the float checkpoint while loading. What then runs (checked with bitsandbytes 0.50.2):

- 8bit: `bnb.nn.Linear8bitLt` holding an int8 (out, in) weight and one float32 scale per output
  row (`SCB`). Forward (CPU and CUDA alike, LLM.int8): activations are cast to fp16 and quantized
  per row to int8, multiplied int8 x int8 -> int32 (`torch._int_mm` on AVX-512 CPUs, bnb's
  fp32-matmul emulation on other CPUs, bnb's kernels on CUDA), rescaled;
  activation columns with an outlier > 6.0 go through fp16 instead (mixed decomposition).
- 4bit: `bnb.nn.Linear4bit(quant_type="nf4")` holding two 4-bit codes per uint8 byte and one absmax
  per 64 weights. CPU forward (bnb >= 0.45 CPU backend, eval + no_grad): on AVX512-BF16 machines the
  weight is repacked on the first forward and run by bnb's fused nf4 kernel in **bf16** (activations
  cast to bf16, output cast back); other CPUs, and layer shapes that kernel rejects (see
  `_skip_unsupported_cpu_packing`), dequantize nf4 to the compute dtype and call `F.linear`. CUDA
  forward: bnb's nf4 GEMM/GEMV in the compute dtype (`dtype`).

So CPU 4-bit numbers include bf16 activation rounding on top of nf4 weight rounding. The CUDA path
is the same code with `device="cuda:N"`; it was not exercised on this CPU-only machine. Embeddings
and norms stay in `dtype`. Callers keep the model outside any DeepSpeed engine (ZeRO cannot shard
bitsandbytes tensors) and must not cast it with `.to(dtype)` (that would break the int8 / nf4 storage).

A QLoRA policy's base (`adapters.load_lora_policy`) loads through the same `load_quantized_causal_lm`
but is trained through, so none of its layers takes the fused CPU kernel (`cpu_fused_kernel=False`):
its CPU forward is always nf4 -> compute dtype + `F.linear`, with autograd, in train and eval alike.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from datamodules.utils.errors import UserInputError
from lightning_modules.models.loading import Dtype, load_causal_lm

Quantization = Literal["none", "8bit", "4bit"]
CONFIG_KEY = "model.reference_quantization"
MIN_BNB_CPU = (0, 45)  # first bitsandbytes release with a CPU backend for int8 / nf4 inference

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """The current CUDA device when there is one (set per rank by Lightning), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def bnb_config(quantization: Quantization, dtype: Dtype = "float32") -> BitsAndBytesConfig | None:
    """The `from_pretrained` quantization config of `quantization` (None for "none")."""
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=getattr(torch, dtype))
    return None


def check_bitsandbytes(quantization: Quantization, device: torch.device, config_key: str = CONFIG_KEY) -> None:
    """Raise `UserInputError` (naming `config_key`) unless bitsandbytes can quantize (and multiply) on `device`.

    Imports bitsandbytes, checks its version for CPU use, and runs the op the layers will need on a
    64 x 64 tensor, so an unsupported backend fails here with a message instead of mid-training.
    """
    hint = f"set {config_key}: none (float weights), or run where bitsandbytes supports {device.type}"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception as error:  # ImportError, or a broken native library raising at import
        raise UserInputError(f"{config_key}: {quantization} needs bitsandbytes, which failed to import "
                             f"({type(error).__name__}: {error}); {hint}") from error
    version = tuple(int(part) for part in bnb.__version__.split(".")[:2] if part.isdigit())
    if device.type == "cpu" and version < MIN_BNB_CPU:
        raise UserInputError(f"{config_key}: {quantization} on CPU needs bitsandbytes >= "
                             f"{'.'.join(map(str, MIN_BNB_CPU))}, found {bnb.__version__}; {hint}")
    try:
        weight = torch.randn(64, 64, device=device)
        if quantization == "8bit":
            F.int8_vectorwise_quant(weight.half())
        else:
            packed, state = F.quantize_4bit(weight, quant_type="nf4")
            F.dequantize_4bit(packed, state)
    except Exception as error:
        raise UserInputError(f"{config_key}: bitsandbytes {bnb.__version__} cannot run {quantization} "
                             f"quantization on {device} ({type(error).__name__}: {error}); {hint}") from error


class _DropRepeats(logging.Filter):
    """Let a message through once: LLM.int8 logs its fp16 activation cast on every layer call."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _quiet_int8_cast_warning() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropRepeats) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropRepeats("MatMul8bitLt: inputs will be cast"))


def load_quantized_causal_lm(
    name_or_path: str,
    *,
    quantization: Literal["8bit", "4bit"],
    dtype: Dtype = "float32",
    device: str | torch.device | None = None,
    config_key: str = CONFIG_KEY,
    cpu_fused_kernel: bool = True,
) -> PreTrainedModel:
    """A causal LM whose linear layers (all but the output head) bitsandbytes stores int8 / nf4 on `device`.

    Mode and `requires_grad` are left as `from_pretrained` returns them. Used by the frozen reference
    (`load_reference_model`) and by the QLoRA policy's base (`adapters.load_lora_policy`).

    Args:
        name_or_path: hub id or local folder (HF `from_pretrained` layout).
        quantization: "8bit" (LLM.int8) or "4bit" (nf4, block size 64); see the module docstring.
        dtype: dtype of the float parts (embeddings, norms, output head) and the 4-bit compute dtype.
        device: where quantized weights are created (bitsandbytes quantizes while loading); default
            `default_device()`.
        config_key: the config option named in errors (bitsandbytes missing or unable to run on `device`).
        cpu_fused_kernel: let 4-bit layers of a supported shape repack for bnb's fused AVX512-BF16 CPU
            kernel (inference only). False for a base that trains (QLoRA): see `_skip_unsupported_cpu_packing`.
    """
    device = torch.device(device) if device is not None else default_device()
    check_bitsandbytes(quantization, device, config_key)
    import bitsandbytes as bnb  # after the check, which turns a failing import into a UserInputError

    if quantization == "8bit":
        _quiet_int8_cast_warning()
    model = load_causal_lm(name_or_path, dtype=dtype, quantization_config=bnb_config(quantization, dtype),
                           device_map={"": device})
    if quantization == "4bit":
        for layer in model.modules():
            if isinstance(getattr(layer, "weight", None), bnb.nn.Params4bit):  # checkpoints: see the two hooks
                layer.register_state_dict_pre_hook(_unpack_before_saving)
                layer.register_load_state_dict_pre_hook(_load_4bit_statistics)
        if device.type == "cpu":
            _skip_unsupported_cpu_packing(model, every_layer=not cpu_fused_kernel)
    quantized, total = quantized_linear_count(model)
    log.info("%s: %d of %d linear layers stored %s on %s", name_or_path, quantized, total, quantization, device)
    return model


def load_reference_model(
    name_or_path: str,
    *,
    dtype: Dtype = "float32",
    quantization: Quantization = "none",
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """A frozen reference: eval mode (dropout off), `requires_grad(False)`, optionally quantized.

    Args:
        name_or_path: hub id or local folder (HF `from_pretrained` layout).
        dtype: dtype of the float parts (embeddings, norms, output head) and the 4-bit compute dtype.
        quantization: "none", "8bit" (LLM.int8) or "4bit" (nf4, block size 64); see the module docstring.
        device: where quantized weights are created (bitsandbytes quantizes while loading); default
            `default_device()`. Ignored for "none": float weights load on CPU and move like the policy.
    """
    if quantization not in get_args(Quantization):
        raise UserInputError(f"{CONFIG_KEY}: {quantization!r} is not one of {list(get_args(Quantization))}")
    if quantization == "none":
        model = load_causal_lm(name_or_path, dtype=dtype)
    else:
        model = load_quantized_causal_lm(name_or_path, quantization=quantization, dtype=dtype, device=device)
    model.eval()
    model.requires_grad_(False)
    return model


def _skip_unsupported_cpu_packing(model: nn.Module, *, every_layer: bool = False) -> int:
    """Keep 4-bit layers off bnb's fused CPU kernel: those of a shape it cannot take, or all (`every_layer`).

    bitsandbytes 0.50 repacks a `Linear4bit` for its AVX512-BF16 kernel on the first CPU forward in
    eval mode under no_grad, and fails (`shape '[32, 0]' is invalid`) unless out_features % 32 == 0
    and in_features is a multiple of the 64-weight block. Such layers instead dequantize nf4 ->
    compute dtype + `F.linear` (bnb's generic `gemm_4bit`), still from the 4-bit storage.

    `every_layer` is for a base that trains (QLoRA): the repacking happens *in place* (new layout,
    absmax cast to bf16), so after one eval pass (the adapters-off reference, generation) the train
    forward of a repacked layer runs `gemv_4bit`, which has no autograd kernel; torch only warns
    ("an autograd kernel was not registered ... silently incorrect behavior") and the gradient
    through that layer to earlier adapters is wrong (15-60% relative error measured on the tiny
    test model). Returns how many layers were switched.
    """
    switched = 0
    for layer in model.modules():
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if getattr(layer, "support_avx512bf16_for_cpu", False) and state is not None:
            if every_layer or layer.out_features % 32 or layer.in_features % state.blocksize:
                layer.support_avx512bf16_for_cpu = False
                switched += 1
    return switched


def _unpack_cpu_4bit(layer: nn.Module) -> None:
    """Return a 4-bit layer repacked for bnb's fused CPU kernel to the canonical layout (no-op otherwise).

    bitsandbytes 0.50.2's own inverse (`_convert_weight_packed_for_cpu_inverse`, run by
    `Linear4bit._save_to_state_dict`) restores the codes but, without double quantization, leaves
    absmax in the kernel's (in/64, out) bf16 layout; the next forward then repacks it as if it were
    (out, in/64) and scrambles the blocks of every layer with in_features > 64. Here absmax goes back
    to the canonical flat (out · in/64,) float32 order too (keeping the kernel's bf16 rounding).
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = layer.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return
    absmax = state.absmax.T.reshape(-1).float()  # (in/64, out) -> (out, in/64), flattened
    layer.weight.data, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    if not state.nested:  # a nested state had its absmax re-quantized correctly by the inverse
        state.absmax = absmax
    layer.weight.quant_state = state


def _unpack_before_saving(layer: nn.Module, prefix: str, keep_vars: bool) -> None:
    """`state_dict` pre-hook of a 4-bit layer: unpack correctly before bnb's `_save_to_state_dict` would, wrongly.

    Without it, every `state_dict()` (each Lightning checkpoint) of a CPU 4-bit reference that has run
    on the fused kernel silently corrupts the live model (see `_unpack_cpu_4bit`).
    """
    _unpack_cpu_4bit(layer)


def _load_4bit_statistics(layer: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args) -> None:
    """`load_state_dict` pre-hook of a 4-bit layer: take the quantization statistics saved beside its weight.

    bitsandbytes 0.50.2 `Linear4bit` saves `weight.absmax`, `weight.quant_map` and
    `weight.quant_state.bitsandbytes__nf4` but has no loader for them, so a strict `load_state_dict`
    (a Lightning checkpoint of a QLoRA policy or of a 4-bit reference) fails on unexpected keys. The
    packed codes load as the `weight` parameter; the block absmax and the code book are copied into
    the layer's quant state; the packed metadata (shape, dtype, block size) is fixed by the layer and
    dropped. `bnb_config` uses no double quantization, so there are no `weight.nested_*` keys.
    """
    _unpack_cpu_4bit(layer)
    targets = {"absmax": layer.weight.quant_state.absmax, "quant_map": layer.weight.quant_state.code}
    for key in [k for k in state_dict if k.startswith(prefix + "weight.")]:
        value = state_dict.pop(key)
        if key.removeprefix(prefix + "weight.") in targets:
            targets[key.removeprefix(prefix + "weight.")].copy_(value)


def quantized_linear_count(model: nn.Module) -> tuple[int, int]:
    """(linear layers stored by bitsandbytes as int8 / packed 4-bit, all linear layers)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    quantized = [m for m in linears if m.weight.dtype in (torch.int8, torch.uint8)]
    return len(quantized), len(linears)


def _quant_state_tensors(layer: nn.Linear) -> list[Tensor]:
    """Statistics a bitsandbytes layer keeps outside `parameters()`: 8-bit row scales, 4-bit absmax."""
    # Linear8bitLt moves the row scales from weight.SCB to state.SCB on its first forward.
    tensors = [getattr(layer.weight, "SCB", None), getattr(getattr(layer, "state", None), "SCB", None)]
    state = getattr(layer.weight, "quant_state", None)
    while state is not None:  # nested (double-quant) states carry a second absmax/code in state2
        tensors += [state.absmax, state.code, getattr(state, "offset", None)]
        state = getattr(state, "state2", None)
    return [t for t in tensors if isinstance(t, Tensor)]


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes held by parameters, buffers and bitsandbytes quantization statistics, each tensor once.

    `PreTrainedModel.get_memory_footprint()` counts parameters and buffers only, so it misses the
    per-row int8 scales (`weight.SCB`, 4 bytes per output row) and the nf4 absmax (one per 64
    weights); both are added here. Tied weights (embedding = output head) count once.
    """
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for m in model.modules() if isinstance(m, nn.Linear) for t in _quant_state_tensors(m)]
    for tensor in tensors:
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
