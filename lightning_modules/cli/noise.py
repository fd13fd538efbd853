"""Known, non-actionable third-party console lines, filtered narrowly; every other line is kept."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes` (and nothing else)."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


NOISY_LOGGERS = {
    # accelerate's `extract_model_from_parallel` imports DeepSpeed inside every `save_pretrained` (the export):
    # on a machine without CUDA its accelerator probe logs this once. The DeepSpeed strategy itself is unaffected.
    "DeepSpeed": ("Setting accelerator to CPU.",),
    # Lightning's advertisements for its cloud products (every Trainer / first checkpoint)
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip: For seamless cloud",),
    "lightning.fabric.utilities.rank_zero": ("💡 Tip: For seamless cloud",),
    # bitsandbytes (imported by peft) on an AVX512-BF16 CPU: an optional faster CPU 4-bit kernel is not installed
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


def quiet_known_noise() -> None:
    """Filter the known, non-actionable third-party console lines (idempotent; every other line is kept)."""
    for name, prefixes in NOISY_LOGGERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*prefixes))
    # Lightning's own pytree helper calling a torch API that torch deprecated: nothing a user can change
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
