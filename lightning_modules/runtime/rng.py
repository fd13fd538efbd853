"""RNG states in checkpoints, so a resumed run draws the same dropout masks as an uninterrupted one.

`collect()` runs on every rank while a checkpoint is written (Lightning calls `on_save_checkpoint`
everywhere, then rank 0 writes) and gathers each rank's torch / numpy / Python (and CUDA) states;
`RNGRestore` keeps them from `on_load_checkpoint` until the first training batch after resuming,
then sets this rank's. Restoring then, not at load time, matters: building the resumed
DataLoader iterator draws from the global RNG, which the uninterrupted run did at epoch start.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    """Only tensors and Python scalars / lists, so `torch.load(weights_only=True)` reads the checkpoint."""
    out = dict(state)
    if "numpy" in out:
        kind, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)]
    version, internal, gauss = out["python"]
    out["python"] = [version, list(internal), gauss]
    return out


def _native(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    if "numpy" in out:
        kind, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    return out


def collect() -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by global rank (one entry without torch.distributed)."""
    state = _plain(_collect_rng_states(include_cuda=torch.cuda.is_available()))
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


class RNGRestore:
    """Holds loaded RNG states until `apply()` sets them once (on the first training batch after loading)."""

    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] | None = None

    def load(self, states: list[dict[str, Any]] | None) -> None:
        self.pending = states

    def apply(self, global_rank: int) -> bool:
        """Set this rank's saved states if some are pending; True when it did."""
        if not self.pending:
            return False
        states, self.pending = self.pending, None
        if global_rank >= len(states):
            raise RuntimeError(f"the checkpoint holds RNG states of {len(states)} rank(s), this is rank {global_rank}: "
                               "resume with the world size it was saved with")
        _set_rng_states(_native(states[global_rank]))
        return True
