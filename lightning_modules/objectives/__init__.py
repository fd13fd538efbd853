"""Preference objectives: pure functions of per-sequence log-probs, chosen by name or by typed config.

- `base`: `PreferenceLossOutput`, the `OBJECTIVES` registry, the `Objective` config base class.
- `pairwise`: sigmoid (DPO), cdpo, ipo, hinge, sft (Pref-FT), one reference (B,).
- `multi_reference`: mrpo (with CTRO clipping), mdpo, K references (B, K) weighted by α.
- `likelihood`: the one NLL (`nll_loss` per example, `reduce_nll` for SFT).
- `sampled`: on-policy objectives on N scored samples per prompt (P, N): filtered_bc, bon_negative, rwr,
  awr, reinforce (`Objective.inputs == "samples"`; trained by `lightning_modules.onpolicy` only).
A new family (e.g. group objectives) gets its own file here, importing `base`.
"""

from lightning_modules.objectives.base import (OBJECTIVES, Objective, ObjectiveInputs, PreferenceLossOutput,
                                               ReferenceShape, preference_metrics, register)
from lightning_modules.objectives.likelihood import NLLReduction, nll_loss, reduce_nll
from lightning_modules.objectives.multi_reference import MDPO, MRPO, mdpo_loss, mrpo_loss, per_reference_dpo_losses
from lightning_modules.objectives.pairwise import (CDPO, IPO, Hinge, PrefFT, Sigmoid, cdpo_loss, hinge_loss, ipo_loss,
                                                   prefft_loss, sigmoid_loss)
from lightning_modules.objectives.sampled import (AWR, RWR, BoNNegative, FilteredBC, Reinforce, SampledLossOutput,
                                                  SampledObjective, awr_loss, bon_negative_loss, filtered_bc_loss,
                                                  reinforce_loss, reinforce_rewards, rwr_loss)

OBJECTIVE_CLASSES: dict[str, type[Objective]] = {cls.name: cls for cls in (
    Sigmoid, CDPO, IPO, Hinge, PrefFT, MRPO, MDPO, FilteredBC, BoNNegative, RWR, AWR, Reinforce)}

__all__ = ["OBJECTIVES", "OBJECTIVE_CLASSES", "Objective", "ObjectiveInputs", "PreferenceLossOutput", "ReferenceShape",
           "register", "per_reference_dpo_losses",
           "preference_metrics", "nll_loss", "reduce_nll", "NLLReduction",
           "Sigmoid", "CDPO", "IPO", "Hinge", "PrefFT", "MRPO", "MDPO",
           "sigmoid_loss", "cdpo_loss", "ipo_loss", "hinge_loss", "prefft_loss", "mrpo_loss", "mdpo_loss",
           "SampledLossOutput", "SampledObjective", "FilteredBC", "BoNNegative", "RWR", "AWR", "Reinforce",
           "filtered_bc_loss", "bon_negative_loss", "rwr_loss", "awr_loss", "reinforce_loss", "reinforce_rewards"]
