"""The Euler sampler of a flow: from Gaussian noise at t=0 to an action at t=1.

The time grid is ``t_k = k / K`` with ``dt = 1 / K`` (the ReinFlow release evaluated the field at
``k / (K - 1)``, which broke its own policies at K = 2..6; we do not). A policy may carry a
non-uniform grid for a K (``policy.time_grids``, chosen by ``flowrl distill --grid``); the
deterministic sampler then steps on it (:func:`grid_euler_sample`), while the noisy chain of
fine-tuning keeps the uniform grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""v(t, x) -> dx/dt, with t a (B,) tensor and x a (B, ...) tensor."""

StepVelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""v(t, x, d) -> the velocity of one Euler step of size d from (t, x), d a (B,) tensor: a step-size
conditioned head (shortcut, meanflow) reads d; a rectified flow ignores it."""


def uniform_times(k: int) -> list[float]:
    """The K + 1 times ``t_i = i / K`` of the uniform Euler grid (K = ``k``)."""
    return [i / k for i in range(k + 1)]


def time_grid(k: int, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The K = ``k`` evaluation times ``t_i = i / K`` as (B,) tensors."""
    return [torch.full((batch,), i / k, device=device, dtype=dtype) for i in range(k)]


def euler_sample(velocity: VelocityFn, x0: torch.Tensor, k: int) -> torch.Tensor:
    """Integrate ``dx/dt = v(t, x)`` from ``x0`` at t=0 to t=1 in K = ``k`` Euler steps of the uniform grid.

    Deterministic given ``x0``: the policy's initial noise is its only randomness.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return grid_euler_sample(lambda t, x, d: velocity(t, x), x0, uniform_times(k))


def grid_euler_sample(velocity: StepVelocityFn, x0: torch.Tensor, times: list[float]) -> torch.Tensor:
    """Euler steps from ``x0`` at ``times[0] = 0`` through every time of ``times`` to ``times[-1] = 1``:
    ``x_{i+1} = x_i + d_i v(t_i, x_i, d_i)`` with ``d_i = t_{i+1} - t_i``."""
    b = x0.shape[0]
    x = x0
    for start, end in zip(times, times[1:]):
        d = end - start
        x = x + d * velocity(torch.full((b,), start, device=x0.device, dtype=x0.dtype), x,
                             torch.full((b,), d, device=x0.device, dtype=x0.dtype))
    return x


NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""sigma(t, x) -> standard deviation of the noise injected at step t, same shape as x."""

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def step_mean(x: torch.Tensor, t: torch.Tensor, v: torch.Tensor, std: torch.Tensor, dt: float,
              score_correction: bool = False) -> torch.Tensor:
    """The mean of one noisy Euler step from ``x`` at times ``t`` (B,): ``x + v dt`` (ReinFlow), and with
    ``score_correction`` also ``- (std^2 / 2) (x - t v) / (1 - t)``, which makes the noisy chain an
    Euler-Maruyama discretisation of an SDE with the flow's own marginals (a Flow-SDE).

    For the linear path ``x_t = (1 - t) x_0 + t x_1`` from Gaussian noise ``x_0``, ``E[x_0 | x_t] =
    x_t - t v(t, x_t)``, so the score is ``-(x - t v) / (1 - t)``; an SDE ``dx = (v + g^2/2 score) dt + g dW``
    has the same marginals as the ODE ``dx = v dt`` for any diffusion ``g``. With ``std = g sqrt(dt)``
    the per-step noise, injecting noise then no longer shifts the distribution of actions away from the
    deterministic flow's (to first order in ``dt``): the policy the noisy chain trains is, in
    distribution, the policy that is deployed. The grid ``t_k = k/K`` never reaches ``t = 1``, where the
    score is undefined.
    """
    mean = x + dt * v
    if score_correction:
        tt = t.view(-1, *([1] * (x.dim() - 1)))
        mean = mean - 0.5 * std.square() * (x - tt * v) / (1 - tt)
    return mean


def noisy_euler_chain(velocity: VelocityFn, noise_std: NoiseFn, x0: torch.Tensor, k: int,
                      generator: torch.Generator | None = None, score_correction: bool = False) -> torch.Tensor:
    """The Euler chain with Gaussian noise injected at every step (ReinFlow):
    ``x_{k+1} = x_k + v(t_k, x_k) dt + sigma(t_k, x_k) eps_k`` (the mean as :func:`step_mean` says).
    Returns (B, K+1, ...), x0 first (K = ``k``)."""
    dt = 1.0 / k
    chain = [x0]
    x = x0
    for t in time_grid(k, x0.shape[0], x0.device, x0.dtype):
        std = noise_std(t, x)
        mean = step_mean(x, t, velocity(t, x), std, dt, score_correction)
        x = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        chain.append(x)
    return torch.stack(chain, dim=1)


def chain_transitions(velocity: VelocityFn, noise_std: NoiseFn, chain: torch.Tensor,
                      k: int, score_correction: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and stds of every transition of a chain, (B, K, ...) each (K = ``k``), in one batched call.

    ``velocity`` and ``noise_std`` receive the K states of each chain flattened into the batch,
    (B*K, ...), ordered chain by chain: conditioning must be repeated with ``repeat_interleave(K)``.
    """
    b = chain.shape[0]
    if chain.shape[1] != k + 1:
        raise ValueError(f"chain holds {chain.shape[1]} states, expected K+1 = {k + 1}")
    states = chain[:, :-1].reshape(b * k, *chain.shape[2:])
    t = (torch.arange(k, device=chain.device, dtype=chain.dtype) / k).repeat(b)
    std = noise_std(t, states)
    mean = step_mean(states, t, velocity(t, states), std, 1.0 / k, score_correction)
    shape = (b, k, *chain.shape[2:])
    return mean.reshape(shape), std.reshape(shape)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return -((x - mean) / std).square() / 2 - std.log() - LOG_SQRT_2PI


def chain_log_prob(velocity: VelocityFn, noise_std: NoiseFn, chain: torch.Tensor, k: int,
                   include_initial: bool = True, score_correction: bool = False) -> torch.Tensor:
    """Exact log-likelihood of whole chains, (B,):
    ``log N(x_0; 0, I) + sum_k log N(x_{k+1}; step mean, sigma_k^2)``, summed over all elements."""
    mean, std = chain_transitions(velocity, noise_std, chain, k, score_correction)
    lp = gaussian_log_prob(chain[:, 1:], mean, std).flatten(1).sum(dim=1)
    if include_initial:
        x0 = chain[:, 0]
        lp = lp + gaussian_log_prob(x0, torch.zeros_like(x0), torch.ones_like(x0)).flatten(1).sum(dim=1)
    return lp
