"""DeepSpeed ZeRO-3 and Hugging Face models: loading into partitioned weights, and gathering them back.

Under ZeRO-3, Lightning calls `configure_model` inside `deepspeed.zero.Init`, so every parameter a
model creates there is partitioned at once: each rank keeps 1/N of it, and the module's own tensor is
an empty placeholder. Three things need to know that:

- **Loading.** `from_pretrained` must load into the partitions, not into the placeholders (the
  placeholders make `_init_weights` fail with `IndexError ... size 0`). Transformers does that when a
  `transformers.integrations.HfDeepSpeedConfig` is alive: it reads the weights on rank 0 and scatters
  them one module at a time. `hf_zero3_config` builds one from the strategy's config; the module keeps
  it for as long as it lives, which also makes `generate` keep the ranks in step (`synced_gpus`).
- **Copies.** A deep copy of a partitioned model copies placeholders without partitions; it fails at
  its first forward (`'status': 'NOT_AVAILABLE', 'ds_numel': 0`). Models are loaded from their source
  instead (`DPOModule`'s live reference).
- **Export.** The weights a rank holds are placeholders, so `save_pretrained` would write empty
  tensors. `gathered_state_dict` gathers one module at a time on every rank (a collective) and keeps a
  CPU copy on rank 0 only, so no rank ever holds more than one module's full weights on the device.
- **Initialisation after creation.** An in-place init of a partitioned parameter (peft's `B = 0`)
  writes into the empty placeholder and changes nothing. `writable` gathers the parameters for the
  block and re-partitions rank 0's values when it ends.
- **Models that must stay whole.** A bitsandbytes model (a quantized frozen reference) cannot be
  partitioned. `outside_zero3` suspends both the init context and `HfDeepSpeedConfig` while such a
  model is built, so it loads whole on every rank; its owner keeps it out of the engine (unregistered).

`complete_deepspeed_config` fixes the one batch-size key of Lightning's DeepSpeed config (below). Without a
DeepSpeed strategy every function here is a no-op and DeepSpeed is never imported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from datamodules.utils.errors import UserInputError

MICRO_BATCH_KEY = "train_micro_batch_size_per_gpu"


def deepspeed_strategy_config(trainer: Any) -> dict[str, Any] | None:
    """The DeepSpeed config dict of `trainer`'s strategy, or None without a trainer or a DeepSpeed strategy."""
    if trainer is None:
        return None
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    return strategy.config if isinstance(strategy, DeepSpeedStrategy) else None


def zero3_config(trainer: Any) -> dict[str, Any] | None:
    """The DeepSpeed config of a ZeRO stage-3 strategy, else None."""
    config = deepspeed_strategy_config(trainer)
    return config if config is not None and (config.get("zero_optimization") or {}).get("stage") == 3 else None


def hf_zero3_config(trainer: Any):
    """A live `HfDeepSpeedConfig` for a ZeRO-3 trainer (None otherwise): keep it while the model lives.

    Transformers holds only a weak reference to it, so the caller must keep the returned object: while it
    is alive, `from_pretrained` loads into partitioned weights and `generate` syncs the ranks.
    """
    config = zero3_config(trainer)
    if config is None:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def is_partitioned(model: Any) -> bool:
    """True when `model` is a module with ZeRO-3 parameters (partitioned by `deepspeed.zero.Init`)."""
    return isinstance(model, nn.Module) and any(hasattr(p, "ds_id") for p in model.parameters())


def writable(params: Iterable[nn.Parameter]):
    """A context in which `params` hold their full values and may be written in place (same values on every rank).

    ZeRO-3 parameters: collective (`deepspeed.zero.GatheredParameters(modifier_rank=0)`; every rank must
    enter it with the same parameters), and rank 0's values are re-partitioned at the end. Ordinary
    parameters: nothing to do.
    """
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@contextmanager
def outside_zero3(hf_config: Any) -> Iterator[None]:
    """Build models whole inside the block, although Lightning's `deepspeed.zero.Init` and `hf_config` are live.

    `hf_config` is the live `HfDeepSpeedConfig` of `hf_zero3_config` (None: not ZeRO-3, nothing to do).
    Inside, `deepspeed.zero.Init` stops partitioning new parameters and transformers loads as without
    DeepSpeed; both are restored on exit. The model built there is then the caller's to keep out of
    the DeepSpeed engine (not registered as a submodule) and to place on its device.
    """
    if hf_config is None:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()
        set_hf_deepspeed_config(hf_config)


