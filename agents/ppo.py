"""PPO over action chunks from batched simulations: what every online fine-tuning algorithm shares.

An algorithm here (ReinFlow, DSRL) is a :class:`ChunkPPO` that says what one decision's *sample* is
and how likely it is: ReinFlow's is the whole noise-injected Euler chain of the flow, DSRL's the
initial noise its steering head chose for a frozen flow. Everything else is this file's: the rollout
of every env (an action chunk per decision, its executed steps' rewards summed), the critic on the
policy's observation features, GAE, the clipped PPO update (optionally one CUDA graph per
minibatch), the critic warm-up, the learning-rate schedules, reward scaling, the distributed
reductions, checkpointing and the diagnostics of how far the deployed policy has moved.

Choices worth knowing:
- Old log-probabilities are evaluated on the same minibatches, in the same order, as the first
  epoch uses, so the ratio of the first minibatch of every update is exactly 1.
- A chunk's reward is the sum of the rewards of its executed steps; discounting is per decision.
  An episode that ends inside a chunk takes none of its remaining actions; the next episode starts
  from its reset state at the chunk boundary (:meth:`flowrl.envs.BatchedEnv.step_chunk`).
- GAE bootstraps through truncations (value of ``info["final_obs"]``), never through terminations.
- ``critic_warmup_ev``: the actor waits for a critic that explains the returns, not for a fixed
  number of iterations.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from abc import abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowrl import distributed
from flowrl.checkpoint import load_init
from flowrl.config import (FinetuneConfig, LoopConfig, check_fraction, check_non_negative, check_positive,
                           setup_torch, validate_backend)
from flowrl.cuda_graph import StepGraph, fused_if_cuda, graphs_usable, tf32_matmuls
from flowrl.envs import make, resolve_backend, resolve_task
from flowrl.errors import FlowrlError
from flowrl.policy import FlowPolicy
from flowrl.rollout import CameraObserver, ObsHistory
from flowrl.sampler import euler_sample
from flowrl.training import Agent, mean_or_none

RECENT = 100  # finished episodes behind the rollout/* means (SB3's window for rollout/ep_rew_mean)


@dataclass
class ChunkPPOConfig(LoopConfig):
    """The rollout and PPO update every online fine-tuning algorithm shares; an iteration is one rollout of
    every env and one PPO update."""

    env_steps: int = 8_000_000
    """Budget of environment steps in total (one iteration is num_envs * rollout_steps * act_steps)."""
    num_envs: int = 256
    """Environments stepped together."""
    rollout_steps: int = 80
    """Policy decisions (action chunks) per env per iteration."""
    k: int = 0
    """Euler steps K of the flow (0: the pretrained policy's K)."""
    gamma: float = 0.99
    """Discount per decision (per action chunk)."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    actor_lr: float = 4.5e-5
    """Learning rate of what the algorithm trains of the policy, cosine-decayed to actor_lr_min."""
    actor_lr_min: float = 2e-5
    """Final actor learning rate."""
    critic_lr: float = 6.5e-4
    """Learning rate of the critic, cosine-decayed to critic_lr_min."""
    critic_lr_min: float = 3e-4
    """Final critic learning rate."""
    update_epochs: int = 5
    """Passes over each iteration's data."""
    minibatch_size: int = 2560
    """Decisions per gradient step."""
    clip_coef: float = 0.01
    """PPO clip range of the probability ratio."""
    target_kl: float = 0.0
    """Stop an iteration's epochs once the approximate KL exceeds this (0: never)."""
    ent_coef: float = 0.03
    """Weight of the entropy bonus of the exploration noise."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    max_grad_norm: float = 1.0
    """Clip each network's gradient norm to this (0: off)."""
    reward_scaling: bool = True
    """Divide rewards by a running std of the discounted return."""
    normalize_advantages: bool = True
    """Standardise each minibatch's advantages (over every rank's share). Off: the policy gradient sees the advantages in the scaled reward's units, so near-constant returns (a sparse-success task near 100%) give a small step instead of critic noise blown up to unit scale."""
    critic_warmup_iterations: int = 2
    """Iterations at the start that train only the critic."""
    critic_warmup_ev: float = 0.0
    """After those, keep training only the critic until its explained variance on an iteration's fresh rollout reaches this (0: off)."""
    critic_warmup_max_iterations: int = 50
    """The explained-variance warm-up ends at this iteration whatever the critic's accuracy."""
    actor_lr_ramp_iterations: int = 0
    """The actor's learning rate rises linearly from 1/N of its schedule to all of it over its first N updating iterations (after the critic warm-up), so the first policy updates are small steps (0: off)."""
    critic_hidden_dim: int = 256
    """Width of the critic MLP."""
    critic_depth: int = 3
    """Hidden layers of the critic MLP."""
    backend: str = "auto"
    """Simulation backend for rollouts (see flowrl.envs.make)."""
    sim_threads: int = 0
    """Threads of the cpu backend (0: all cores)."""
    cuda_graph: bool = True
    """On a CUDA device, run each PPO minibatch step's forward and backward pass as one captured CUDA graph
    (one process, state-only policies): the same arithmetic, launched at once."""
    tf32: bool = True
    """On a CUDA device, the rollout's and the update's matrix products in TensorFloat-32 (10-bit mantissa inputs,
    float32 sums): several times the float32 rate on tensor cores. Old and new log-probabilities of the PPO ratio
    are computed the same way, so the first minibatch's ratio stays 1; evaluations stay in float32."""
    terminate_on_success: bool = False
    """robosuite tasks: a training episode ends (terminated, no bootstrap) at its first success, so the
    return is the discounted time to success instead of the steps spent successful until the horizon."""

    def validate(self, prefix: str = "train.") -> None:
        super().validate(prefix)
        check_positive(self, prefix, "env_steps", "num_envs", "rollout_steps", "actor_lr", "critic_lr",
                       "update_epochs", "minibatch_size", "clip_coef", "critic_hidden_dim", "critic_depth")
        check_non_negative(self, prefix, "k", "target_kl", "ent_coef", "vf_coef", "max_grad_norm",
                           "actor_lr_min", "critic_lr_min", "critic_warmup_iterations", "critic_warmup_max_iterations",
                           "actor_lr_ramp_iterations", "sim_threads")
        check_fraction(self, prefix, "gamma", "gae_lambda", "critic_warmup_ev")
        validate_backend(self.backend, f"{prefix}backend")


@dataclass
class EpisodeStats:
    """Statistics of the training episodes (not of the evaluations)."""

    returns: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    lengths: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    successes: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    rollout_seconds: list = field(default_factory=list)
    episode_success: torch.Tensor | None = None
    """(N,) whether each env's running episode has succeeded yet (tasks that report success)."""


@dataclass
class CriticWarmup:
    """Whether the critic has passed ``train.critic_warmup_ev`` (the actor trains from then on), and
    how many iterations have updated the actor since (its learning-rate ramp)."""

    ready: bool = False
    actor_iterations: int = 0


class Critic(nn.Module):
    """V(obs history): Mish MLP on the policy's normalised observation features."""

    def __init__(self, in_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.Mish()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


class RunningRewardScaler:
    """Divides rewards by the running std of the discounted return (reset at episode ends).

    Its statistics stay on the rewards' device, so scaling a step's rewards never waits for the GPU."""

    def __init__(self, num_envs: int, gamma: float, device: torch.device,
                 ranks: distributed.Dist | None = None) -> None:
        self.gamma = gamma
        self.ranks = ranks or distributed.Dist()  # the statistics are over every rank's envs
        self.ret = torch.zeros(num_envs, dtype=torch.float64, device=device)
        self.count = torch.tensor(1e-4, dtype=torch.float64, device=device)
        self.mean = torch.tensor(0.0, dtype=torch.float64, device=device)
        self.var = torch.tensor(1.0, dtype=torch.float64, device=device)

    def __call__(self, reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        self.ret = self.ret * self.gamma + reward.to(self.ret.device, torch.float64)
        batch_mean, batch_var, n = self.ranks.moments(self.ret)
        delta, total = batch_mean - self.mean, self.count + n
        self.mean = self.mean + delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta.square() * self.count * n / total) / total
        self.count = total
        self.ret = torch.where(done.to(self.ret.device), 0.0, self.ret)
        return reward / torch.sqrt(self.var + 1e-8).to(reward.device, reward.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ret": self.ret.cpu().clone(), "count": self.count.cpu(), "mean": self.mean.cpu(),
                "var": self.var.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        dev = self.ret.device
        self.ret.copy_(state["ret"])
        self.count, self.mean, self.var = (torch.as_tensor(state[k], dtype=torch.float64).to(dev)
                                           for k in ("count", "mean", "var"))


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, next_value: torch.Tensor, terminated: torch.Tensor,
                truncated: torch.Tensor, final_values: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, (T, N) each.

    After a termination the next value is 0; after a truncation it is the value of the final
    observation (``final_values``); in both cases the advantage recursion restarts.
    """
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(next_value)
    upcoming = next_value
    for t in range(values.shape[0] - 1, -1, -1):
        nv = torch.where(terminated[t], torch.zeros_like(upcoming), torch.where(truncated[t], final_values[t], upcoming))
        delta = rewards[t] + gamma * nv - values[t]
        carry = (~(terminated[t] | truncated[t])).to(values.dtype)
        last = delta + gamma * lam * carry * last
        advantages[t] = last
        upcoming = values[t]
    return advantages, advantages + values


def _device_mean(values: list[torch.Tensor]) -> float:
    """The mean of scalar tensors accumulated on the device, read back once."""
    return float(torch.stack(values).mean())


def standardised_signs(advantages: torch.Tensor, minibatches: list[torch.Tensor]) -> torch.Tensor:
    """Whether each advantage is above its minibatch's mean: the sign it has once standardised per minibatch
    (what the policy gradient sees with ``normalize_advantages``). ``minibatches`` are consecutive slices of
    one permutation, all of one size but the last (:meth:`ChunkPPO._minibatches`), so a decision's minibatch
    is its place in the permutation divided by that size: a few kernels per epoch, no host round trip."""
    dev, size = advantages.device, len(minibatches[0])
    place = torch.empty(len(advantages), dtype=torch.long, device=dev)
    place[torch.cat(minibatches)] = torch.arange(len(advantages), device=dev)
    segment = place // size
    sums = torch.zeros(len(minibatches), dtype=advantages.dtype, device=dev).index_add_(0, segment, advantages)
    sizes = torch.bincount(segment, minlength=len(minibatches)).to(advantages.dtype)
    return advantages > (sums / sizes)[segment]


def cosine(iteration: int, iterations: int, start: float, end: float) -> float:
    frac = min(1.0, iteration / max(1, iterations - 1))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * frac))


class ChunkPPO(Agent):
    """The online fine-tuning loop of an algorithm that trains a flow policy with PPO from batched rollouts;
    run it with :class:`flowrl.training.Trainer`.

    A subclass builds what it trains (:meth:`_build_actor`), samples a decision (:meth:`act`: the sample
    PPO's ratio is over, and the env-unit action chunk) and scores samples (:meth:`_log_prob_and_entropy`);
    it may add a regulariser to the loss (:meth:`_regulariser`) and schedule its exploration
    (:meth:`_schedule`)."""

    stage = "finetune"
    step_unit = "env step"
    evaluate_at_start = True
    supports_distributed = True
    optional_state = ("env", "history", "stats", "generator", "scaler", "critic_warmup")

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        t = cfg.train
        self.device = setup_torch(cfg)
        # Each rank steps num_envs / W of the envs (env i of rank r seeded as env r * num_envs / W + i of one
        # process) and takes minibatch_size / W of every minibatch; gradients, advantage normalisation,
        # reward-scaling statistics, the KL stop and the logs are reduced over the ranks.
        self.dist = distributed.current()
        self.local_envs = self.dist.share(t.num_envs, "train.num_envs")
        self.local_minibatch = self.dist.share(t.minibatch_size, "train.minibatch_size")
        policy, _, self.task, self.init_info = load_init(cfg.init, cfg.task, self.device)
        self.K = t.k or policy.cfg.k
        policy.cfg.k = self.K
        policy.cfg.time_grids = {}  # chosen for the pretrained weights; fine-tuning steps on the uniform grid
        self._policy = policy.train()
        torch.manual_seed(cfg.seed)
        self.actor_modules: dict[str, nn.Module] = self._build_actor(policy)
        """What the algorithm trains besides the policy's own modules, by checkpoint name."""
        self.actor_params = [p for m in (self._policy, *self.actor_modules.values()) for p in m.parameters()
                             if p.requires_grad]
        """Every parameter the actor's optimiser steps (a frozen part of the policy is not among them)."""
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        """The deployed policy as it started: what the action drift and a regulariser compare against."""
        self.critic = Critic(policy.cond_dim, t.critic_hidden_dim, t.critic_depth).to(self.device)
        for module in (self._policy, *self.actor_modules.values(), self.critic):
            self.dist.broadcast_module(module)
        fused = fused_if_cuda(self.device)
        self.actor_opt = torch.optim.Adam(self.actor_params, lr=t.actor_lr, **fused)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=t.critic_lr, **fused)
        graphable = t.cuda_graph and graphs_usable(self.device, self.dist.active, policy.uses_images)
        self._ppo_graph = StepGraph(lambda inputs: self._ppo_step(self._rollout_buffers, inputs)) if graphable else None
        self._rollout_buffers: dict[str, torch.Tensor] = {}
        """The rollout copied into the fixed buffers the captured PPO step reads (allocated at the first update)."""
        self._said_eager = False
        self.steps_per_iteration = t.num_envs * t.rollout_steps * policy.cfg.act_steps
        self.iterations = max(1, math.ceil(t.env_steps / self.steps_per_iteration))
        env_kwargs: dict[str, Any] = {}
        if t.sim_threads and t.backend in ("auto", "cpu"):
            env_kwargs["threads"] = t.sim_threads
        if t.terminate_on_success:
            if not resolve_task(self.task).has_success:
                raise FlowrlError(f"config: train.terminate_on_success: task {self.task} reports no success")
            env_kwargs["terminate_on_success"] = True
        self.backend = resolve_backend(self.task, t.backend, self.device, images=policy.uses_images)
        self.env = make(self.task, self.local_envs, backend=self.backend, device=self.device,
                        seed=cfg.seed + self.dist.rank * self.local_envs, images=policy.uses_images, **env_kwargs)
        if (self.env.obs_dim, self.env.act_dim) != (policy.obs_dim, policy.act_dim):
            raise FlowrlError(f"{cfg.init}: policy has obs/act dims {policy.obs_dim}/{policy.act_dim} but task "
                              f"{self.task} has {self.env.obs_dim}/{self.env.act_dim}")
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1_000_003 * self.dist.rank)
        self.scaler = RunningRewardScaler(self.local_envs, t.gamma, self.device, self.dist)
        self.history = ObsHistory(self.env.reset(), policy.cfg.obs_history)
        self.observer: CameraObserver | None = None
        if policy.uses_images:
            try:
                self.observer = CameraObserver(self.env, policy.cfg.cameras, policy.cfg.image_size,
                                               policy.cfg.obs_history, self.device, finals=True)
            except BaseException:
                self.env.close()  # robosuite's workers would outlive the failed start
                raise
        self.stats = EpisodeStats(episode_success=torch.zeros(self.local_envs, dtype=torch.bool, device=self.device))
        self.iteration = 0  # set by train_iteration; the schedules and the critic warm-up read it
        self.critic_warmup = CriticWarmup()

    @property
    def policy(self) -> FlowPolicy:
        """The deployed policy: what evaluates, is saved and exported."""
        return self._policy

    # -- what a subclass says ---------------------------------------------------------------------
    @abstractmethod
    def _build_actor(self, policy: FlowPolicy) -> dict[str, nn.Module]:
        """Prepare what this algorithm trains (on the device; frozen parts of ``policy`` set to
        ``requires_grad_(False)``) and return the modules it adds outside the policy, by checkpoint name."""

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one decision's sample (what :meth:`act` returns first, per env)."""

    @abstractmethod
    def act(self, obs: torch.Tensor, images: dict[str, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples for (N, H, obs_dim) observations (and a pixel policy's images): (sample, env-unit action
        chunk), drawn from :attr:`gen`."""

    @abstractmethod
    def _log_prob_and_entropy(self, cond: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-decision log-likelihood of ``sample`` given observation features ``cond`` (what the PPO ratio
        compares) and the entropy of its exploration noise, (B,) each."""

    @abstractmethod
    def _exploration_std(self, cond: torch.Tensor) -> torch.Tensor:
        """The mean std of the exploration noise at observation features ``cond`` (a scalar tensor)."""

    REGULARISERS: tuple[str, ...] = ()
    """The log keys of the terms :meth:`_regulariser` returns, in its order."""

    def _regulariser(self, obs: torch.Tensor, images: dict[str, torch.Tensor] | None, cond: torch.Tensor,
                     sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An extra loss of a minibatch and the unweighted value of each of :attr:`REGULARISERS`' terms, a
        (len(REGULARISERS),) tensor for the logs (None: none)."""
        return None

    def _flow(self, policy: FlowPolicy, cond: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """``policy``'s K Euler steps (normalised chunks) from the initial points ``x0``, given encoded
        observations ``cond``."""
        return euler_sample(policy.velocity_fn(cond, self.K), x0, self.K)

    def _deterministic_actions(self, policy: FlowPolicy, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``policy``'s deployed K-step chunks (normalised) from encoded observations ``cond`` and standard
        noise ``noise``: what evaluation and deployment run."""
        return self._flow(policy, cond, policy.steer(cond, noise))

    def resumable_keys(self) -> tuple[str, ...]:
        return ("train.env_steps", "train.max_minutes")

    def checkpoint_info(self) -> dict[str, Any]:
        return {"init": self.init_info}

    def state_components(self) -> dict[str, Any]:
        state: dict[str, Any] = {"policy": self._policy, **self.actor_modules, "critic": self.critic,
                                 "actor_opt": self.actor_opt, "critic_opt": self.critic_opt,
                                 "critic_warmup": self.critic_warmup}
        if self.dist.active:  # the rest is per rank: a distributed run's checkpoint holds the shared state only
            return state
        state.update(scaler=self.scaler, generator=self.gen, history=self.history, stats=self.stats)
        if hasattr(self.env, "get_full_state"):
            state["env"] = self.env
        return state

    def on_resume(self, missing: list[str] | None = None) -> None:
        if self.observer is not None:  # the images of the restored states (longer histories: repeated)
            self.observer.restart()
        missing = [name for name in missing or [] if name != "critic_warmup"]  # older checkpoints: not warming
        if missing and self.dist.is_main:
            print(f"note: the checkpoint holds no {', '.join(missing)} (a distributed run's, or the other way "
                  "round): the envs start new episodes and the reward scaling new statistics", file=sys.stderr)
        elif not hasattr(self.env, "get_full_state"):
            print(f"warning: the {self.backend} backend cannot restore its simulation state; the envs "
                  "start new episodes, so this run will not match an uninterrupted one exactly", file=sys.stderr)

    def postfix(self, logs: dict[str, float]) -> dict[str, str]:
        return {"ep_rew": f"{logs.get('rollout/ep_rew_mean') or float('nan'):.1f}",
                "it_s": f"{logs.get('time/iteration_s', 0.0):.2f}"}

    def log_prob_and_entropy(self, obs: torch.Tensor, sample: torch.Tensor,
                             images: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-decision log-likelihood of ``sample`` and the entropy of the exploration noise for raw
        observations (pixel policies: with their ``images``)."""
        return self._log_prob_and_entropy(self.policy.encode(obs, images), sample)

    # -- rollout -------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self) -> dict[str, torch.Tensor]:
        t, env, stats = self.cfg.train, self.env, self.stats
        n, steps, act_steps = self.local_envs, t.rollout_steps, self.policy.cfg.act_steps
        obs_buf = torch.zeros((steps, *self.history.get().shape), device=self.device, dtype=torch.float32)
        sample_buf = torch.zeros((steps, n, *self.sample_shape), device=self.device)
        rewards = torch.zeros((steps, n), device=self.device)
        terminated = torch.zeros((steps, n), dtype=torch.bool, device=self.device)
        truncated = torch.zeros_like(terminated)
        final_values = torch.zeros((steps, n), device=self.device)
        record_obs = self.policy.cfg.obs_history > 1
        observer = self.observer
        image_buf = {c: torch.zeros((steps, *h.shape), dtype=torch.uint8, device=self.device)
                     for c, h in (observer.get() if observer else {}).items()}
        hook = observer.step_kwargs() if observer else {}
        # what the episodes that end tell, kept on the device and read back once after the rollout
        ended = torch.zeros((steps, n), dtype=torch.bool, device=self.device)
        ended_return = torch.zeros((steps, n), dtype=torch.float64, device=self.device)
        ended_length = torch.zeros((steps, n), dtype=torch.int64, device=self.device)
        ended_success = torch.zeros((steps, n), dtype=torch.bool, device=self.device)
        reports_success = False
        self.policy.eval()
        for s in range(steps):
            hist = self.history.get()
            images = observer.get() if observer else None
            sample, actions = self.act(hist, images)
            obs_buf[s], sample_buf[s] = hist, sample
            for c, x in (images or {}).items():
                image_buf[c][s] = x
            r = env.step_chunk(actions[:, :act_steps], record_obs=record_obs, **hook)
            done = r.done.to(self.device)
            terminated[s], truncated[s] = r.terminated.to(self.device), (r.truncated & ~r.terminated).to(self.device)
            if r.success is not None:
                stats.episode_success |= r.success.any(1).to(self.device)
            final_hist = self.history.push_chunk(r)
            final_images = observer.push_chunk(r) if observer else None
            if final_images is None and self.device.type != "cpu":  # on a GPU: every env's final value, kept
                # where the episode was cut, costs less than a host round trip to find those envs
                final_values[s] = torch.where(truncated[s], self.critic(self.policy.encode(final_hist.to(hist.dtype))),
                                              0.0)
            elif bool(truncated[s].any()):  # on a CPU, and a pixel policy's images: only where needed
                boot = torch.nonzero(truncated[s]).flatten()
                boot_images = {c: x[boot] for c, x in final_images.items()} if final_images else None
                final_values[s, boot] = self.critic(self.policy.encode(final_hist[boot].to(hist.dtype), boot_images))
            ended[s] = done
            ended_return[s] = r.episode_return.to(self.device)
            ended_length[s] = r.episode_length.to(self.device)
            if r.success is not None:
                reports_success = True
                ended_success[s] = stats.episode_success
                stats.episode_success &= ~done
            chunk_reward = r.rewards.sum(1).to(self.device)
            rewards[s] = (self.scaler(chunk_reward, done) if t.reward_scaling else chunk_reward).float()
        mask = ended.cpu()
        if bool(mask.any()):
            stats.returns.extend(ended_return.cpu()[mask].tolist())
            stats.lengths.extend(ended_length.cpu()[mask].tolist())
            if reports_success:
                stats.successes.extend(ended_success.cpu()[mask].float().tolist())
        obs_flat = obs_buf.flatten(0, 1)
        images_flat = {c: x.flatten(0, 1) for c, x in image_buf.items()} if observer else None
        values = self._values(obs_flat, images_flat).view(steps, n)
        next_value = self.critic(self.policy.encode(self.history.get(), observer.get() if observer else None))
        advantages, returns = compute_gae(rewards, values, next_value, terminated, truncated, final_values,
                                          t.gamma, t.gae_lambda)
        batch = {"obs": obs_flat, "sample": sample_buf.flatten(0, 1), "advantages": advantages.flatten(),
                 "returns": returns.flatten(), "values": values.flatten()}
        if images_flat is not None:
            batch.update({f"image:{c}": x for c, x in images_flat.items()})
        return batch

    def _values(self, obs: torch.Tensor, images: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """The critic's values of a rollout's decisions (a pixel policy's images encoded a slice at a time)."""
        if images is None:
            return self.critic(self.policy.encode(obs))
        size = self.local_minibatch
        return torch.cat([self.critic(self.policy.encode(obs[i:i + size], {c: x[i:i + size] for c, x in images.items()}))
                          for i in range(0, len(obs), size)])

    def _images(self, batch: dict[str, torch.Tensor], idx: torch.Tensor | slice) -> dict[str, torch.Tensor] | None:
        """A pixel policy's images of the batch's decisions ``idx`` (None for state-only policies)."""
        if self.observer is None:
            return None
        return {c: batch[f"image:{c}"][idx] for c in self.policy.cfg.cameras}

    # -- update --------------------------------------------------------------------------------
    def _minibatches(self, size: int) -> list[torch.Tensor]:
        mb = self.local_minibatch
        perm = torch.randperm(size, generator=self.gen, device=self.device)
        return [perm[i:i + mb] for i in range(0, size, mb)]

    STATS = ("pg", "value", "entropy", "kl", "clip", "ratio_dev")
    """The per-minibatch statistics of a PPO step, in the order of :meth:`_ppo_step`'s ``stats`` vector."""

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        t = self.cfg.train
        size = len(batch["advantages"])
        first_epoch = self._minibatches(size)
        self.policy.train()
        if self.policy.image_encoder is not None:  # no augmentation: old and new log-probabilities see the same
            self.policy.image_encoder.eval()       # features, so the first ratio stays exactly 1
        y, v = batch["returns"], batch["values"]
        explained_variance = self._rank_mean(float(1 - (y - v).var() / y.var().clamp_min(1e-8)))
        warmup = self._critic_warmup(explained_variance)
        actor_lr = self._ramp_actor_lr() if not warmup else 0.0
        if warmup:
            return {"train/value_loss": self._critic_only(batch, first_epoch), "train/epochs": t.update_epochs,
                    "train/explained_variance": explained_variance, "train/critic_warmup": 1.0,
                    "train/actor_lr_applied": actor_lr}
        graphed = self._use_graph(size)
        if self._ppo_graph is not None and not graphed and not self._said_eager:
            self._said_eager = True
            print(f"note: a rollout of {size} decisions is not a whole number of minibatches of "
                  f"{self.local_minibatch} (train.minibatch_size): the PPO steps run without CUDA graphs",
                  file=sys.stderr)
        data = self._graph_batch(batch) if graphed else dict(batch)
        with torch.no_grad():  # same minibatches as the first epoch: its first ratio is exactly 1
            old_logprob = data.setdefault("old_logprob", torch.zeros(size, device=self.device))
            for idx in first_epoch:
                old_logprob[idx] = self.log_prob_and_entropy(data["obs"][idx], data["sample"][idx],
                                                             self._images(data, idx))[0]
        # the statistics of each epoch are summed on the device and read back once: no host round trip inside
        # the loop (on several GPUs the gradient all-reduces then queue up behind the compute)
        sums = torch.zeros((t.update_epochs, len(self.STATS) + len(self.REGULARISERS)), device=self.device)
        counts = [0] * t.update_epochs
        first_ratio_dev = None
        signs: list[torch.Tensor] = []  # each epoch's sign of every decision's standardised advantage
        for epoch in range(t.update_epochs):
            batches = first_epoch if epoch == 0 else self._minibatches(size)
            if t.normalize_advantages and t.update_epochs > 1:
                signs.append(standardised_signs(data["advantages"], batches))
            inputs: list[dict[str, torch.Tensor]] = [{"idx": idx} for idx in batches]
            if t.normalize_advantages and self.dist.active:  # each minibatch's moments over every rank's share
                adv_mean, adv_var, _ = self.dist.group_moments([data["advantages"][idx] for idx in batches],
                                                               unbiased=True)
                for j, x in enumerate(inputs):
                    x.update(adv_mean=adv_mean[j], adv_std=adv_var[j].sqrt())
            for x in inputs:
                if graphed:
                    out = self._ppo_graph(x, [self.actor_opt, self.critic_opt])
                else:
                    self.actor_opt.zero_grad(set_to_none=True)
                    self.critic_opt.zero_grad(set_to_none=True)
                    out = self._ppo_step(data, x)
                self.actor_opt.step()
                self.critic_opt.step()
                sums[epoch] += out["stats"]
                counts[epoch] += 1
                if first_ratio_dev is None:
                    first_ratio_dev = out["stats"][self.STATS.index("ratio_dev")].clone()
            if t.target_kl:
                if self._rank_mean(float(sums[epoch, self.STATS.index("kl")]) / counts[epoch]) > t.target_kl:
                    break
        done = epoch + 1
        means = (sums[:done].sum(0) / sum(counts[:done])).tolist()
        stat = dict(zip(self.STATS + self.REGULARISERS, means))
        logs = {"train/value_loss": stat["value"], "train/explained_variance": explained_variance,
                "train/epochs": done, "train/critic_warmup": 0.0, "train/actor_lr_applied": actor_lr,
                "train/policy_gradient_loss": stat["pg"], "train/entropy_loss": stat["entropy"],
                "train/approx_kl": stat["kl"], "train/clip_fraction": stat["clip"],
                "train/first_ratio_deviation": float(first_ratio_dev)}
        logs.update(self._regulariser_logs({name: stat[name] for name in self.REGULARISERS}))
        if len(signs) > 1:  # standardised per minibatch, an advantage near its minibatch's mean changes sign
            logs["train/advantage_sign_flips"] = float(torch.stack(
                [(a != b).float().mean() for a, b in zip(signs, signs[1:])]).mean())
        return logs

    def _regulariser_logs(self, values: dict[str, float]) -> dict[str, float]:
        """The logs of :meth:`_regulariser`'s terms, their means over an update (by default all of them)."""
        return values

    def _critic_only(self, batch: dict[str, torch.Tensor], first_epoch: list[torch.Tensor]) -> float:
        """The critic warm-up's update: every epoch's minibatches train the value function alone."""
        losses = []
        for epoch in range(self.cfg.train.update_epochs):
            for idx in first_epoch if epoch == 0 else self._minibatches(len(batch["advantages"])):
                with torch.no_grad():
                    cond = self.policy.encode(batch["obs"][idx], self._images(batch, idx))
                value_loss = 0.5 * F.mse_loss(self.critic(cond), batch["returns"][idx])
                self.critic_opt.zero_grad(set_to_none=True)
                value_loss.backward()
                self.dist.average_gradients(self.critic.parameters())
                self._clip(self.critic.parameters())
                self.critic_opt.step()
                losses.append(value_loss.detach())
        return _device_mean(losses)

    def _ppo_step(self, data: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss, gradients (averaged over ranks) and clipping of one PPO minibatch ``inputs["idx"]`` of ``data``
        (the rollout with its old log-probabilities); returns the :attr:`STATS` vector. Without the
        advantage moments in ``inputs`` (one process) it takes those of the minibatch itself."""
        t = self.cfg.train
        idx = inputs["idx"]
        obs, sample, images = data["obs"][idx], data["sample"][idx], self._images(data, idx)
        cond = self.policy.encode(obs, images)
        value = self.critic(cond.detach())  # a pixel policy's image encoder learns from the policy loss only
        value_loss = 0.5 * F.mse_loss(value, data["returns"][idx])
        logprob, entropy = self._log_prob_and_entropy(cond, sample)
        log_ratio = logprob - data["old_logprob"][idx]
        ratio = log_ratio.exp()
        adv = data["advantages"][idx]
        if t.normalize_advantages:
            mean, std = ((inputs["adv_mean"], inputs["adv_std"]) if "adv_mean" in inputs
                         else (adv.mean(), adv.var().sqrt()))
            adv = (adv - mean) / (std + 1e-8)
        pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - t.clip_coef, 1 + t.clip_coef)).mean()
        entropy_loss = -entropy.mean()
        loss = pg_loss + t.ent_coef * entropy_loss + t.vf_coef * value_loss
        extra = self._regulariser(obs, images, cond, sample)
        regularisers = torch.zeros(len(self.REGULARISERS), device=loss.device)
        if extra is not None:
            loss = loss + extra[0]
            regularisers = extra[1]
        loss.backward()
        self.dist.average_gradients([*self.actor_params, *self.critic.parameters()])
        self._clip(self.actor_params)
        self._clip(self.critic.parameters())
        with torch.no_grad():
            ratio = ratio.detach()
            stats = torch.cat([torch.stack([pg_loss.detach(), value_loss.detach(), entropy_loss.detach(),
                                            ((ratio - 1) - log_ratio.detach()).mean(),
                                            ((ratio - 1).abs() > t.clip_coef).float().mean(), (ratio - 1).abs().max()]),
                               regularisers.detach()])
        return {"stats": stats}

    def _use_graph(self, size: int) -> bool:
        """Whether this update's PPO steps run as one CUDA graph each (``train.cuda_graph``): on a CUDA device,
        in one process, for state-only policies, when the rollout splits into whole minibatches."""
        return (self._ppo_graph is not None and size % self.local_minibatch == 0
                and (not self._rollout_buffers or len(self._rollout_buffers["advantages"]) == size))

    def _graph_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rollout copied into the buffers the captured PPO step reads (allocated at the first update)."""
        if not self._rollout_buffers:
            self._rollout_buffers.update({k: v.clone() for k, v in batch.items()})
            self._rollout_buffers["old_logprob"] = torch.zeros(len(batch["advantages"]), device=self.device)
        else:
            for k, v in batch.items():
                self._rollout_buffers[k].copy_(v)
        return self._rollout_buffers

    def _ramp_actor_lr(self) -> float:
        """Count the actor's iteration; during the ramp, set its learning rate to the schedule's times the
        ramp's fraction. Returns the learning rate this update applies."""
        ramp = self.cfg.train.actor_lr_ramp_iterations
        self.critic_warmup.actor_iterations += 1
        if ramp:
            lr = self._scheduled_lrs()[0] * min(1.0, self.critic_warmup.actor_iterations / ramp)
            for g in self.actor_opt.param_groups:
                g["lr"] = lr
        return float(self.actor_opt.param_groups[0]["lr"])

    def _critic_warmup(self, explained_variance: float) -> bool:
        """Whether this iteration trains the critic alone: the first ``critic_warmup_iterations``, then
        (with ``critic_warmup_ev``) until the critic's explained variance on a fresh rollout, before its
        update, reaches the threshold or ``critic_warmup_max_iterations`` pass; once over, never again."""
        t = self.cfg.train
        if self.iteration < t.critic_warmup_iterations:
            return True
        if t.critic_warmup_ev <= 0 or self.critic_warmup.ready:
            return False
        if explained_variance >= t.critic_warmup_ev or self.iteration >= t.critic_warmup_max_iterations:
            self.critic_warmup.ready = True
            if self.dist.is_main:
                print(f"critic warm-up over at iteration {self.iteration} (explained variance "
                      f"{explained_variance:.3f})", file=sys.stderr)
            return False
        return True

    def _rank_mean(self, value: float) -> float:
        return float(self.dist.mean({"v": value})["v"])  # type: ignore[arg-type]

    def _clip(self, params: Any) -> None:
        if self.cfg.train.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(list(params), self.cfg.train.max_grad_norm)

    def _scheduled_lrs(self) -> tuple[float, float]:
        """The cosine schedules' actor and critic learning rates at this iteration."""
        t, i, n = self.cfg.train, self.iteration, self.iterations
        return cosine(i, n, t.actor_lr, t.actor_lr_min), cosine(i, n, t.critic_lr, t.critic_lr_min)

    def _schedule(self) -> dict[str, float]:
        """Set this iteration's learning rates (a subclass adds its exploration's schedule); returns their logs."""
        actor_lr, critic_lr = self._scheduled_lrs()
        for g in self.actor_opt.param_groups:
            g["lr"] = actor_lr
        for g in self.critic_opt.param_groups:
            g["lr"] = critic_lr
        return {"train/learning_rate": actor_lr, "train/critic_learning_rate": critic_lr}

    # -- one iteration --------------------------------------------------------------------------
    def train_iteration(self, iteration: int) -> dict[str, float]:
        """Rollout of every env, then the PPO update (critic only during the warm-up iterations)."""
        start = time.time()
        self.iteration = iteration
        logs = self._schedule()
        with tf32_matmuls(self.cfg.train.tf32):
            batch = self.collect()
            rollout_s = time.time() - start
            self.stats.rollout_seconds.append(rollout_s)
            logs.update(self.update(batch))
        logs.update({"time/iteration_s": time.time() - start, "time/rollout_s": rollout_s,
                     **self._policy_diagnostics(batch),
                     "rollout/ep_rew_mean": mean_or_none(self.stats.returns),
                     "rollout/ep_len_mean": mean_or_none(self.stats.lengths),
                     "rollout/success_rate": mean_or_none(self.stats.successes)})
        return self.dist.mean(logs)

    @torch.no_grad()
    def _policy_diagnostics(self, batch: dict[str, torch.Tensor], sample_size: int = 1024) -> dict[str, float]:
        """On (up to ``sample_size`` of) the states this iteration visited: the mean exploration noise std
        (``train/noise_std``), and how far the deployed policy has moved (``train/action_drift``): the root
        mean square distance, in normalised action units, between its deterministic chunks and the pretrained
        policy's from the same standard noise (drawn from the run's seed, not the training generator, so
        logging it changes nothing of the run)."""
        rows = slice(0, min(len(batch["obs"]), sample_size))
        obs, images = batch["obs"][rows], self._images(batch, rows)
        cond = self.policy.encode(obs, images)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        x0 = torch.randn((len(obs), *self.policy.chunk_shape), generator=gen, device=self.device)
        drift = (self._deterministic_actions(self.policy, cond, x0)
                 - self._deterministic_actions(self.reference, self.reference.encode(obs, images), x0))
        noise_std, action_drift = torch.stack([self._exploration_std(cond), drift.square().mean().sqrt()]).tolist()
        return {"train/noise_std": noise_std, "train/action_drift": action_drift}

    def release_rollout_envs(self) -> None:
        """Release the rollout envs once learning is over (training cannot continue afterwards):
        robosuite's are worker processes of ~0.8 GB each that would sit idle beside the final
        evaluation's own."""
        self.close()

    def close(self) -> None:
        if self.observer is not None:
            self.observer.close()
        self.env.close()


__all__ = ["ChunkPPO", "ChunkPPOConfig", "Critic", "RunningRewardScaler", "compute_gae", "cosine"]
