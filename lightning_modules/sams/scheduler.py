"""`SamS`: the learned sample scheduler (SPEC section 6), trained at every step together with the policy.

    model:
      init_args:
        sample_scheduler:
          class_path: lightning_modules.sams.SamS
          init_args: {ratio: 0.5, selection: topk, exploration_weight: 0.05, lr: 1.0e-4, weight_decay: 1.0e-5}

One training step of a pairwise module with a scheduler (`DPOModule.pair_weights` calls `step`):
1. the n candidate pairs' contexts (`context.pair_contexts`, from the training forward), their per-pair
   losses, implicit-reward margins and chosen log-probs are gathered from every rank (the global batch);
2. the previous step's selection is labelled now that this batch's loss is known: y = γ·r_B + (1 − γ)·r_S
   (`rewards`), and f1 / f2 take one optimizer step on it plus up to `replay_batches` batches of the
   replay pool (`pool`); the labelled batch then joins the pool;
3. the updated networks score the candidates, u = f1 + λ·f2, and k = ⌈ratio·n⌉ are selected (top-k,
   softmax sampling, or uniformly at random as an ablation); rank 0's selection is broadcast, so every
   rank uses the same one; the policy loss is the mean over the selected pairs only.

Why a private optimizer stepped here, not a second Lightning optimizer: Lightning's automatic
optimization takes one optimizer per module (several need manual optimization, which would also take
gradient accumulation, clipping and DeepSpeed's engine step away from the policy), and DeepSpeed accepts
one optimizer. The scheduler's loss depends only on detached inputs, so its backward and step are
independent of the policy's and can run inside `training_step`. For the same reason the networks are not
a registered submodule of the LightningModule: DDP would expect their gradients in the policy's backward
and ZeRO-3 would partition them. They are small and replicated: every rank trains them on the same
gathered data. Their whole state (weights, optimizer, pool, the previous step's record, the sampling
generator, the smoothed batch reward) goes into `checkpoint["prefopt"]["sams"]` (the resume contract).
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from datamodules.utils.errors import UserInputError
from datamodules.utils.files import write_bytes_atomic
from lightning_modules.sams.collective import broadcast_from_zero, gather_rows, world
from lightning_modules.sams.networks import SchedulerNetworks
from lightning_modules.sams.pool import ReplayPool
from lightning_modules.sams.rewards import batch_reward, relative_decrease, sample_reward, scheduler_target

Selection = Literal["topk", "softmax", "random"]
KEY = "model.init_args.sample_scheduler.init_args"


@dataclass
class Selected:
    """One step's selection: this rank's mask, the loss weight of a selected pair, and what to log."""

    mask: Tensor  # (B,) bool, this rank's pairs
    global_mask: Tensor  # (N,) bool, every rank's pairs in rank order (the same on every rank)
    weight: float  # world size / k: with DDP's gradient mean, the global loss is the mean over the k selected
    scores: Tensor  # (N,) u of the global batch
    metrics: dict[str, Tensor]


class SamS:
    """Adaptive sample scheduling: select ⌈ratio·n⌉ of each batch's pairs by a learned score."""

    def __init__(self, ratio: float = 0.5, selection: Selection = "topk", temperature: float = 1.0,
                 exploration: bool = True, exploration_weight: float = 0.05, kappa: float = 50.0, gamma: float = 0.5,
                 batch_reward_decay: float = 0.0, pool_size: int = 512, replay_batches: int = 8, lr: float = 1e-4,
                 weight_decay: float = 1e-5, connector_size: int = 64, num_heads: int = 4, exploration_size: int = 32,
                 pretrained: str | None = None, seed: int = 0):
        """Scheduler settings.

        Args:
            ratio: share of each batch's pairs trained on, k = ⌈ratio·n⌉ (the paper: 0.5).
            selection: topk by score (paper), softmax (sample k by softmax(u / temperature)) or random (ablation).
            temperature: softmax selection's temperature.
            exploration: train and use the exploration network f2; false = f1 only (ablation).
            exploration_weight: λ in u = f1 + λ·f2 (0.01-0.1).
            kappa: κ in r_B = σ(κ·Δ + 0.5) (the original: 50).
            gamma: γ in y = γ·r_B + (1 − γ)·r_S.
            batch_reward_decay: smooth r_B by a running mean with this decay (0 = off).
            pool_size: replay pool bound, in pairs.
            replay_batches: past batches replayed with each scheduler update (up to; the paper: 32, about 4x the cost).
            lr: the scheduler's AdamW learning rate (the paper: 1e-4).
            weight_decay: the scheduler's AdamW weight decay (the paper: 1e-5).
            connector_size: c, width of the per-layer connectors and the layer encoder.
            num_heads: attention heads of the layer encoder.
            exploration_size: e, width f1's activations are down-sampled to for f2.
            pretrained: file of pretrained networks (`lightning_modules.sams.pretrain`); None = random init.
            seed: initial weights and the random / softmax selection draws (the same on every rank).
        """
        problems = [f"{name}={value}" for name, value, ok in [
            ("ratio", ratio, 0 < ratio <= 1), ("temperature", temperature, temperature > 0),
            ("exploration_weight", exploration_weight, exploration_weight >= 0), ("kappa", kappa, kappa >= 0),
            ("gamma", gamma, 0 <= gamma <= 1), ("batch_reward_decay", batch_reward_decay, 0 <= batch_reward_decay < 1),
            ("pool_size", pool_size, pool_size >= 0), ("replay_batches", replay_batches, replay_batches >= 0),
            ("selection", selection, selection in ("topk", "softmax", "random"))] if not ok]
        if problems:
            raise UserInputError(f"{KEY}: {', '.join(problems)} out of range (ratio in (0, 1], temperature > 0, "
                                 "exploration_weight >= 0, kappa >= 0, gamma in [0, 1], batch_reward_decay in [0, 1), "
                                 "pool_size >= 0, replay_batches >= 0, selection one of topk, softmax, random)")
        self.ratio, self.selection, self.temperature = ratio, selection, temperature
        self.exploration, self.exploration_weight = exploration, exploration_weight
        self.kappa, self.gamma, self.batch_reward_decay = kappa, gamma, batch_reward_decay
        self.replay_batches, self.lr, self.weight_decay = replay_batches, lr, weight_decay
        self.sizes = {"connector_size": connector_size, "num_heads": num_heads, "exploration_size": exploration_size}
        self.pretrained, self.seed = pretrained, seed
        self.pool = ReplayPool(pool_size)
        self.networks: SchedulerNetworks | None = None  # built at the first step, when L and D are known
        self.optimizer: torch.optim.Optimizer | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.record: dict[str, Any] | None = None  # the last selection, labelled at the next step
        self.reward_mean: float | None = None  # smoothed r_B (batch_reward_decay > 0)
        self.steps = 0
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, applied when the networks are built

    # ---- building, saving, loading ---------------------------------------------------------------------------
    def build(self, num_layers: int, hidden_size: int, device: torch.device) -> None:
        """Create the networks (seeded, the same on every rank) and their optimizer; load `pretrained` or a checkpoint."""
        if self.networks is not None:
            if next(self.networks.parameters()).device != device:
                raise RuntimeError(f"SamS networks are on {next(self.networks.parameters()).device}, the policy on {device}")
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            # float32 whatever the default dtype (Lightning's bf16-true precision sets it to bf16 inside the step)
            self.networks = SchedulerNetworks(num_layers, hidden_size, **self.sizes).float()
        if self.pretrained is not None:
            self.networks.load_state_dict(self.read_pretrained(self.pretrained, num_layers, hidden_size))
        self.networks.to(device)
        self.optimizer = torch.optim.AdamW(self.networks.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None

    def read_pretrained(self, path: str, num_layers: int, hidden_size: int) -> dict[str, Tensor]:
        if not Path(path).is_file():
            raise UserInputError(f"{KEY}.pretrained={path!r}: no such file (write one with "
                                 "lightning_modules.sams.pretrain, see the README's SamS section)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        expected = {"num_layers": num_layers, "hidden_size": hidden_size, **self.sizes}
        found = {key: saved.get(key) for key in expected}
        if found != expected:
            raise UserInputError(f"{KEY}.pretrained={path!r} was trained for {found}, but this policy and scheduler "
                                 f"need {expected}: pretrain again with this policy, or match the sizes")
        return saved["networks"]

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the networks (and the sizes they need) atomically to `path`, for `pretrained=`."""
        if self.networks is None:
            raise RuntimeError("SamS.save_pretrained: the networks are built at the first training step")
        first = self.networks.connectors[0][0]
        buffer = io.BytesIO()
        torch.save({"networks": {k: v.cpu() for k, v in self.networks.state_dict().items()},
                    "num_layers": len(self.networks.connectors), "hidden_size": first.in_features, **self.sizes}, buffer)
        return write_bytes_atomic(path, buffer.getvalue())

    def state_dict(self) -> dict[str, Any]:
        if self.networks is None:
            return dict(self._pending) if self._pending is not None else {}
        record = None if self.record is None else {k: v.cpu() if isinstance(v, Tensor) else v
                                                   for k, v in self.record.items()}
        return {"networks": {k: v.detach().cpu().clone() for k, v in self.networks.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "pool": self.pool.state_dict(), "record": record,
                "generator": self.generator.get_state(), "reward_mean": self.reward_mean, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.networks is None:
            self._pending = state
        else:
            self._apply(state)

    def _apply(self, state: dict[str, Any]) -> None:
        device = next(self.networks.parameters()).device
        self.networks.load_state_dict(state["networks"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pool.load_state_dict(state["pool"])
        self.record = None if state["record"] is None else {k: v.to(device) if isinstance(v, Tensor) else v
                                                            for k, v in state["record"].items()}
        self.generator.set_state(state["generator"])
        self.reward_mean, self.steps = state["reward_mean"], state["steps"]

    # ---- one step ----------------------------------------------------------------------------------------------
    def scores(self, contexts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(u, f1, f2), each (N,), without gradients."""
        with torch.no_grad(), torch.autocast(contexts.device.type, enabled=False):
            f1, f2 = self.networks(contexts)
        lam = self.exploration_weight if self.exploration else 0.0
        return f1 + lam * f2, f1, f2

    def choose(self, scores: Tensor, k: int) -> Tensor:
        """(N,) bool mask of the k selected candidates."""
        n = scores.shape[0]
        if self.selection == "topk":
            picks = torch.topk(scores, k).indices
        elif self.selection == "softmax":
            probs = torch.softmax(scores.detach().double().cpu() / self.temperature, dim=0)
            picks = torch.multinomial(probs, k, replacement=False, generator=self.generator)
        else:
            picks = torch.randperm(n, generator=self.generator)[:k]
        mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
        mask[picks.to(scores.device)] = True
        return mask

    def learn(self, batch_loss: float) -> dict[str, Tensor]:
        """Label the previous selection with this batch's loss, take one scheduler step, pool the labelled batch."""
        record = self.record
        r_batch = batch_reward(record["loss"], batch_loss, self.kappa)
        if self.batch_reward_decay > 0:
            self.reward_mean = r_batch if self.reward_mean is None else \
                self.batch_reward_decay * self.reward_mean + (1 - self.batch_reward_decay) * r_batch
            r_batch = self.reward_mean
        targets = scheduler_target(r_batch, record["sample_rewards"], self.gamma)
        device = record["contexts"].device
        replay = self.pool.sample(self.replay_batches, self.generator)
        contexts = torch.cat([record["contexts"], *[c.to(device) for c, _ in replay]])
        labels = torch.cat([targets, *[t.to(device) for _, t in replay]])
        with torch.autocast(device.type, enabled=False):
            f1, f2 = self.networks(contexts)
            f1_loss = torch.nn.functional.mse_loss(f1, labels)
            f2_loss = torch.nn.functional.mse_loss(f2, labels - f1.detach()) if self.exploration else f1.sum() * 0
            self.optimizer.zero_grad(set_to_none=True)
            (f1_loss + f2_loss).backward()
            self.optimizer.step()
        self.pool.add(record["contexts"], targets)
        return {"sams/f1_loss": f1_loss.detach(), "sams/f2_loss": f2_loss.detach(),
                "sams/batch_reward": torch.tensor(r_batch),
                "sams/relative_decrease": torch.tensor(relative_decrease(record["loss"], batch_loss)),
                "sams/sample_reward": record["sample_rewards"].mean(), "sams/target": targets.mean(),
                "sams/pool_pairs": torch.tensor(float(self.pool.num_pairs))}

    def step(self, contexts: Tensor, losses: Tensor, margins: Tensor, chosen_logps: Tensor,
             flipped: Tensor | None = None) -> Selected:
        """Select this rank's pairs from the global batch; see the module docstring. All inputs (B, ...) detached."""
        contexts, counts = gather_rows(contexts.detach().float())
        columns = torch.stack([losses.detach().float(), margins.detach().float(), chosen_logps.detach().float()], 1)
        losses, margins, chosen_logps = gather_rows(columns)[0].unbind(1)  # one gather for the three (B,) columns
        rank, size = world()
        if contexts.shape[0] == 0:  # no candidate on any rank (on-policy: no pair cleared the reward gap): skip
            empty = torch.zeros(0, dtype=torch.bool, device=contexts.device)
            return Selected(mask=empty, global_mask=empty, weight=0.0, scores=contexts.new_zeros(0), metrics={})
        self.build(contexts.shape[1], contexts.shape[2], contexts.device)
        batch_loss = float(losses.mean())
        metrics = self.learn(batch_loss) if self.record is not None else {}
        scores, f1, f2 = self.scores(contexts)
        n = scores.shape[0]
        k = max(1, math.ceil(self.ratio * n - 1e-9))
        mask = broadcast_from_zero(self.choose(scores, k).to(torch.uint8)).bool()
        self.record = {"contexts": contexts[mask], "sample_rewards": sample_reward(margins, chosen_logps)[mask],
                       "loss": batch_loss}
        self.steps += 1
        metrics.update(self.selection_metrics(mask, f1, f2, flipped))
        offset = sum(counts[:rank])
        return Selected(mask=mask[offset:offset + counts[rank]], global_mask=mask, weight=size / k, scores=scores, metrics=metrics)

    @staticmethod
    def selection_metrics(mask: Tensor, f1: Tensor, f2: Tensor, flipped: Tensor | None) -> dict[str, Tensor]:
        """Selected fraction, mean f1 / f2 of selected vs unselected pairs, and (when known) flipped-label shares."""
        out = {"sams/selected_fraction": mask.float().mean()}
        for name, values in (("f1", f1), ("f2", f2)):
            out[f"sams/{name}_selected"] = values[mask].mean()
            if (~mask).any():
                out[f"sams/{name}_unselected"] = values[~mask].mean()
        if flipped is not None:
            flipped, _ = gather_rows(flipped.detach().float().to(mask.device))
            out["sams/flipped_selected"] = flipped[mask].mean()
            out["sams/flipped_all"] = flipped.mean()
        return out
