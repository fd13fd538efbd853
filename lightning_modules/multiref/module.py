"""MRPO / MDPO against K references, cached or live, with α from a weighting strategy (SPEC sections 2 and 4).

    model:
      class_path: lightning_modules.multiref.MultiReferenceModule
      init_args:
        objective: MDPO                     # or MRPO (CTRO clipping: {class_path: MRPO, init_args: {clip_epsilon: 0.1}})
        weighting: VAW                      # Fixed, ARWC, VDW, VAW, SWCW, SWCWOneHot, TSW (lightning_modules.multiref)
    data:
      init_args:
        reference_cache: [{name_or_path: ...}, {name_or_path: ...}]   # the K references, each its own tokenizer

Live references instead (`reference: live`, `live_references: [A, B, C]`, optionally
`reference_quantization: 8bit`) must share the policy's tokenizer; `LiveReferences` scores each
batch into the same (B, K) columns the cache gives, so everything below reads them alike.

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

from datamodules.reference_cache import ReferenceSpec, reference_labels
from datamodules.tokenize import load_tokenizer
from datamodules.utils.errors import UserInputError
from lightning_modules.dpo import DPOModule
from lightning_modules.logprobs import PairLogps, concatenated_forward, preference_accuracy
from lightning_modules.objectives import MDPO, Objective, PreferenceLossOutput, per_reference_dpo_losses
from lightning_modules.multiref.base import WeightingStrategy
from lightning_modules.multiref.offline import VAW
from lightning_modules.multiref.signals import ReferenceSignals, batch_signals
from lightning_modules.references.providers import LiveReferences

CHECKPOINT_KEY = "weighting"  # under checkpoint["prefopt"]


class MultiReferenceModule(DPOModule):
    """MRPO / MDPO against the K references of `data.init_args.reference_cache`, α from `weighting`."""

    def __init__(self, model_name_or_path: str, objective: Objective = MDPO(), weighting: WeightingStrategy = VAW(),
                 reference: Literal["cached", "live"] = "cached", live_references: list[str] | None = None,
                 **kwargs: Any):
        """Multi-reference preference optimization.

        Args:
            model_name_or_path: hub id or local folder of the initial policy (HF `from_pretrained` layout).
            objective: MDPO (α-weighted sum of K DPO losses) or MRPO (DPO against the α-weighted harmonic mixture).
            weighting: where α comes from: Fixed, ARWC, VDW, VAW, SWCW, SWCWOneHot, TSW (`--model.init_args.weighting.help TSW`).
            reference: `cached` (the K references of data.init_args.reference_cache, no model loaded) or `live`.
            live_references: with reference=live, the K models (hub ids / folders) sharing the policy's tokenizer.
            **kwargs: DPOModule's (beta, average_logps, sft_weight, reference_quantization, optimizer, lora, ...).
        """
        if reference not in ("cached", "live"):
            raise UserInputError(f"model.reference={reference!r}: MultiReferenceModule reads K references, cached "
                                 "(model.reference=cached, data.init_args.reference_cache) or live "
                                 "(model.reference=live, model.live_references)")
        if (reference == "live") != bool(live_references):
            raise UserInputError(f"model.live_references={live_references!r} with model.reference={reference!r}: "
                                 "list the K models in model.live_references exactly when reference=live (cached "
                                 "references go in data.init_args.reference_cache)")
        super().__init__(model_name_or_path, objective=objective, reference=reference, **kwargs)
        self.live_references = list(live_references or [])
        if not isinstance(weighting, WeightingStrategy):
            raise UserInputError(f"model.weighting={weighting!r} is not a weighting strategy; use one of Fixed, ARWC, "
                                 "VDW, VAW, SWCW, SWCWOneHot, TSW (lightning_modules.multiref)")
        self.weighting = copy.deepcopy(weighting)  # the default instance is shared between calls
        self.last_alphas: Tensor | None = None  # (K,) batch mean of the last training α (AlphaFigure reads it)
        self._step_open_at: int | None = None  # global_step when the current optimizer step's first micro-batch began

    def check_objective(self, objective: Objective) -> None:
        if objective.inputs == "samples":
            super().check_objective(objective)  # points to the on-policy module
        if objective.reference_shape != "multi":
            raise UserInputError(f"model.objective={objective!r} takes one reference: use MDPO or MRPO here, or "
                                 "lightning_modules.dpo.DPOModule for single-reference objectives")

    # ---- live references ----------------------------------------------------------------------------------------
    def build_live_reference(self) -> LiveReferences:
        tokenizer = getattr(self.datamodule_or_none(), "tokenizer", None)
        for k, name_or_path in enumerate(self.live_references):
            check_shared_tokenizer(name_or_path, tokenizer, key=f"model.live_references[{k}]")
        return LiveReferences([self.live_reference(name_or_path, f"model.live_references[{k}]")
                               for k, name_or_path in enumerate(self.live_references)], average=self.average_logps)

    def with_reference_columns(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`batch` with the K references' (B, K) columns: cached ones are there already; live ones are computed."""
        if isinstance(self.reference, LiveReferences) and "ref_chosen_logps" not in batch:
            return {**batch, **self.reference.columns(batch)}
        return batch

    def model_step(self, batch: dict[str, Tensor], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        return super().model_step(self.with_reference_columns(batch), stage)

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
        names = reference_labels(self.reference_specs())
        return names if k is None or len(names) == k else [f"ref{i}" for i in range(k)]

    def reference_specs(self) -> list[ReferenceSpec]:
        """The K references: the live models, or the data module's cached ones."""
        if self.live_references:
            return [ReferenceSpec(name_or_path) for name_or_path in self.live_references]
        return list(getattr(self.datamodule_or_none(), "reference_cache", None) or [])

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
        specs = self.reference_specs()
        if not specs:
            raise UserInputError("MultiReferenceModule needs the K references in data.init_args.reference_cache "
                                 "(or, with model.reference=live, in model.live_references)")
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
            batch = collate(items[start:start + size])
            if isinstance(self.reference, LiveReferences):
                columns = self.reference.columns({k: v.to(self.device) if isinstance(v, Tensor) else v
                                                  for k, v in batch.items()})
                batch = {**batch, **{k: v.cpu() for k, v in columns.items()}}
            yield batch_signals(batch)

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
                logps = concatenated_forward(self.policy, batch, average=True, packed=self.packing)
                correct += float(preference_accuracy(logps, averaged=True).sum())
        finally:
            self.policy.train(was_training)
        return correct / max(len(chosen), 1)


def check_shared_tokenizer(name_or_path: str, tokenizer: Any, *, key: str) -> None:
    """A UserInputError unless the reference at `name_or_path` tokenizes as the policy does (same vocabulary).

    A live reference is scored on the policy's token ids; one with another tokenizer belongs in the cache,
    which renders and scores each pair with the reference's own tokenizer and template. A reference folder
    without tokenizer files is taken to share the policy's.
    """
    if tokenizer is None:
        return
    try:
        own = load_tokenizer(name_or_path, key=key)
    except UserInputError:  # no tokenizer files (loading the model itself names a missing folder)
        return
    if own.get_vocab() != tokenizer.get_vocab():
        raise UserInputError(
            f"{key}={name_or_path!r} has another tokenizer than the policy ({len(own)} vs {len(tokenizer)} tokens, or "
            "the same count with other ids); a live reference is scored on the policy's token ids. Put it in "
            "data.init_args.reference_cache instead (model.reference=cached): the cache scores each reference with "
            "its own tokenizer and template.")
