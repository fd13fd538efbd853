"""Multi-reference weighting strategies: where α for MRPO / MDPO comes from (SPEC section 4).

    signals.py   d (margins) and c (verdicts) of the K references on a batch, pure
    base.py      `WeightingStrategy` (the lifecycle and the resume contract) and `WeightingContext`
    online.py    Fixed, ARWC, SWCW, SWCWOneHot: from the config or the training batches
    offline.py   VDW, VAW: from the validation split, once, before training
    bandit.py    TSW: Thompson sampling over references, rewarded by validation accuracy

`MultiReferenceModule` (lightning_modules/multiref.py) takes one as `model.init_args.weighting`
(`class_path: VAW`, or `{class_path: Fixed, init_args: {weights: [0.5, 0.3, 0.2]}}`).
"""

from lightning_modules.weighting.bandit import TSW
from lightning_modules.weighting.base import WeightingContext, WeightingStrategy
from lightning_modules.weighting.offline import VAW, VDW
from lightning_modules.weighting.online import ARWC, SWCW, Fixed, SWCWOneHot
from lightning_modules.weighting.signals import ReferenceSignals, batch_signals, normalized, reference_signals

STRATEGIES: dict[str, type[WeightingStrategy]] = {
    "fixed": Fixed, "arwc": ARWC, "vdw": VDW, "vaw": VAW, "swcw": SWCW, "swcw_onehot": SWCWOneHot, "tsw": TSW,
}

__all__ = ["ARWC", "STRATEGIES", "SWCW", "TSW", "VAW", "VDW", "Fixed", "ReferenceSignals", "SWCWOneHot",
           "WeightingContext", "WeightingStrategy", "batch_signals", "normalized", "reference_signals"]
