"""Multi-reference preference optimization (SPEC sections 2 and 4): MRPO / MDPO with α from a weighting strategy.

    module.py    `MultiReferenceModule`: DPOModule against K cached references, α from `weighting`
    signals.py   d (margins) and c (verdicts) of the K references on a batch, pure
    base.py      `WeightingStrategy` (the lifecycle and the resume contract) and `WeightingContext`
    online.py    Fixed, ARWC, SWCW, SWCWOneHot: from the config or the training batches
    offline.py   VDW, VAW: from the validation split, once, before training
    bandit.py    TSW: Thompson sampling over references, rewarded by validation accuracy

In a config: `model.class_path: lightning_modules.multiref.MultiReferenceModule` and
`model.init_args.weighting: VAW` (or `{class_path: Fixed, init_args: {weights: [0.5, 0.3, 0.2]}}`).
"""

from lightning_modules.multiref.bandit import TSW
from lightning_modules.multiref.base import WeightingContext, WeightingStrategy
from lightning_modules.multiref.module import MultiReferenceModule
from lightning_modules.multiref.offline import VAW, VDW
from lightning_modules.multiref.online import ARWC, SWCW, Fixed, SWCWOneHot
from lightning_modules.multiref.signals import ReferenceSignals, batch_signals, normalized, reference_signals

STRATEGIES: dict[str, type[WeightingStrategy]] = {
    "fixed": Fixed, "arwc": ARWC, "vdw": VDW, "vaw": VAW, "swcw": SWCW, "swcw_onehot": SWCWOneHot, "tsw": TSW,
}

__all__ = ["ARWC", "STRATEGIES", "SWCW", "TSW", "VAW", "VDW", "Fixed", "MultiReferenceModule", "ReferenceSignals",
           "SWCWOneHot", "WeightingContext", "WeightingStrategy", "batch_signals", "normalized", "reference_signals"]
