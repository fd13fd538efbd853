"""MRPO / MDPO against K cached references, with α from a weighting strategy (SPEC sections 2 and 4).

    model:
      class_path: lightning_modules.multiref.MultiReferenceModule
      init_args:
        objective: MDPO                     # or MRPO (CTRO clipping: {class_path: MRPO, init_args: {clip_epsilon: 0.1}})
        weighting: VAW                      # Fixed, ARWC, VDW, VAW, SWCW, SWCWOneHot, TSW (lightning_modules.multiref)
    data:
      init_args:
        reference_cache: [{name_or_path: ...}, {name_or_path: ...}]   # the K references, each its own tokenizer

This is `DPOModule` with one change: `preference_losses` asks the strategy for α and logs, per
reference (named after its `name_or_path`), α (`train/alpha/<name>`) and that reference's own DPO loss
(`train/ref_loss/<name>`, monitoring only). The module is also the strategy's `WeightingContext`: it
prepares offline strategies from the validation split before the first step, calls the per-step hooks
around each optimizer step (tsw), and saves the strategy's state in every checkpoint (the resume contract).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from datamodules.reference_cache import reference_labels
from datamodules.utils.errors import UserInputError
from lightning_modules.dpo import DPOModule
from lightning_modules.logprobs import PairLogps, concatenated_forward, preference_accuracy
from lightning_modules.objectives import MDPO, Objective, PreferenceLossOutput, per_reference_dpo_losses
from lightning_modules.multiref.base import WeightingStrategy
from lightning_modules.multiref.offline import VAW
from lightning_modules.multiref.signals import ReferenceSignals, batch_signals

CHECKPOINT_KEY = "weighting"  # under checkpoint["prefopt"]


class MultiReferenceModule(DPOModule):
    """MRPO / MDPO against the K references of `data.init_args.reference_cache`, α from `weighting`."""

    def __init__(self, model_name_or_path: str, objective: Objective = MDPO(), weighting: WeightingStrategy = VAW(),
                 reference: Literal["cached"] = "cached", **kwargs: Any):
        """Multi-reference preference optimization.

        Args:
            model_name_or_path: hub id or local folder of the initial policy (HF `from_pretrained` layout).
            objective: MDPO (α-weighted sum of K DPO losses) or MRPO (DPO against the α-weighted harmonic mixture).
            weighting: where α comes from: Fixed, ARWC, VDW, VAW, SWCW, SWCWOneHot, TSW (`--model.init_args.weighting.help TSW`).
            reference: always `cached`: the K references' log-probs come from data.init_args.reference_cache.
            **kwargs: DPOModule's (beta, average_logps, sft_weight, optimizer, lora, ...).
        """
        if reference != "cached":
            raise UserInputError(f"model.reference={reference!r}: MultiReferenceModule reads the K references' "
                                 "cached log-probs (model.reference=cached, data.init_args.reference_cache)")
        super().__init__(model_name_or_path, objective=objective, reference=reference, **kwargs)
        if not isinstance(weighting, WeightingStrategy):
            raise UserInputError(f"model.weighting={weighting!r} is not a weighting strategy; use one of Fixed, ARWC, "
                                 "VDW, VAW, SWCW, SWCWOneHot, TSW (lightning_modules.multiref)")
        self.weighting = copy.deepcopy(weighting)  # the default instance is shared between calls
        self.last_alphas: Tensor | None = None  # (K,) batch mean of the last training α (AlphaFigure reads it)
        self._step_open_at: int | None = None  # global_step when the current optimizer step's first micro-batch began

    def check_objective(self, objective: Objective) -> None:
        if objective.reference_shape != "multi":
            raise UserInputError(f"model.objective={objective!r} takes one reference: use MDPO or MRPO here, or "
                                 "lightning_modules.dpo.DPOModule for single-reference objectives")

    # ---- the loss -----------------------------------------------------------------------------------------------
    def preference_losses(self, policy: PairLogps, ref_chosen: Tensor, ref_rejected: Tensor, batch: dict[str, Tensor],
                          stage: str) -> tuple[PreferenceLossOutput, dict[str, Tensor]]:
        signals = batch_signals(batch)
        self.prepare_weighting()  # validate / test without fit, or a sanity check before fit: prepare on first use
        alphas = self.weighting.alphas(signals, training=stage == "train", context=self).to(ref_chosen.device)
        out = self.objective(policy.chosen_logps, policy.rejected_logps, ref_chosen, ref_rejected, beta=self.beta,
                             alphas=alphas)
        mean_alphas = (alphas if alphas.dim() == 1 else alphas.mean(0)).detach().float()
        if stage == "train":
            self.last_alphas = mean_alphas.cpu()
        per_reference = per_reference_dpo_losses(policy.chosen_logps.detach(), policy.rejected_logps.detach(),
                                                  ref_chosen, ref_rejected, self.beta).mean(0)  # (K,)
        metrics = {}
        for k, name in enumerate(self.reference_names(signals.num_references)):
            metrics[f"alpha/{name}"] = mean_alphas[k]
            metrics[f"ref_loss/{name}"] = per_reference[k]
        return out, metrics

    def reference_names(self, k: int | None = None) -> list[str]:
        """Short, unique names of the K references (`datamodules.reference_cache.reference_labels`), for metric keys."""
        specs = getattr(self.datamodule_or_none(), "reference_cache", None) or []
        names = reference_labels(specs)
        return names if k is None or len(names) == k else [f"ref{i}" for i in range(k)]

    def datamodule_or_none(self) -> Any:
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    # ---- the strategy's lifecycle (multiref/base.py) ---------------------------------------------------------------
    def prepare_weighting(self) -> None:
        """Prepare the strategy once (offline ones read the validation split), unless a checkpoint restored it."""
        if self.weighting.prepared:
            return
        self.weighting.prepare(self)
        alphas = getattr(self.weighting, "weights", None)
        if isinstance(alphas, Tensor):
            described = ", ".join(f"{n}={a:.4f}" for n, a in zip(self.reference_names(len(alphas)), alphas.tolist()))
            rank_zero_info(f"weighting {self.weighting!r}: α from the validation split: {described}")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.prepare_weighting()  # before the sanity check; a resumed fit has restored the state by now

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._step_open_at is None:  # the first micro-batch of an optimizer step
            self._step_open_at = self.global_step
            self.weighting.before_step(self)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_open_at is not None and self.global_step > self._step_open_at:  # the optimizer stepped
            self._step_open_at = None
            self.weighting.after_step(self)
        super().on_train_batch_end(outputs, batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["prefopt"][CHECKPOINT_KEY] = self.weighting.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("prefopt", {}).get(CHECKPOINT_KEY)
        if state is not None:
            self.weighting.load_state_dict(state)

    # ---- WeightingContext ----------------------------------------------------------------------------------------
    @property
    def num_references(self) -> int:
        specs = getattr(self.datamodule_or_none(), "reference_cache", None)
        if not specs:
            raise UserInputError("MultiReferenceModule needs the K references in data.init_args.reference_cache")
        return len(specs)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.to(self.device), reduce_op="sum").cpu()

    def _validation_items(self) -> list[dict[str, Any]]:
        datamodule = self.datamodule_or_none()
        return list(getattr(datamodule, "data", {}).get("val", []))

    def validation_size(self) -> int:
        return len(self._validation_items())

    def validation_signals(self) -> Iterator[ReferenceSignals]:
        datamodule, items = self.datamodule_or_none(), self._validation_items()
        collate, size = datamodule.collator(), datamodule.eval_batch_size
        for start in range(0, len(items), size):
            yield batch_signals(collate(items[start:start + size]))

    @torch.no_grad()
    def validation_accuracy(self, indices: list[int]) -> float:
        """The policy's preference accuracy on these validation pairs, in eval mode (no dropout, no RNG drawn)."""
        datamodule, items = self.datamodule_or_none(), self._validation_items()
        collate, size = datamodule.collator(), datamodule.eval_batch_size
        chosen = [items[i] for i in indices]
        was_training = self.policy.training
        self.policy.eval()
        try:
            correct = 0.0
            for start in range(0, len(chosen), size):
                batch = {k: v.to(self.device) if isinstance(v, Tensor) else v
                         for k, v in collate(chosen[start:start + size]).items()}
                logps = concatenated_forward(self.policy, batch, average=True)
                correct += float(preference_accuracy(logps, averaged=True).sum())
        finally:
            self.policy.train(was_training)
        return correct / max(len(chosen), 1)