def gathered_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The full `model.state_dict()` of a ZeRO-3 model, on CPU, on rank 0; None on the other ranks.

    Collective: every rank must call it, in the same order. Parameters are gathered one module at a
    time (`deepspeed.zero.GatheredParameters`, read-only) and copied to CPU on rank 0 before the next
    module's. Tied parameters (an embedding shared with the LM head) get one CPU tensor under both keys,
    so `save_pretrained` drops the alias exactly as it does for an unpartitioned model.
    """
    import deepspeed

    rank0 = torch.distributed.get_rank() == 0
    entries = model.state_dict(keep_vars=True)  # names -> live parameters / buffers (placeholders when partitioned)
    by_module: dict[str, list[str]] = defaultdict(list)
    for key in entries:
        by_module[key.rpartition(".")[0]].append(key)
    state: dict[str, Tensor] = {}
    copies: dict[int, Tensor] = {}  # id(parameter) -> its CPU copy, shared by tied keys
    for module_name, keys in by_module.items():
        params = [entries[k] for k in keys if isinstance(entries[k], nn.Parameter)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank0:
                for key in keys:
                    tensor = entries[key]
                    if id(tensor) not in copies:
                        copies[id(tensor)] = tensor.detach().to("cpu", copy=True)
                    state[key] = copies[id(tensor)]
    return state if rank0 else None


def load_gathered_state_dict(model: nn.Module, state: dict[str, Tensor] | None) -> None:
    """Load a full state dict (rank 0's `state`; the others may pass None) into a ZeRO-3 model, in place.

    Collective, the reverse of `gathered_state_dict`: one module at a time, its partitions are gathered,
    rank 0 copies its values in, and leaving `GatheredParameters(modifier_rank=0)` re-partitions them
    from rank 0. Buffers are not partitioned: every rank gets rank 0's values by broadcast.
    """
    import deepspeed

    rank0 = torch.distributed.get_rank() == 0
    keys = model.state_dict(keep_vars=True).keys()  # the same on every rank (persistent buffers only)
    for prefix, module in model.named_modules():
        params = {n: p for n, p in module.named_parameters(prefix=prefix, recurse=False) if n in keys}
        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if rank0:
                for name, param in params.items():
                    param.copy_(state[name])
        for name, buffer in module.named_buffers(prefix=prefix, recurse=False):
            if name in keys:
                value = state[name].to(buffer.device, buffer.dtype) if rank0 else torch.empty_like(buffer)
                torch.distributed.broadcast(value, src=0)
                with torch.no_grad():
                    buffer.copy_(value)


def complete_deepspeed_config(trainer: Any) -> None:
    """Give Lightning's DeepSpeed config an integer `train_micro_batch_size_per_gpu` before DeepSpeed reads it.

    Two failures this prevents. `--trainer.strategy.init_args.logging_batch_size_per_gpu=8` on the
    command line arrives as the string '8' (the argument is `str | int`), which DeepSpeed rejects; a
    string of digits becomes the integer. Left at "auto", Lightning asks the training dataloader for its
    batch size, which fails in `validate` / `test` / `predict` (no training split is set up there); the
    data module's `batch_size` is used instead, as Lightning would in `fit`. The value only sizes
    DeepSpeed's throughput logs: gradient accumulation comes from the trainer.
    Call from a `setup` hook: Lightning formats the config before `configure_model`.
    """
    config = deepspeed_strategy_config(trainer)
    if config is None:
        return
    value = config.get(MICRO_BATCH_KEY)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit() and int(text) > 0:
            config[MICRO_BATCH_KEY] = int(text)
            return
        if text != "auto":
            raise UserInputError(f"trainer.strategy.logging_batch_size_per_gpu={value!r} (DeepSpeed's {MICRO_BATCH_KEY}) "
                                 "must be a positive integer or 'auto'")
        del config[MICRO_BATCH_KEY]
    if MICRO_BATCH_KEY not in config:
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        if isinstance(batch_size, int) and batch_size > 0:
            config[MICRO_BATCH_KEY] = batch_size
