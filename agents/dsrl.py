"""DSRL: fine-tune a flow policy online by steering its initial noise, the flow itself frozen.

Diffusion steering (Wagenmaker et al., 2025) keeps the pretrained flow exactly as behaviour cloning
left it and learns only where its Euler chain starts: a steering head (:class:`flowrl.policy.SteeringHead`)
maps standard noise eps to ``x0 = mean(obs) + std * eps``, and the frozen K-step flow maps x0 to the
action chunk. PPO trains the steering head over that Gaussian in the noise space, with the shared
rollout, critic and update of :mod:`flowrl.agents.ppo`.

What the construction guarantees:
- Built at ``mean = 0``, ``std = 1`` the steered policy *is* the pretrained one, in distribution and
  sample by sample (x0 = eps).
- What PPO trains is what is deployed: evaluation and deployment draw eps ~ N(0, I) and run the same
  map, so there is no noise-free policy drifting away from a noisy one that improves.
- Every action is the frozen flow's image of some initial noise, and the mean is bounded (``mean_bound *
  tanh``): the policy stays on the actions behaviour cloning can produce. That bounds how far it can move,
  for better and for worse: DSRL improves a policy within what its flow can express.

The ratio is the exact joint likelihood ratio of x0 (the flow's map is deterministic and
parameter-free here, so the action's likelihood ratio equals the noise's); its clip range is that of
ordinary Gaussian PPO. The steering head is saved inside the policy: the checkpoint evaluates, exports
and deploys like any other (the exported graph takes eps as its ``noise`` input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from flowrl.agents.ppo import ChunkPPO, ChunkPPOConfig
from flowrl.config import check_positive, fail
from flowrl.policy import FlowPolicy, SteeringHead
from flowrl.sampler import gaussian_log_prob

LOG_2PI_E_HALF = 0.5 * math.log(2 * math.pi * math.e)


@dataclass
class DSRLConfig(ChunkPPOConfig):
    """DSRL (``algo: dsrl``): PPO over the flow's initial noise; an iteration is one rollout of every env and
    one PPO update."""

    actor_lr: float = 3e-4
    """Learning rate of the steering head, cosine-decayed to actor_lr_min."""
    actor_lr_min: float = 1e-4
    """Final learning rate of the steering head."""
    clip_coef: float = 0.1
    """PPO clip range of the probability ratio (of the whole initial-noise chunk's likelihood)."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus of the steering noise (its std is capped at 1: the bonus can only slow
    its narrowing)."""
    steering_hidden_dim: int = 256
    """Width of the steering head's two-layer Tanh MLP (for a policy that has none yet)."""
    mean_bound: float = 2.0
    """The steered initial noise's mean stays in [-mean_bound, mean_bound] per element (for a new head)."""
    std_min: float = 0.05
    """The steering noise's std stays in [std_min, 1] (for a new head)."""

    def validate(self, prefix: str = "train.") -> None:
        super().validate(prefix)
        check_positive(self, prefix, "steering_hidden_dim", "mean_bound", "std_min")
        if self.std_min >= 1.0:
            fail(f"{prefix}std_min", f"must be below 1 (the steering noise's std starts at 1), got {self.std_min}")


class DSRL(ChunkPPO):
    """Fine-tune a pretrained flow policy by steering its initial noise (``algo: dsrl``); run it with
    :class:`flowrl.training.Trainer`."""

    algo = "dsrl"

    def _build_actor(self, policy: FlowPolicy) -> dict[str, nn.Module]:
        t = self.cfg.train
        policy.requires_grad_(False)
        if policy.steering is None:
            policy.cfg.steering_hidden_dim = t.steering_hidden_dim
            policy.steering = SteeringHead(policy.cond_dim, policy.chunk_shape, t.steering_hidden_dim,
                                           t.mean_bound, t.std_min).to(self.device)
        policy.steering.requires_grad_(True)
        return {}

    @property
    def steering(self) -> SteeringHead:
        return self.policy.steering

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.policy.chunk_shape

    def _log_prob_and_entropy(self, cond: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-likelihood of initial noises ``x0`` under the steering head's Gaussian and its entropy,
        summed over the chunk's elements."""
        mean, std = self.steering.distribution(cond)
        lp = gaussian_log_prob(x0, mean, std).flatten(1).sum(dim=1)
        entropy = (std.log() + LOG_2PI_E_HALF).flatten(1).sum(dim=1)
        return lp, entropy

    @torch.no_grad()
    def act(self, obs: torch.Tensor, images: dict[str, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steered initial noises for (N, H, obs_dim) observations (and a pixel policy's images) and the frozen
        flow's env-unit action chunks from them: (x0, actions)."""
        cond = self.policy.encode(obs, images)
        eps = torch.randn((obs.shape[0], *self.policy.chunk_shape), generator=self.gen, device=self.device)
        x0 = self.steering(cond, eps)
        return x0, self.policy.unnormalize_action(self._flow(self.policy, cond, x0))

    def _exploration_std(self, cond: torch.Tensor) -> torch.Tensor:
        return self.steering.std().mean()


__all__ = ["DSRL", "DSRLConfig"]
