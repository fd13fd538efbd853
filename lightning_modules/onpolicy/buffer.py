"""`SampleRound`: one sampling round's training data, reused for `iterations_per_batch` steps (sample reuse).

A round holds what was fixed at sampling time: the sampled sequences, their rewards, the reference
log-probs (computed once, when the round was sampled) and, for pairwise objectives, the pairs built
from the rewards. Its `state_dict` goes into every checkpoint, so a run stopped in the middle of a
round resumes on exactly the samples the uninterrupted run trained on (the resume contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_modules.onpolicy.pairs import SampledPairs

TENSORS = ("input_ids", "attention_mask", "labels", "rewards", "ref_logps")


@dataclass
class SampleRound:
    """P prompts × n samples: rows `p * n + j` of the (M, T) tensors, (P, n) rewards and reference log-probs."""

    input_ids: Tensor  # (M, T) long
    attention_mask: Tensor  # (M, T) long
    labels: Tensor  # (M, T) long
    rewards: Tensor  # (P, n) float32
    ref_logps: Tensor  # (P, n) float32, under the reference at sampling time (zeros when reference-free)
    pairs: SampledPairs | None  # pairwise objectives: (prompt, chosen, rejected) sample indices
    index: int  # which round of the run (0, 1, ...): seeds the sampling
    uses: int = 0  # training steps taken on it so far
    baseline: float | None = None  # REINFORCE's running baseline for every step on this round (fixed when sampled)

    @property
    def num_samples(self) -> int:
        return self.rewards.shape[1]

    def rows(self, rows: Tensor) -> dict[str, Tensor]:
        """The training inputs of the given (flat) sample rows."""
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows],
                "labels": self.labels[rows]}

    def to(self, device: torch.device) -> "SampleRound":
        for name in TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name).cpu() for name in TENSORS}
        state.update(index=self.index, uses=self.uses, baseline=self.baseline, pairs=None if self.pairs is None else {
            "prompt": self.pairs.prompt.cpu(), "chosen": self.pairs.chosen.cpu(),
            "rejected": self.pairs.rejected.cpu(), "considered": self.pairs.considered})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "SampleRound":
        pairs = None if state["pairs"] is None else SampledPairs(**state["pairs"])
        return cls(**{name: state[name] for name in TENSORS}, pairs=pairs, index=state["index"], uses=state["uses"],
                   baseline=state.get("baseline"))
