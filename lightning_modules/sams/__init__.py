"""SamS: a learned sample scheduler held by any pairwise module (SPEC section 6).

    scheduler.py   `SamS`: gathers the global batch, labels the last selection, trains f1 / f2, selects k pairs
    networks.py    `SchedulerNetworks`: the exploitation (f1) and exploration (f2) networks, an `nn.Module`
    context.py     `pair_contexts`: per-layer hidden states of the training forward, pooled per pair
    rewards.py     r_B, r_S and the target y: pure functions of detached losses and log-probs
    pool.py        `ReplayPool`: the bounded FIFO of past labelled batches
    collective.py  gather every rank's rows / broadcast rank 0's selection (identities in one process)
    pretrain.py    `SamSPretrainModule`: the scheduler trained with the SFT loss, policy frozen; saved by path

`DPOModule(sample_scheduler=SamS(...))` (and so the multi-reference and on-policy modules) trains on the
selected pairs only. `pretrain.py` is not imported here: it builds on `DPOModule`, which imports this package.
"""

from lightning_modules.sams.networks import SchedulerNetworks
from lightning_modules.sams.pool import ReplayPool
from lightning_modules.sams.scheduler import SamS, Selected, Selection

__all__ = ["ReplayPool", "SamS", "SchedulerNetworks", "Selected", "Selection"]
