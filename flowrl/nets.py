"""Network building blocks of the velocity field."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal features of a scalar in [0, 1] (flow time t or step size d), then a small MLP.

    The scalar is scaled by 1000 so that the 10000-period spectrum of transformer embeddings
    resolves differences of 1/1000 as well as the whole [0, 1] range.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.Mish(), nn.Linear(dim * 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = 1000.0 * x.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=-1))


class ResidualBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Mish(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResidualMLP(nn.Module):
    """Linear in, ``depth`` pre-norm residual blocks, linear out."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden_dim)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden_dim) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Mish(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))
