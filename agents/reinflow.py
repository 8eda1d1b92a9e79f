"""ReinFlow: fine-tune a flow policy online with PPO over its noise-injected Euler chain.

A small noise head sigma(t, obs) adds Gaussian noise at every Euler step, so the K-step chain
``a_0 ~ N(0, I), a_{k+1} = a_k + v(t_k, a_k, obs) dt + sigma_k eps_k`` is a Markov chain with an
exact likelihood; PPO then trains the velocity field and the noise head together from online
rollouts, with a critic on observations. At deployment the noise head is dropped and the
deterministic flow is what runs, evaluates and is saved. The rollout, the critic and the PPO
update are the shared ones of :mod:`flowrl.agents.ppo`; this file says what a decision's sample
is (the whole chain) and how likely it is.

Choices worth knowing:
- Time grid ``t_k = k/K`` (the reference evaluated ``k/(K-1)``; a bug).
- Log-likelihood normalisation (``logprob_normalization``): by default the ratio uses the chain
  log-likelihood divided by its number of noisy elements, K * horizon * act_dim: a per-element
  geometric-mean ratio, whose scale does not grow with K or the chunk, so one clip range fits all
  tasks (the reference normalises the same way). The x0 term is left out of the ratio: it does
  not depend on the parameters and cancels exactly. ``sum`` gives the exact joint ratio.
- ``exploration: flow_sde`` adds the score correction to each noisy step's mean, so the chain keeps
  the deterministic flow's marginals: PPO then improves the distribution that is deployed, where
  ReinFlow's plain injection trains a wider, shifted one.
- ``exploration: last_step`` injects the noise at the last Euler step only. Given its initial noise,
  a sampled chunk is then Gaussian around the very chunk the deterministic flow deploys from that
  noise, as a Gaussian policy's samples are around its mean, so what PPO improves is centred on what
  is deployed. With noise at every step, the later steps' velocity carries the earlier noise
  somewhere else, and the sampled chunks' centre is not the deployed chunk. The likelihood is that
  of the last step given the initial noise (exact: the earlier steps are a deterministic function of
  it and the parameters, recomputed at every update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from flowrl.agents.ppo import ChunkPPO, ChunkPPOConfig
from flowrl.config import check_fraction, check_non_negative, check_positive, fail
from flowrl.nets import SinusoidalEmbedding
from flowrl.policy import FlowPolicy, require_unsteered
from flowrl.sampler import chain_transitions, gaussian_log_prob, noisy_euler_chain, time_grid

LOG_2PI_E_HALF = 0.5 * math.log(2 * math.pi * math.e)
EXPLORATIONS = ("reinflow", "flow_sde", "last_step")


@dataclass
class ReinFlowConfig(ChunkPPOConfig):
    """ReinFlow (``algo: reinflow``); an iteration is one rollout of every env and one PPO update."""

    w2_coef: float = 0.0
    """Weight of the W2 regulariser toward the frozen pretrained policy (same initial noise, no injection)."""
    tracking_coef: float = 0.0
    """Weight of the regression of the deterministic chain onto the end of the noisy chain the rollout sampled
    from the same initial noise: the deployed (noise-free) policy then follows the mean of the sampled actions
    that PPO improves, where by itself it may move elsewhere."""
    sigma_min: float = 0.10
    """Lower bound of the injected noise std (normalised action units)."""
    sigma_max: float = 0.24
    """Upper bound of the injected noise std at the start."""
    sigma_hold: float = 0.35
    """Fraction of iterations the upper bound is held before its cosine decay."""
    sigma_final_mix: float = 0.7
    """The upper bound decays to (1 - mix) * sigma_min + mix * sigma_max."""
    logprob_normalization: str = "mean"
    """`mean`: the ratio uses the chain log-likelihood divided by its number of noisy elements (K*horizon*act_dim; horizon*act_dim with noise at the last step only), a per-element geometric-mean ratio; `mean_with_initial`: divided by (K+1)*horizon*act_dim, counting the initial noise as ReinFlow's reference does (the same ratio to the power K/(K+1): a wider effective clip); `sum`: the exact joint ratio."""
    exploration: str = "reinflow"
    """`reinflow`: the noise is added to every Euler step's mean (ReinFlow); `flow_sde`: each step's mean also takes the score correction that keeps the flow's marginals (flowrl.sampler.step_mean), so the noisy chain PPO trains samples, in distribution, the deterministic flow that is deployed; `last_step`: the noise is added at the last step only, so a sampled chunk is Gaussian around the deployed chunk from the same initial noise."""
    noise_hidden_dim: int = 128
    """Width of the noise head MLP."""

    def validate(self, prefix: str = "train.") -> None:
        super().validate(prefix)
        check_positive(self, prefix, "sigma_min", "sigma_max", "noise_hidden_dim")
        check_non_negative(self, prefix, "w2_coef", "tracking_coef")
        check_fraction(self, prefix, "sigma_hold", "sigma_final_mix")
        if self.sigma_min > self.sigma_max:
            fail(f"{prefix}sigma_min", f"must be <= sigma_max ({self.sigma_max}), got {self.sigma_min}")
        if self.logprob_normalization not in ("mean", "mean_with_initial", "sum"):
            fail(f"{prefix}logprob_normalization",
                 f"must be mean, mean_with_initial or sum, got '{self.logprob_normalization}'")
        if self.exploration not in EXPLORATIONS:
            fail(f"{prefix}exploration", f"must be one of {', '.join(EXPLORATIONS)}, got '{self.exploration}'")


