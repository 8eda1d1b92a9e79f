"""Flow policies: an observation history in, a chunk of env-ready actions out.

A policy is an observation encoder (normalise and flatten the history), a velocity network
v(t, a, obs[, d]) and the Euler sampler. Three heads share the network: ``reflow`` (the
instantaneous velocity v(t, a)), ``shortcut`` (the velocity of one step of size d, d from powers of
two) and ``meanflow`` (the average velocity u(a_t, t, d) = (a_{t+d} - a_t) / d over any interval
[t, t + d] of the flow, with u(a, t, 0) = v(a, t)). A step of size d from t is ``a + d * v(t, a, d)``
for every head, so the samplers, the noisy chain of fine-tuning and the exports treat them alike. Observations are standardised with statistics of the
demonstrations and actions live in [-1, 1] inside the policy; both maps are buffers of the module,
so they are saved with the weights and travel into exports.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from flowrl.config import PolicyConfig, renamed_argument
from flowrl.errors import FlowrlError
from flowrl.nets import ResidualMLP, SinusoidalEmbedding
from flowrl.sampler import grid_euler_sample, uniform_times
from flowrl.vision import ImageEncoder

OBS_CLIP = 10.0


class FlowPolicy(nn.Module):
    """A rectified-flow, shortcut or meanflow policy over action chunks of shape (horizon, act_dim)."""

    def __init__(self, cfg: PolicyConfig, obs_dim: int, act_dim: int,
                 action_low: np.ndarray | torch.Tensor | None = None,
                 action_high: np.ndarray | torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.chunk_shape = (cfg.horizon, act_dim)
        low = torch.as_tensor(-np.ones(act_dim) if action_low is None else action_low, dtype=torch.float32)
        high = torch.as_tensor(np.ones(act_dim) if action_high is None else action_high, dtype=torch.float32)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("action_low", low.clone())
        self.register_buffer("action_high", high.clone())
        self.is_shortcut = cfg.head == "shortcut"
        self.takes_step_size = cfg.head in ("shortcut", "meanflow")
        """Whether the network sees the step size d (shortcut and meanflow heads)."""
        emb = cfg.time_embed_dim
        self.time_embed = SinusoidalEmbedding(emb)
        self.step_embed = SinusoidalEmbedding(emb) if self.takes_step_size else None
        self.image_encoder = (ImageEncoder(list(cfg.cameras), cfg.image_size, cfg.image_features, cfg.image_shift,
                                           cfg.image_jitter)
                              if cfg.cameras else None)
        image_dim = self.image_encoder.out_dim if self.image_encoder is not None else 0
        self.cond_dim = cfg.obs_history * (obs_dim + image_dim)
        in_dim = cfg.horizon * act_dim + self.cond_dim + emb * (2 if self.takes_step_size else 1)
        self.velocity_net = ResidualMLP(in_dim, cfg.horizon * act_dim, cfg.hidden_dim, cfg.depth)
        self.residual = (ContractingResidual(self.cond_dim, self.chunk_shape, cfg.residual_hidden_dim,
                                             emb, cfg.residual_gain_min) if cfg.residual_hidden_dim else None)
        self.steering = (SteeringHead(self.cond_dim, self.chunk_shape, cfg.steering_hidden_dim)
                         if cfg.steering_hidden_dim else None)

    # -- normalisation -------------------------------------------------------------------------
    def set_normalization(self, obs_mean: np.ndarray, obs_std: np.ndarray) -> None:
        """Statistics of the demonstrations' observations; tiny std floored to avoid blow-ups."""
        self.obs_mean.copy_(torch.as_tensor(obs_mean, dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(obs_std, dtype=torch.float32).clamp_min(1e-3))

    @property
    def uses_images(self) -> bool:
        """Whether the policy sees camera images (``cfg.cameras``) besides the state."""
        return self.image_encoder is not None

    def encode(self, obs: torch.Tensor, images: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, obs_history, obs_dim) raw observations -> (B, cond_dim) features: the standardised
        states, then (pixel policies) each history step's image features, ``images`` holding
        ``{camera: (B, obs_history, H, W, 3) uint8}``."""
        z = ((obs.to(self.obs_mean.dtype) - self.obs_mean) / self.obs_std).clamp(-OBS_CLIP, OBS_CLIP).flatten(1)
        if self.image_encoder is None:
            return z
        if images is None:
            raise ValueError(f"this policy sees camera images ({', '.join(self.cfg.cameras)}); none were given")
        b, h = obs.shape[:2]
        flat = {c: x.reshape(b * h, *x.shape[2:]) for c, x in images.items()}
        return torch.cat([z, self.image_encoder(flat).view(b, -1)], dim=1)

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        """Env units -> [-1, 1]."""
        return 2.0 * (action - self.action_low) / (self.action_high - self.action_low) - 1.0

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> env units (clamped to the bounds)."""
        a = action.clamp(-1.0, 1.0)
        return self.action_low + 0.5 * (a + 1.0) * (self.action_high - self.action_low)

    # -- velocity field ------------------------------------------------------------------------
    def velocity(self, t: torch.Tensor, action: torch.Tensor, cond: torch.Tensor,
                 step_size: torch.Tensor | None = None) -> torch.Tensor:
        """v(t, a, obs[, d]) for (B,) t, (B, horizon, act_dim) a, (B, F) encoded obs.

        Shortcut and meanflow heads also take the step size d (B,) (meanflow: d = 0 is the instantaneous
        velocity); rectified-flow heads ignore it.
        """
        parts = [action.flatten(1), cond, self.time_embed(t)]
        if self.step_embed is not None:
            if step_size is None:
                raise ValueError(f"a {self.cfg.head} head needs the step size d")
            parts.append(self.step_embed(step_size))
        v = self.velocity_net(torch.cat(parts, dim=-1)).view(-1, *self.chunk_shape)
        return v if self.residual is None else v + self.residual(t, action, cond)

    def velocity_fn(self, cond: torch.Tensor, k: int):
        """v(t, x) closed over the observation features, for the uniform grid of K = ``k`` steps: d = 1/K for
        heads that take a step size. What the noisy chain of fine-tuning steps with: for a meanflow head its
        one step at K = 1 is the average velocity over [0, 1]."""
        d = torch.full((cond.shape[0],), 1.0 / k, device=cond.device) if self.takes_step_size else None
        return lambda t, x: self.velocity(t, x, cond, d)

    def flow_matching_step(self, t: torch.Tensor) -> torch.Tensor | None:
        """The step size d (like ``t``) at which the network gives the instantaneous velocity, what flow
        matching trains: the finest shortcut step, 0 for a meanflow head (the average velocity over an empty
        interval), None for a rectified flow."""
        if self.is_shortcut:
            return torch.full_like(t, 1.0 / self.cfg.max_shortcut_steps)
        return torch.zeros_like(t) if self.takes_step_size else None

    def step_velocity_fn(self, cond: torch.Tensor):
        """v(t, x, d) closed over the observation features, for steps of any size d (non-uniform grids)."""
        return lambda t, x, d: self.velocity(t, x, cond, d if self.takes_step_size else None)

    def time_grid(self, k: int) -> list[float]:
        """The K + 1 times the deterministic sampler steps through at K = ``k``: the policy's own grid for
        that K (``cfg.time_grids``), else the uniform ``t_i = i / K``."""
        grid = self.cfg.time_grids.get(str(k))
        return [float(t) for t in grid] if grid else uniform_times(k)

    # -- sampling ------------------------------------------------------------------------------
    def initial_noise(self, batch: int, generator: torch.Generator | None = None,
                      device: torch.device | None = None) -> torch.Tensor:
        """Standard Gaussian noise eps, (B, horizon, act_dim): what :meth:`sample` takes as ``noise``."""
        device = device or self.obs_mean.device
        return torch.randn((batch, *self.chunk_shape), generator=generator, device=device)

    def steer(self, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The flow's initial point x0 for standard noise ``noise`` and observation features ``cond``: the
        steering head's ``mean(obs) + std * noise`` where the policy has one, else ``noise`` itself."""
        return noise if self.steering is None else self.steering(cond, noise)

    def sample(self, obs: torch.Tensor, k: int | None = None, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None,
               images: dict[str, torch.Tensor] | None = None, *,
               num_steps: int | None = None) -> torch.Tensor:
        """Normalised action chunks (B, horizon, act_dim), unclamped, from ``k`` Euler steps (default:
        the policy's own K) on :meth:`time_grid`; deterministic given ``noise`` (standard Gaussian noise,
        which a steering head maps to the initial point first: :meth:`steer`). ``num_steps`` is the old
        name of ``k``."""
        k = renamed_argument("FlowPolicy.sample", "num_steps", "k", num_steps, k) or self.cfg.k
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        cond = self.encode(obs, images)
        eps = self.initial_noise(obs.shape[0], generator) if noise is None else noise
        return grid_euler_sample(self.step_velocity_fn(cond), self.steer(cond, eps), self.time_grid(k))

    def predict(self, obs: torch.Tensor | np.ndarray, k: int | None = None,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                images: dict[str, torch.Tensor] | None = None, *,
                num_steps: int | None = None) -> torch.Tensor:
        """Env-ready action chunks (B, horizon, act_dim) for raw observations, from ``k`` Euler steps
        (default: the policy's own K), without gradients.

        ``obs`` is (B, obs_history, obs_dim), or (B, obs_dim) for a history of one; pixel policies
        also take ``images`` ``{camera: (B, obs_history, H, W, 3) uint8}`` (or (B, H, W, 3)).
        ``num_steps`` is the old name of ``k``.
        """
        k = renamed_argument("FlowPolicy.predict", "num_steps", "k", num_steps, k)
        with torch.no_grad():  # not a decorator: its wrapper would take the warning's place as the caller
            return self._predict(obs, k, noise, generator, images)

    def _predict(self, obs: torch.Tensor | np.ndarray, k: int | None, noise: torch.Tensor | None,
                 generator: torch.Generator | None, images: dict[str, torch.Tensor] | None) -> torch.Tensor:
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.obs_mean.device)
        if obs.dim() == 2:
            obs = obs.unsqueeze(1)
        if images is not None:
            images = {c: torch.as_tensor(x, device=self.obs_mean.device) for c, x in images.items()}
            images = {c: x.unsqueeze(1) if x.dim() == 4 else x for c, x in images.items()}
        return self.unnormalize_action(self.sample(obs, k, noise, generator, images))

    def describe(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self.parameters())
        return {"head": self.cfg.head, "parameters": n, "obs_dim": self.obs_dim, "act_dim": self.act_dim}


def require_state_only(policy: FlowPolicy, what: str) -> None:
    """A one-line error when a pixel policy reaches a stage that does not feed it images yet."""
    if getattr(policy, "uses_images", False):  # stand-ins of tests and tools are state-only
        raise FlowrlError(f"{what}: this policy sees camera images ({', '.join(policy.cfg.cameras)}); pixel "
                          "policies are trained by behaviour cloning and ReinFlow, evaluated and exported so far "
                          "(MLE fine-tuning, collection, videos and the deploy runtime take state-only policies)")


def require_unsteered(policy: FlowPolicy, what: str) -> None:
    """A one-line error when a policy with a steering head (DSRL's) reaches a stage that runs its flow from
    N(0, I) noise and would drop the head."""
    if getattr(policy, "steering", None) is not None:
        raise FlowrlError(f"{what}: this policy has a steering head (fine-tuned with DSRL), which this stage "
                          "would drop (it starts the flow from N(0, I) noise): continue with algo: dsrl, or "
                          "start from the checkpoint DSRL started from")


class ContractingResidual(nn.Module):
    """A residual velocity ``-k(t, obs) * (a - m(t, obs))`` added to a (frozen) field.

    Its Jacobian in the action is ``-diag(k)``: with every ``k >= gain_min`` above the frozen field's
    one-sided Lipschitz constant (the largest eigenvalue of its Jacobian's symmetric part), the
    combined field's Jacobian has a negative-definite symmetric part, so the flow contracts in the
    action and solver errors shrink instead of grow. ``m`` and ``k`` depend on
    time and observation only. At initialisation ``k`` is ``gain_min`` (+0.018) and ``m = 0``.
    """

    def __init__(self, cond_dim: int, chunk_shape: tuple[int, int], hidden: int, time_dim: int,
                 gain_min: float) -> None:
        super().__init__()
        self.chunk_shape = chunk_shape
        out = chunk_shape[0] * chunk_shape[1]
        self.time_embed = SinusoidalEmbedding(time_dim)
        self.net = nn.Sequential(nn.Linear(cond_dim + time_dim, hidden), nn.Mish(), nn.Linear(hidden, hidden),
                                 nn.Mish(), nn.Linear(hidden, 2 * out))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        with torch.no_grad():
            self.net[-1].bias[out:] = -4.0  # softplus(-4) = 0.018: the gain starts just above gain_min
        self.register_buffer("gain_min", torch.tensor(float(gain_min)))

    def target_and_gain(self, t: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, raw = self.net(torch.cat([cond, self.time_embed(t)], dim=-1)).chunk(2, dim=-1)
        gain = self.gain_min + torch.nn.functional.softplus(raw)
        return m.view(-1, *self.chunk_shape), gain.view(-1, *self.chunk_shape)

    def forward(self, t: torch.Tensor, action: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        m, gain = self.target_and_gain(t, cond)
        return -gain * (action - m)


class SteeringHead(nn.Module):
    """Chooses a flow's initial noise from the observation: ``x0 = mean(obs) + std * eps``, eps ~ N(0, I)
    (DSRL: RL over the initial noise of a frozen flow).

    Built at ``mean = 0`` and ``std = 1`` it leaves the policy it steers exactly as it was. The mean is
    ``mean_bound * tanh`` of a Tanh MLP on the observation features, so the flow is never started far
    outside the Gaussian it was trained from; the std is one free parameter per element of the chunk,
    kept in [``std_min``, 1]: steering may narrow the flow's own randomness, never widen it.
    """

    def __init__(self, cond_dim: int, chunk_shape: tuple[int, int], hidden: int, mean_bound: float = 2.0,
                 std_min: float = 0.05) -> None:
        super().__init__()
        self.chunk_shape = chunk_shape
        out = chunk_shape[0] * chunk_shape[1]
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, out))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.log_std = nn.Parameter(torch.zeros(chunk_shape))
        self.register_buffer("mean_bound", torch.tensor(float(mean_bound)))
        self.register_buffer("log_std_min", torch.tensor(float(np.log(std_min))))

    def std(self) -> torch.Tensor:
        """The std of x0 per element of the chunk, (horizon, act_dim): the same for every observation."""
        return self.log_std.clamp(self.log_std_min, 0.0).exp()

    def distribution(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of x0, (B, horizon, act_dim) each, for (B, F) observation features."""
        mean = self.mean_bound * torch.tanh(self.net(cond)).view(-1, *self.chunk_shape)
        return mean, self.std().expand_as(mean)

    def forward(self, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mean, std = self.distribution(cond)
        return mean + std * noise


def split_interval_target(velocity: Any, x_t: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                          split: torch.Tensor) -> torch.Tensor:
    """SplitMeanFlow's target for the average velocity over [t, t + d]: the interval is split at
    ``s = t + split * d`` (``split`` in (0, 1), per row) and

        d u(x_t, t, d) = (s - t) u(x_t, t, s - t) + (t + d - s) u(x_s, s, t + d - s),
        x_s = x_t + (s - t) u(x_t, t, s - t),

    which holds exactly for the true average velocity of any flow (the displacement over the interval is
    the sum of the displacements over its two parts). ``velocity(t, x, d)`` is the (EMA) meanflow field;
    the target is the right-hand side divided by d."""
    def col(v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (x_t.dim() - 1)))

    first = split * d
    second = d - first
    u1 = velocity(t, x_t, first)
    x_s = x_t + col(first) * u1
    u2 = velocity(t + first, x_s, second)
    return col(split) * u1 + col(1 - split) * u2


def shortcut_target(velocity: Any, x_t: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Self-consistency target for step size 2d: the mean velocity of two Euler steps of size d.

    ``velocity(t, x, d)`` is the (EMA) shortcut field. Equals ``(x_{t+2d} - x_t) / (2d)`` where
    ``x_{t+2d}`` is reached by two steps of size d: the shortcut of 2d must match them (the interval
    [t, t + 2d] split in its middle, :func:`split_interval_target`).
    """
    return split_interval_target(velocity, x_t, t, 2 * d, torch.full_like(d, 0.5))
