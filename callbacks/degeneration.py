"""`DegenerationDetector`: flag a run that degenerates (NaN loss, repetition loops, runaway length).

RefDPO (SPEC section 7) finds that lowering β helps until training degenerates; a β sweep must say
which runs did. Three signals, each a reason string in `DegenerationDetector.reasons`:

- `nonfinite_loss`: a training loss that is NaN or ±inf (checked after every training batch).
- `repetition`: greedy validation generations whose mean repeated word n-gram fraction
  (seq-rep-n of Welleck et al., "Neural Text Generation with Unlikelihood Training", ICLR 2020:
  1 − |unique n-grams| / |n-grams|) exceeds `max_repeat_fraction`.
- `runaway_length`: more than half of those generations use ≥ `max_length_fraction` of the budget.

Logged: `degenerate` (0/1, sticky once flagged), `degenerate/<reason>` (1 per reason seen), and per
validation epoch `val/degeneration/repeat_fraction` and `val/degeneration/length_fraction`, so
`MetricsJSON` and the sweep summary see them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.heldout_generation import HeldOutGeneration
from datamodules.utils.errors import UserInputError

def repeated_ngram_fraction(text: str, n: int = 4) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one: 1 − unique / total (0 if none).

    "a b a b a b" with n=2 has n-grams ab ba ab ba ab: 2 unique of 5, so 1 − 2/5 = 0.6.
    """
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def degeneration_stats(responses: Sequence[str], token_lengths: Sequence[int], *, max_new_tokens: int,
                       ngram: int = 4, max_length_fraction: float = 0.9) -> tuple[float, float]:
    """(mean repeated n-gram fraction, share of responses with ≥ max_length_fraction·max_new_tokens tokens)."""
    if len(token_lengths) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(token_lengths)} token lengths")
    if not responses:
        return 0.0, 0.0
    repeat = sum(repeated_ngram_fraction(r, ngram) for r in responses) / len(responses)
    long = sum(n >= max_length_fraction * max_new_tokens for n in token_lengths) / len(token_lengths)
    return repeat, long


def degeneration_reasons(responses: Sequence[str], token_lengths: Sequence[int], *, max_new_tokens: int, ngram: int = 4,
                         max_repeat_fraction: float = 0.5, max_length_fraction: float = 0.9) -> list[str]:
    """Reasons (`repetition`, `runaway_length`) these generations look degenerate; [] when healthy."""
    repeat, long = degeneration_stats(responses, token_lengths, max_new_tokens=max_new_tokens, ngram=ngram,
                                      max_length_fraction=max_length_fraction)
    return [reason for reason, hit in [("repetition", repeat > max_repeat_fraction), ("runaway_length", long > 0.5)]
            if hit]


def training_loss(outputs: Any) -> torch.Tensor | None:
    """The loss in a `training_step` output (a tensor or a mapping with "loss"), or None."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    return outputs if isinstance(outputs, torch.Tensor) else None


class DegenerationDetector(HeldOutGeneration):
    """Flags NaN losses during training and repetitive or runaway greedy generations at validation."""

    def __init__(self, prompts_path: str, num_prompts: int = 32, max_new_tokens: int = 64, ngram: int = 4,
                 max_repeat_fraction: float = 0.5, max_length_fraction: float = 0.9, stop_training: bool = False):
        """Degeneration checks.

        Args:
            prompts_path: JSONL file of {"prompt": ...} rows to generate from at every validation.
            num_prompts: how many of those prompts to use (the first N).
            max_new_tokens: generation budget per response (greedy decoding).
            ngram: n of the word n-grams counted for repetition.
            max_repeat_fraction: flag repetition when the mean repeated n-gram fraction exceeds this.
            max_length_fraction: a response is runaway at ≥ this share of max_new_tokens tokens (flag if > half are).
            stop_training: also stop training (trainer.should_stop) as soon as a degeneration is flagged.
        """
        if num_prompts < 1 or max_new_tokens < 1 or ngram < 1:
            raise UserInputError("DegenerationDetector: num_prompts, max_new_tokens and ngram must be >= 1, got "
                                 f"{num_prompts}, {max_new_tokens}, {ngram}")
        if not 0.0 <= max_repeat_fraction <= 1.0 or not 0.0 < max_length_fraction <= 1.0:
            raise UserInputError(f"DegenerationDetector: max_repeat_fraction must be in [0, 1] and max_length_fraction "
                                 f"in (0, 1], got {max_repeat_fraction}, {max_length_fraction}")
        super().__init__(prompts_path, num_prompts, max_new_tokens)
        self.ngram = ngram
        self.max_repeat_fraction = max_repeat_fraction
        self.max_length_fraction = max_length_fraction
        self.stop_training = stop_training
        self.reasons: list[str] = []
        self.responses: list[str] = []  # the latest validation generations, for inspection

    @property
    def degenerate(self) -> bool:
        return bool(self.reasons)

    def _flag(self, trainer: L.Trainer, found: Sequence[str]) -> None:
        new = [r for r in found if r not in self.reasons]
        if new:
            self.reasons += new
            rank_zero_warn(f"DegenerationDetector flagged {new} at step {trainer.global_step}")

    def _log_flags(self, trainer: L.Trainer, pl_module: L.LightningModule, found: Sequence[str], epoch: bool) -> None:
        self._flag(trainer, found)
        # Per validation, `degenerate` is the max over ranks; the reason keys may differ by rank, so never synced.
        options = dict(on_step=not epoch, on_epoch=epoch)
        pl_module.log("degenerate", float(self.degenerate), sync_dist=epoch, reduce_fx="max", **options)
        for reason in self.reasons:
            pl_module.log(f"degenerate/{reason}", 1.0, **options)
        # Every rank must take the same stop decision (any rank's flag counts); a no-op on one device.
        if self.stop_training and trainer.strategy.reduce_boolean_decision(self.degenerate, all=False):
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = training_loss(outputs)
        found = ["nonfinite_loss"] if loss is not None and not bool(torch.isfinite(loss.detach()).all()) else []
        self._log_flags(trainer, pl_module, found, epoch=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.responses = self.generate(trainer, pl_module)
        lengths = [len(trainer.datamodule.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in self.responses]
        options = dict(max_new_tokens=self.max_new_tokens, ngram=self.ngram,
                       max_length_fraction=self.max_length_fraction)
        repeat, long = degeneration_stats(self.responses, lengths, **options)
        found = degeneration_reasons(self.responses, lengths, max_repeat_fraction=self.max_repeat_fraction, **options)
        pl_module.log("val/degeneration/repeat_fraction", repeat, sync_dist=True)
        pl_module.log("val/degeneration/length_fraction", long, sync_dist=True)
        self._log_flags(trainer, pl_module, found, epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {"reasons": list(self.reasons)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reasons = list(state_dict["reasons"])
