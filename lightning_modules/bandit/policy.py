"""The bandit's policy network and the exact quantities of a categorical policy (SPEC section 5).

`BanditPolicy` is the paper's MLP, context (C, D) → action logits (C, A):
    Linear(D, 50) → LayerNorm(50) → ReLU → Linear(50, 256) → ReLU → Linear(256, 256) → ReLU → Linear(256, A).
With A ≈ 100 actions every quantity is exact (a sum over actions, no sampling): `kl_to` = KL(π‖π_ref),
`entropy`; `sample_actions` draws N actions per context from a seeded generator; `fit_to` is the
pre-fit to π_data (minimize KL(π‖π_data), Adam) that every run starts from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BanditPolicy(nn.Module):
    """π(a|x) as logits: an MLP D → 50 (LayerNorm, ReLU) → 256 → 256 → A."""

    def __init__(self, context_dim: int = 100, n_actions: int = 100, hidden: tuple[int, int, int] = (50, 256, 256)):
        super().__init__()
        first, second, third = hidden
        self.net = nn.Sequential(
            nn.Linear(context_dim, first), nn.LayerNorm(first), nn.ReLU(),
            nn.Linear(first, second), nn.ReLU(),
            nn.Linear(second, third), nn.ReLU(),
            nn.Linear(third, n_actions),
        )

    def forward(self, contexts: Tensor) -> Tensor:
        """(C, D) contexts → (C, A) log-probs (normalized logits)."""
        return torch.log_softmax(self.net(contexts), dim=-1)


def kl_to(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Exact KL(π‖π_ref) = Σ_a π(a) (log π(a) − log π_ref(a)) per row: logps (C, A), ref_logps (A,) or (C, A) → (C,)."""
    return (logps.exp() * (logps - ref_logps)).sum(-1)


def entropy(logps: Tensor) -> Tensor:
    """Exact H(π) = −Σ_a π(a) log π(a) per row: (C, A) → (C,)."""
    return -(logps.exp() * logps).sum(-1)


def expected_reward(logps: Tensor, rewards: Tensor) -> Tensor:
    """Exact E_{a~π}[r(a)] per row: logps (C, A), rewards (A,) → (C,)."""
    return (logps.exp() * rewards).sum(-1)


def sample_actions(logps: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n actions per row, with replacement: logps (C, A) or (A,) → (C, n) / (n,) long, on logps' device.

    Drawn on the CPU, where `generator` lives, so the draws do not depend on the device.
    """
    probs = logps.detach().float().exp().cpu()
    return torch.multinomial(probs, n, replacement=True, generator=generator).to(logps.device)


def fit_to(policy: BanditPolicy, contexts: Tensor, target_logps: Tensor, *, steps: int = 100,
           lr: float = 0.01) -> list[float]:
    """Pre-fit: minimize the mean over contexts of KL(π(·|x)‖π_target) with Adam for `steps` full-batch steps.

    Returns the KL before each step and after the last (steps + 1 values). Deterministic given the weights.
    """
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    history = []
    with torch.enable_grad():
        for _ in range(steps):
            loss = kl_to(policy(contexts), target_logps).mean()
            history.append(loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # leave no gradient behind for the training optimizer
    with torch.no_grad():
        history.append(kl_to(policy(contexts), target_logps).mean().item())
    return history
