"""Frozen reference models, optionally stored 8-bit or 4-bit (nf4) through bitsandbytes (SPEC section 3).

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


def check_bitsandbytes(quantization: Quantization, device: torch.device) -> None:
    """Raise `UserInputError` unless bitsandbytes can quantize (and multiply) on `device`.

    Imports bitsandbytes, checks its version for CPU use, and runs the op the layers will need on a
    64 x 64 tensor, so an unsupported backend fails here with a message instead of mid-training.
    """
    hint = f"set {CONFIG_KEY}: none (float reference), or run where bitsandbytes supports {device.type}"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception as error:  # ImportError, or a broken native library raising at import
        raise UserInputError(f"{CONFIG_KEY}: {quantization} needs bitsandbytes, which failed to import "
                             f"({type(error).__name__}: {error}); {hint}") from error
    version = tuple(int(part) for part in bnb.__version__.split(".")[:2] if part.isdigit())
    if device.type == "cpu" and version < MIN_BNB_CPU:
        raise UserInputError(f"{CONFIG_KEY}: {quantization} on CPU needs bitsandbytes >= "
                             f"{'.'.join(map(str, MIN_BNB_CPU))}, found {bnb.__version__}; {hint}")
    try:
        weight = torch.randn(64, 64, device=device)
        if quantization == "8bit":
            F.int8_vectorwise_quant(weight.half())
        else:
            packed, state = F.quantize_4bit(weight, quant_type="nf4")
            F.dequantize_4bit(packed, state)
    except Exception as error:
        raise UserInputError(f"{CONFIG_KEY}: bitsandbytes {bnb.__version__} cannot run {quantization} "
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
        device = torch.device(device) if device is not None else default_device()
        check_bitsandbytes(quantization, device)
        if quantization == "8bit":
            _quiet_int8_cast_warning()
        model = load_causal_lm(name_or_path, dtype=dtype, quantization_config=bnb_config(quantization, dtype),
                               device_map={"": device})
        if quantization == "4bit" and device.type == "cpu":
            _skip_unsupported_cpu_packing(model)
        quantized, total = quantized_linear_count(model)
        log.info("reference %s: %d of %d linear layers stored %s on %s", name_or_path, quantized, total,
                 quantization, device)
    model.eval()
    model.requires_grad_(False)
    return model


def _skip_unsupported_cpu_packing(model: nn.Module) -> int:
    """Keep 4-bit layers whose shape bnb's fused CPU kernel cannot take on the dequantize path.

    bitsandbytes 0.50 repacks a `Linear4bit` for its AVX512-BF16 kernel on the first CPU forward
    and fails (`shape '[32, 0]' is invalid`) unless out_features % 32 == 0 and in_features is a
    multiple of the 64-weight block. Such layers instead dequantize nf4 -> compute dtype + `F.linear`
    (bnb's generic `gemm_4bit`), still from the 4-bit storage. Returns how many layers were switched.
    """
    switched = 0
    for layer in model.modules():
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if getattr(layer, "support_avx512bf16_for_cpu", False) and state is not None:
            if layer.out_features % 32 or layer.in_features % state.blocksize:
                layer.support_avx512bf16_for_cpu = False
                switched += 1
    return switched


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
