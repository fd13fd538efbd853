"""The scheduler's two networks (SPEC section 6, step 2; EE-Net style): exploitation f1, exploration f2.

Input: a pair's context, the policy's hidden states of every transformer layer mean-pooled over
non-pad tokens and averaged over chosen / rejected, an (N, L, D) batch (`context.pooled_context`).

    f1:  per-layer connector  Linear(D → c), ReLU          (N, L, D) → (N, L, c)
         + a learned layer embedding, one encoder layer over the L layer tokens (self-attention)
         mean over layers → h (N, c) → residual MLP → Linear(c → 1)         f1 (N,)
    f2:  h, detached, down-sampled by average pooling to e features (N, e)
         → residual MLP → Linear(e → 1)                                      f2 (N,)
    score u = f1 + λ·f2

f2 sees f1's activations detached, so its loss (regressing the residual y − f1) never trains f1.
Parameter count: L·(D·c + c) for the connectors, L·c for the layer embedding and 54,530 for the encoder
and heads with the defaults (c = 64, e = 32): 87,810 for the 1.1 M-parameter demo policy (L = 4, D = 128;
7.9 % of it) and 8,447,234 for a 7B Llama (L = 32, D = 4,096; 0.125 %), as `make sams-bench` reports.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidualMLP(nn.Module):
    """x + W2·ReLU(W1·LayerNorm(x)), width → 2·width → width."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class SchedulerNetworks(nn.Module):
    """f1 and f2 over (N, L, D) contexts; `forward` returns (f1 (N,), f2 (N,)), float32."""

    def __init__(self, num_layers: int, hidden_size: int, connector_size: int = 64, num_heads: int = 4,
                 exploration_size: int = 32):
        super().__init__()
        if connector_size % num_heads or exploration_size > connector_size:
            raise ValueError(f"connector_size={connector_size} must be a multiple of num_heads={num_heads} and "
                             f">= exploration_size={exploration_size}")
        self.exploration_size = exploration_size
        self.connectors = nn.ModuleList(nn.Sequential(nn.Linear(hidden_size, connector_size), nn.ReLU())
                                        for _ in range(num_layers))
        self.layer_embedding = nn.Parameter(torch.zeros(num_layers, connector_size))
        self.encoder = nn.TransformerEncoderLayer(connector_size, num_heads, dim_feedforward=2 * connector_size,
                                                  dropout=0.0, batch_first=True, norm_first=True)
        self.f1_head = nn.Sequential(ResidualMLP(connector_size), nn.Linear(connector_size, 1))
        self.f2_head = nn.Sequential(ResidualMLP(exploration_size), nn.Linear(exploration_size, 1))

    def hidden(self, context: Tensor) -> Tensor:
        """f1's pooled activations h, (N, c)."""
        tokens = torch.stack([connector(context[:, i]) for i, connector in enumerate(self.connectors)], dim=1)
        return self.encoder(tokens + self.layer_embedding).mean(dim=1)

    def forward(self, context: Tensor) -> tuple[Tensor, Tensor]:
        h = self.hidden(context.float())
        f1 = self.f1_head(h).squeeze(-1)
        down = nn.functional.adaptive_avg_pool1d(h.detach().unsqueeze(1), self.exploration_size).squeeze(1)
        f2 = self.f2_head(down).squeeze(-1)
        return f1, f2
