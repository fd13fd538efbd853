"""Preference objectives: pure functions of per-sequence log-probs, chosen by name or by typed config.

- `base`: `PreferenceLossOutput`, the `OBJECTIVES` registry, the `Objective` config base class.
- `pairwise`: sigmoid (DPO), cdpo, ipo, hinge, sft (Pref-FT), one reference (B,).
- `multi_reference`: mrpo (with CTRO clipping), mdpo, K references (B, K) weighted by α.
- `likelihood`: the one NLL (`nll_loss` per example, `reduce_nll` for SFT).
A new family (group or on-policy objectives) gets its own file here, importing `base`.
"""

from lightning_modules.objectives.base import (OBJECTIVES, Objective, PreferenceLossOutput, ReferenceShape,
                                               preference_metrics, register)
from lightning_modules.objectives.likelihood import NLLReduction, nll_loss, reduce_nll
from lightning_modules.objectives.multi_reference import MDPO, MRPO, mdpo_loss, mrpo_loss, per_reference_dpo_losses
from lightning_modules.objectives.pairwise import (CDPO, IPO, Hinge, PrefFT, Sigmoid, cdpo_loss, hinge_loss, ipo_loss,
                                                   prefft_loss, sigmoid_loss)

OBJECTIVE_CLASSES: dict[str, type[Objective]] = {cls.name: cls for cls in (Sigmoid, CDPO, IPO, Hinge, PrefFT, MRPO, MDPO)}

__all__ = ["OBJECTIVES", "OBJECTIVE_CLASSES", "Objective", "PreferenceLossOutput", "ReferenceShape", "register",
           "per_reference_dpo_losses",
           "preference_metrics", "nll_loss", "reduce_nll", "NLLReduction",
           "Sigmoid", "CDPO", "IPO", "Hinge", "PrefFT", "MRPO", "MDPO",
           "sigmoid_loss", "cdpo_loss", "ipo_loss", "hinge_loss", "prefft_loss", "mrpo_loss", "mdpo_loss"]