class NoiseHead(nn.Module):
    """sigma(t, obs) per element of the action chunk, in [sigma_min, sigma_max].

    A Tanh MLP on (time embedding, observation features) whose output is squashed by tanh into
    the log-variance range [log sigma_min^2, log sigma_max^2]; the bounds are buffers so the
    upper one can follow its schedule.
    """

    def __init__(self, cond_dim: int, chunk_shape: tuple[int, int], hidden: int, time_dim: int,
                 sigma_min: float, sigma_max: float) -> None:
        super().__init__()
        self.chunk_shape = chunk_shape
        self.time_embed = SinusoidalEmbedding(time_dim)
        out = chunk_shape[0] * chunk_shape[1]
        self.net = nn.Sequential(nn.Linear(cond_dim + time_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, out))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("log_var_min", torch.tensor(2 * math.log(sigma_min)))
        self.register_buffer("log_var_max", torch.tensor(2 * math.log(sigma_max)))

    def set_bounds(self, sigma_min: float, sigma_max: float) -> None:
        self.log_var_min.fill_(2 * math.log(sigma_min))
        self.log_var_max.fill_(2 * math.log(sigma_max))

    def forward(self, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        raw = self.net(torch.cat([cond, self.time_embed(t)], dim=-1))
        log_var = self.log_var_min + (self.log_var_max - self.log_var_min) * 0.5 * (torch.tanh(raw) + 1.0)
        return (0.5 * log_var).exp().view(-1, *self.chunk_shape)


def sigma_upper_bound(iteration: int, iterations: int, sigma_min: float, sigma_max: float, hold: float,
                      final_mix: float) -> float:
    """Held at sigma_max for ``hold`` of the iterations, then cosine-annealed to the final mix."""
    final = (1 - final_mix) * sigma_min + final_mix * sigma_max
    start = hold * iterations
    if iteration < start or iterations <= start:
        return sigma_max
    frac = min(1.0, (iteration - start) / max(1.0, iterations - 1 - start))
    return final + (sigma_max - final) * 0.5 * (1 + math.cos(math.pi * frac))



class ReinFlow(ChunkPPO):
    """Fine-tune a pretrained flow policy online (``algo: reinflow``); run it with :class:`flowrl.training.Trainer`."""

    algo = "reinflow"

    def _build_actor(self, policy: FlowPolicy) -> dict[str, nn.Module]:
        require_unsteered(policy, f"{self.init_info['path']}: ReinFlow")
        t = self.cfg.train
        self.noise = NoiseHead(policy.cond_dim, policy.chunk_shape, t.noise_hidden_dim, policy.cfg.time_embed_dim,
                               t.sigma_min, t.sigma_max).to(self.device)
        return {"noise": self.noise}

    @property
    def _last_step_only(self) -> bool:
        return self.cfg.train.exploration == "last_step"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The whole chain (K+1 states); with noise at the last step only, its initial noise and its end."""
        return (2 if self._last_step_only else self.K + 1, *self.policy.chunk_shape)

    # -- the noisy chain -----------------------------------------------------------------------
    def _chain_fns(self, cond: torch.Tensor, repeat: int = 1):
        if repeat > 1:  # each row ``repeat`` times in a row (repeat_interleave without its size computation)
            cond = cond.unsqueeze(1).expand(-1, repeat, *cond.shape[1:]).reshape(-1, *cond.shape[1:])
        return self.policy.velocity_fn(cond, self.K), lambda tt, x: self.noise(tt, cond)

    @property
    def _score_correction(self) -> bool:
        return self.cfg.train.exploration == "flow_sde"

    def _last_step(self, cond: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With noise at the last step only: the mean and std of the chain's end given its initial noise
        ``x0``. The mean is the deployed flow's chunk from ``x0`` (the same K Euler steps); the std is the
        noise head's at the last step's time."""
        last = time_grid(self.K, len(x0), x0.device, x0.dtype)[-1]
        return self._flow(self.policy, cond, x0), self.noise(last, cond)

    def _log_prob_and_entropy(self, cond: torch.Tensor, chain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chain log-likelihood (without the parameter-free x0 term) and the injected noise's entropy,
        both normalised as ``logprob_normalization`` says."""
        if self._last_step_only:
            mean, std = self._last_step(cond, chain[:, 0])
            ends, mean, std = chain[:, 1:], mean.unsqueeze(1), std.unsqueeze(1)
        else:
            velocity, noise_std = self._chain_fns(cond, repeat=self.K)
            mean, std = chain_transitions(velocity, noise_std, chain, self.K, self._score_correction)
            ends = chain[:, 1:]
        lp = gaussian_log_prob(ends, mean, std).flatten(1).sum(dim=1)
        entropy = (std.log() + LOG_2PI_E_HALF).flatten(1).sum(dim=1)
        normalization = self.cfg.train.logprob_normalization
        if normalization != "sum":
            n = ends.flatten(1).shape[1]
            n = n * (mean.shape[1] + 1) // mean.shape[1] if normalization == "mean_with_initial" else n
            lp, entropy = lp / n, entropy / n
        return lp, entropy

    @torch.no_grad()
    def act(self, obs: torch.Tensor, images: dict[str, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample chains for (N, H, obs_dim) observations (and a pixel policy's images): (chain, env-unit
        action chunk)."""
        cond = self.policy.encode(obs, images)
        x0 = torch.randn((obs.shape[0], *self.policy.chunk_shape), generator=self.gen, device=self.device)
        if self._last_step_only:
            mean, std = self._last_step(cond, x0)
            end = mean + std * torch.randn(mean.shape, generator=self.gen, device=self.device, dtype=mean.dtype)
            chain = torch.stack([x0, end], dim=1)
        else:
            velocity, noise_std = self._chain_fns(cond)
            chain = noisy_euler_chain(velocity, noise_std, x0, self.K, self.gen, self._score_correction)
        return chain, self.policy.unnormalize_action(chain[:, -1])

    def _exploration_std(self, cond: torch.Tensor) -> torch.Tensor:
        steps = [self.K - 1] if self._last_step_only else range(self.K)
        return torch.stack([self.noise(torch.full((len(cond),), k / self.K, device=self.device), cond).mean()
                            for k in steps]).mean()

    # -- the regularisers and the noise schedule -----------------------------------------------------
    REGULARISERS = ("train/w2_loss", "train/tracking_loss")

    def _regulariser(self, obs: torch.Tensor, images: dict[str, torch.Tensor] | None, cond: torch.Tensor,
                     chain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """From the chain's own initial noise, the mean square distances of the policy's deterministic chunk to
        the pretrained policy's (``w2_coef``) and to the sampled chain's end (``tracking_coef``)."""
        t = self.cfg.train
        if t.w2_coef <= 0 and t.tracking_coef <= 0:
            return None
        x0 = chain[:, 0]
        deterministic = self._deterministic_actions(self.policy, cond, x0)
        zero = deterministic.new_zeros(())
        w2 = zero if t.w2_coef <= 0 else (
            deterministic - self._deterministic_actions(self.reference, self.reference.encode(obs, images), x0)
        ).square().mean()
        tracking = zero if t.tracking_coef <= 0 else (deterministic - chain[:, -1]).square().mean()
        return t.w2_coef * w2 + t.tracking_coef * tracking, torch.stack([w2, tracking])

    def _regulariser_logs(self, values: dict[str, float]) -> dict[str, float]:
        t = self.cfg.train
        used = {"train/w2_loss": t.w2_coef > 0, "train/tracking_loss": t.tracking_coef > 0}
        return {name: value for name, value in values.items() if used[name]}

    def _schedule(self) -> dict[str, float]:
        t, i, n = self.cfg.train, self.iteration, self.iterations
        upper = sigma_upper_bound(i, n, t.sigma_min, t.sigma_max, t.sigma_hold, t.sigma_final_mix)
        self.noise.set_bounds(t.sigma_min, upper)
        return {**super()._schedule(), "train/noise_std_max": upper}


__all__ = ["EXPLORATIONS", "NoiseHead", "ReinFlow", "ReinFlowConfig", "sigma_upper_bound"]
