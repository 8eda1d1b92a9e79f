"""The Euler sampler of a flow: from Gaussian noise at t=0 to an action at t=1.

The time grid is ``t_k = k / K`` with ``dt = 1 / K`` (the ReinFlow release evaluated the field at
``k / (K - 1)``, which broke its own policies at K = 2..6; we do not).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""v(t, x) -> dx/dt, with t a (B,) tensor and x a (B, ...) tensor."""


def time_grid(num_steps: int, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The K evaluation times ``t_k = k / K`` as (B,) tensors."""
    return [torch.full((batch,), k / num_steps, device=device, dtype=dtype) for k in range(num_steps)]


def euler_sample(velocity: VelocityFn, x0: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Integrate ``dx/dt = v(t, x)`` from ``x0`` at t=0 to t=1 in ``num_steps`` Euler steps.

    Deterministic given ``x0``: the policy's initial noise is its only randomness.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dt = 1.0 / num_steps
    x = x0
    for t in time_grid(num_steps, x0.shape[0], x0.device, x0.dtype):
        x = x + dt * velocity(t, x)
    return x
