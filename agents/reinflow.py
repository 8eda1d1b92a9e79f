"""ReinFlow: fine-tune a flow policy online with PPO over its noise-injected Euler chain.

A small noise head sigma(t, obs) adds Gaussian noise at every Euler step, so the K-step chain
``a_0 ~ N(0, I), a_{k+1} = a_k + v(t_k, a_k, obs) dt + sigma_k eps_k`` is a Markov chain with an
exact likelihood; PPO then trains the velocity field and the noise head together from online
rollouts, with a critic on observations. At deployment the noise head is dropped and the
deterministic flow is what runs, evaluates and is saved.

Choices worth knowing:
- Time grid ``t_k = k/K`` (the reference evaluated ``k/(K-1)``; a bug).
- Log-likelihood normalisation (``logprob_normalization``): by default the ratio uses the chain
  log-likelihood divided by its number of noisy elements, K * horizon * act_dim: a per-element
  geometric-mean ratio, whose scale does not grow with K or the chunk, so one clip range fits all
  tasks (the reference normalises the same way). The x0 term is left out of the ratio: it does
  not depend on the parameters and cancels exactly. ``sum`` gives the exact joint ratio.
- Old log-probabilities are evaluated on the same minibatches, in the same order, as the first
  epoch uses, so the ratio of the first minibatch of every update is exactly 1.
- A chunk's reward is the sum of the rewards of its executed steps; discounting is per decision.
  If an env finishes inside a chunk, its remaining actions run in the next episode and their
  rewards are credited to nobody.
- GAE bootstraps through truncations (value of ``info["final_obs"]``), never through terminations.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from flowrl.checkpoint import load_policy, save_checkpoint
from flowrl.config import FinetuneConfig, resolve_device, to_dict, validate_finetune
from flowrl.envs import canonical_task, is_robosuite, make
from flowrl.errors import FlowrlError, Interrupted
from flowrl.evaluation import Evaluator, ObsHistory
from flowrl.nets import SinusoidalEmbedding
from flowrl.policy import FlowPolicy
from flowrl.run import RunFolder, format_eval_table, stop_on_ctrl_c
from flowrl.sampler import chain_transitions, euler_sample, gaussian_log_prob, noisy_euler_chain

LOG_2PI_E_HALF = 0.5 * math.log(2 * math.pi * math.e)
RECENT = 100  # finished episodes behind the rollout/* means


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
    """Divides rewards by the running std of the discounted return (reset at episode ends)."""

    def __init__(self, num_envs: int, gamma: float, device: torch.device) -> None:
        self.gamma = gamma
        self.ret = torch.zeros(num_envs, dtype=torch.float64, device=device)
        self.count = torch.tensor(1e-4, dtype=torch.float64)
        self.mean = torch.tensor(0.0, dtype=torch.float64)
        self.var = torch.tensor(1.0, dtype=torch.float64)

    def __call__(self, reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        self.ret = self.ret * self.gamma + reward.double()
        x = self.ret.cpu()
        batch_mean, batch_var, n = x.mean(), x.var(unbiased=False), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean = self.mean + delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta.square() * self.count * n / total) / total
        self.count = total
        self.ret = torch.where(done, 0.0, self.ret)
        return reward / torch.sqrt(self.var + 1e-8).to(reward.device, reward.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ret": self.ret.clone(), "count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ret.copy_(state["ret"])
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]


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


def sigma_upper_bound(iteration: int, iterations: int, sigma_min: float, sigma_max: float, hold: float,
                      final_mix: float) -> float:
    """Held at sigma_max for ``hold`` of the iterations, then cosine-annealed to the final mix."""
    final = (1 - final_mix) * sigma_min + final_mix * sigma_max
    start = hold * iterations
    if iteration < start or iterations <= start:
        return sigma_max
    frac = min(1.0, (iteration - start) / max(1.0, iterations - 1 - start))
    return final + (sigma_max - final) * 0.5 * (1 + math.cos(math.pi * frac))


def cosine(iteration: int, iterations: int, start: float, end: float) -> float:
    frac = min(1.0, iteration / max(1, iterations - 1))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * frac))


class ReinFlow:
    """Fine-tune a pretrained flow policy online: ``ReinFlow(cfg, out).learn()``."""

    def __init__(self, cfg: FinetuneConfig, out: str | Path, resume: bool = False, progress: bool = True) -> None:
        validate_finetune(cfg)
        self.cfg = cfg
        t = cfg.train
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        policy, init_config = load_policy(cfg.init, self.device)
        if "task" not in init_config:
            raise FlowrlError(f"{cfg.init}/config.json: missing key 'task'")
        self.task = canonical_task(cfg.task or init_config["task"])
        self.init_info = {"path": str(cfg.init), "step": init_config.get("step"), "stage": init_config.get("stage")}
        self.K = t.num_steps or policy.cfg.num_steps
        policy.cfg.num_steps = self.K
        self.policy = policy.train()
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        torch.manual_seed(cfg.seed)
        cond_dim = policy.cfg.obs_history * policy.obs_dim
        self.noise = NoiseHead(cond_dim, policy.chunk_shape, t.noise_hidden_dim, policy.cfg.time_embed_dim,
                               t.sigma_min, t.sigma_max).to(self.device)
        self.critic = Critic(cond_dim, t.critic_hidden_dim, t.critic_depth).to(self.device)
        self.actor_opt = torch.optim.Adam([*self.policy.parameters(), *self.noise.parameters()], lr=t.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=t.critic_lr)
        self.steps_per_iteration = t.num_envs * t.rollout_steps * policy.cfg.act_steps
        self.iterations = max(1, math.ceil(t.env_steps / self.steps_per_iteration))
        env_kwargs: dict[str, Any] = {}
        if t.sim_threads and t.backend in ("auto", "cpu"):
            env_kwargs["threads"] = t.sim_threads
        if t.terminate_on_success:
            if not is_robosuite(self.task):
                raise FlowrlError(f"config: train.terminate_on_success: only robosuite tasks report success, "
                                  f"not {self.task}")
            env_kwargs["terminate_on_success"] = True
        self.env = make(self.task, t.num_envs, backend=t.backend, device=self.device, seed=cfg.seed, **env_kwargs)
        if (self.env.obs_dim, self.env.act_dim) != (policy.obs_dim, policy.act_dim):
            raise FlowrlError(f"{cfg.init}: policy has obs/act dims {policy.obs_dim}/{policy.act_dim} but task "
                              f"{self.task} has {self.env.obs_dim}/{self.env.act_dim}")
        self.evaluator = Evaluator.from_config(self.task, cfg.eval, self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.scaler = RunningRewardScaler(t.num_envs, t.gamma, self.device)
        self.history = ObsHistory(self.env.reset(), policy.cfg.obs_history)
        self.iteration = 0
        self.env_steps = 0
        self.best_return = -math.inf
        # the last 100 finished episodes (SB3's window for rollout/ep_rew_mean)
        self.recent_returns: deque[float] = deque(maxlen=RECENT)
        self.recent_lengths: deque[float] = deque(maxlen=RECENT)
        self.recent_successes: deque[float] = deque(maxlen=RECENT)  # tasks that report success (robosuite)
        self.episode_success = torch.zeros(t.num_envs, dtype=torch.bool, device=self.device)
        self.eval_history: list[dict[str, float]] = []  # learning curve: env steps, wall clock, return
        self.iteration_seconds: list[float] = []
        self.rollout_seconds: list[float] = []
        self.wall_clock = 0.0
        self.on_eval: Any = None  # called after each evaluation (benchmarks stream their curves)
        self.progress = progress
        self._stop_requested = False
        self.run = RunFolder(out)
        self.run.start(cfg, resume, resumable_keys=("train.env_steps", "train.max_minutes"))
        if resume:
            self._restore()

    # -- the noisy chain -----------------------------------------------------------------------
    def _chain_fns(self, cond: torch.Tensor, repeat: int = 1):
        cond = cond.repeat_interleave(repeat, dim=0) if repeat > 1 else cond
        return self.policy.velocity_fn(cond, self.K), lambda tt, x: self.noise(tt, cond)

    def log_prob_and_entropy(self, obs: torch.Tensor, chain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample chain log-likelihood (without the parameter-free x0 term) and noise entropy,
        both normalised as ``logprob_normalization`` says."""
        velocity, noise_std = self._chain_fns(self.policy.encode(obs), repeat=self.K)
        mean, std = chain_transitions(velocity, noise_std, chain, self.K)
        lp = gaussian_log_prob(chain[:, 1:], mean, std).flatten(1).sum(dim=1)
        entropy = (std.log() + LOG_2PI_E_HALF).flatten(1).sum(dim=1)
        if self.cfg.train.logprob_normalization == "mean":
            n = chain[:, 1:].flatten(1).shape[1]
            lp, entropy = lp / n, entropy / n
        return lp, entropy

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample chains for (N, H, obs_dim) observations: (chain, env-unit action chunk)."""
        velocity, noise_std = self._chain_fns(self.policy.encode(obs))
        x0 = torch.randn((obs.shape[0], *self.policy.chunk_shape), generator=self.gen, device=self.device)
        chain = noisy_euler_chain(velocity, noise_std, x0, self.K, self.gen)
        return chain, self.policy.unnormalize_action(chain[:, -1])

    # -- rollout -------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self) -> dict[str, torch.Tensor]:
        t, env = self.cfg.train, self.env
        n, steps, act_steps = t.num_envs, t.rollout_steps, self.policy.cfg.act_steps
        obs_buf = torch.zeros((steps, *self.history.get().shape), device=self.device, dtype=torch.float32)
        chain_buf = torch.zeros((steps, n, self.K + 1, *self.policy.chunk_shape), device=self.device)
        rewards = torch.zeros((steps, n), device=self.device)
        terminated = torch.zeros((steps, n), dtype=torch.bool, device=self.device)
        truncated = torch.zeros_like(terminated)
        final_values = torch.zeros((steps, n), device=self.device)
        self.policy.eval()
        for s in range(steps):
            hist = self.history.get()
            chain, actions = self.act(hist)
            obs_buf[s], chain_buf[s] = hist, chain
            alive = torch.ones(n, dtype=torch.bool, device=self.device)
            chunk_reward = torch.zeros(n, dtype=torch.float64, device=self.device)
            for obs, reward, term, trunc, info in env.step_chunk(actions[:, :act_steps]):
                chunk_reward += torch.where(alive, reward.double(), 0.0)
                done = info["done_mask"]
                if "success" in info:
                    self.episode_success |= info["success"].to(self.device)
                newly = done & alive
                if newly.any():
                    ended = torch.nonzero(newly).flatten()
                    terminated[s, ended] = term[ended]
                    truncated[s, ended] = trunc[ended] & ~term[ended]
                    boot = ended[truncated[s, ended]]
                    if len(boot):
                        final_hist = torch.cat([self.history.get()[boot, 1:],
                                                info["final_obs"][boot].unsqueeze(1).to(hist.dtype)], dim=1)
                        final_values[s, boot] = self.critic(self.policy.encode(final_hist))
                    self.recent_returns.extend(info["episode_return"][ended].tolist())
                    self.recent_lengths.extend(info["episode_length"][ended].tolist())
                    if "success" in info:
                        self.recent_successes.extend(self.episode_success[ended].float().tolist())
                self.episode_success &= ~done
                alive &= ~done
                self.history.push(obs, done)
            ended_chunk = terminated[s] | truncated[s]
            rewards[s] = (self.scaler(chunk_reward, ended_chunk) if t.reward_scaling else chunk_reward).float()
        self.env_steps += n * steps * act_steps
        features = self.policy.encode(obs_buf.flatten(0, 1))
        values = self.critic(features).view(steps, n)
        next_value = self.critic(self.policy.encode(self.history.get()))
        advantages, returns = compute_gae(rewards, values, next_value, terminated, truncated, final_values,
                                          t.gamma, t.gae_lambda)
        return {"obs": obs_buf.flatten(0, 1), "chain": chain_buf.flatten(0, 1), "advantages": advantages.flatten(),
                "returns": returns.flatten(), "values": values.flatten()}

    # -- update --------------------------------------------------------------------------------
    def _minibatches(self, size: int) -> list[torch.Tensor]:
        mb = self.cfg.train.minibatch_size
        perm = torch.randperm(size, generator=self.gen, device=self.device)
        return [perm[i:i + mb] for i in range(0, size, mb)]

    def _deterministic_actions(self, policy: FlowPolicy, obs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return euler_sample(policy.velocity_fn(policy.encode(obs), self.K), x0, self.K)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        t = self.cfg.train
        size = len(batch["advantages"])
        first_epoch = self._minibatches(size)
        self.policy.train()
        with torch.no_grad():  # same minibatches as the first epoch: its first ratio is exactly 1
            old_logprob = torch.zeros(size, device=self.device)
            for idx in first_epoch:
                old_logprob[idx] = self.log_prob_and_entropy(batch["obs"][idx], batch["chain"][idx])[0]
        warmup = self.iteration < t.critic_warmup_iterations
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "value", "entropy", "kl", "clip", "w2")}
        first_ratio_dev = None
        for epoch in range(t.update_epochs):
            batches = first_epoch if epoch == 0 else self._minibatches(size)
            for idx in batches:
                obs, chain = batch["obs"][idx], batch["chain"][idx]
                value = self.critic(self.policy.encode(obs))
                value_loss = 0.5 * F.mse_loss(value, batch["returns"][idx])
                if warmup:
                    self.critic_opt.zero_grad(set_to_none=True)
                    value_loss.backward()
                    self._clip(self.critic.parameters())
                    self.critic_opt.step()
                    stats["value"].append(value_loss.item())
                    continue
                logprob, entropy = self.log_prob_and_entropy(obs, chain)
                log_ratio = logprob - old_logprob[idx]
                ratio = log_ratio.exp()
                if first_ratio_dev is None:
                    first_ratio_dev = float((ratio.detach() - 1).abs().max())
                adv = batch["advantages"][idx]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - t.clip_coef, 1 + t.clip_coef)).mean()
                entropy_loss = -entropy.mean()
                loss = pg_loss + t.ent_coef * entropy_loss + t.vf_coef * value_loss
                if t.w2_coef > 0:
                    x0 = chain[:, 0]
                    w2 = (self._deterministic_actions(self.policy, obs, x0)
                          - self._deterministic_actions(self.reference, obs, x0)).square().mean()
                    loss = loss + t.w2_coef * w2
                    stats["w2"].append(w2.item())
                self.actor_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                self._clip([*self.policy.parameters(), *self.noise.parameters()])
                self._clip(self.critic.parameters())
                self.actor_opt.step()
                self.critic_opt.step()
                with torch.no_grad():
                    stats["kl"].append(float(((ratio - 1) - log_ratio).mean()))
                    stats["clip"].append(float(((ratio - 1).abs() > t.clip_coef).float().mean()))
                stats["pg"].append(pg_loss.item())
                stats["value"].append(value_loss.item())
                stats["entropy"].append(entropy_loss.item())
            if t.target_kl and stats["kl"] and np.mean(stats["kl"][-len(batches):]) > t.target_kl:
                break
        y, v = batch["returns"], batch["values"]
        logs = {"train/value_loss": float(np.mean(stats["value"])),
                "train/explained_variance": float(1 - (y - v).var() / y.var().clamp_min(1e-8)),
                "train/epochs": epoch + 1}
        if stats["pg"]:
            logs.update({"train/policy_gradient_loss": float(np.mean(stats["pg"])),
                         "train/entropy_loss": float(np.mean(stats["entropy"])),
                         "train/approx_kl": float(np.mean(stats["kl"])),
                         "train/clip_fraction": float(np.mean(stats["clip"])),
                         "train/first_ratio_deviation": first_ratio_dev})
        if stats["w2"]:
            logs["train/w2_loss"] = float(np.mean(stats["w2"]))
        return logs

    def _clip(self, params: Any) -> None:
        if self.cfg.train.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(list(params), self.cfg.train.max_grad_norm)

    def _schedule(self) -> dict[str, float]:
        t, i, n = self.cfg.train, self.iteration, self.iterations
        upper = sigma_upper_bound(i, n, t.sigma_min, t.sigma_max, t.sigma_hold, t.sigma_final_mix)
        self.noise.set_bounds(t.sigma_min, upper)
        actor_lr, critic_lr = cosine(i, n, t.actor_lr, t.actor_lr_min), cosine(i, n, t.critic_lr, t.critic_lr_min)
        for g in self.actor_opt.param_groups:
            g["lr"] = actor_lr
        for g in self.critic_opt.param_groups:
            g["lr"] = critic_lr
        return {"train/learning_rate": actor_lr, "train/critic_learning_rate": critic_lr, "train/noise_std_max": upper}

    # -- checkpoints ---------------------------------------------------------------------------
    def _info(self) -> dict[str, Any]:
        return {"task": self.task, "stage": "finetune", "algorithm": "reinflow", "step": self.env_steps,
                "iteration": self.iteration, "init": self.init_info, "run_config": to_dict(self.cfg)}

    def save(self, folder: str | Path | None = None) -> Path:
        """The deterministic policy (model.safetensors, loadable like any pretrained one) and
        everything needed to resume exactly."""
        env_state = self.env.get_full_state() if hasattr(self.env, "get_full_state") else None
        state = {"iteration": self.iteration, "env_steps": self.env_steps, "noise": self.noise.state_dict(),
                 "critic": self.critic.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                 "critic_opt": self.critic_opt.state_dict(), "scaler": self.scaler.state_dict(),
                 "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "history": self.history.get().clone(), "best_return": self.best_return,
                 "recent_returns": list(self.recent_returns), "recent_lengths": list(self.recent_lengths),
                 "eval_history": list(self.eval_history), "iteration_seconds": list(self.iteration_seconds),
                 "rollout_seconds": list(self.rollout_seconds), "recent_successes": list(self.recent_successes),
                 "episode_success": self.episode_success.clone(), "wall_clock": self.wall_clock}
        if env_state is not None:
            state["env"] = env_state
        return save_checkpoint(folder or self.run.checkpoint_dir(self.env_steps), self.policy, self._info(), state)

    def _restore(self) -> None:
        state, policy = self.run.load_latest(self.device)
        self.policy.load_state_dict(policy.state_dict())
        self.noise.load_state_dict(state["noise"])
        self.critic.load_state_dict(state["critic"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history.buffer = state["history"].to(self.device)
        self.iteration, self.env_steps = int(state["iteration"]), int(state["env_steps"])
        self.best_return = float(state["best_return"])
        self.recent_returns = deque(state["recent_returns"], maxlen=RECENT)
        self.recent_lengths = deque(state["recent_lengths"], maxlen=RECENT)
        self.eval_history, self.iteration_seconds = list(state["eval_history"]), list(state["iteration_seconds"])
        self.rollout_seconds = list(state["rollout_seconds"])
        self.recent_successes = deque(state.get("recent_successes", []), maxlen=RECENT)
        if "episode_success" in state:
            self.episode_success = state["episode_success"].to(self.device)
        self.wall_clock = float(state["wall_clock"])
        if "env" in state and hasattr(self.env, "set_full_state"):
            self.env.set_full_state(state["env"])
        else:
            print(f"warning: the {self.cfg.train.backend} backend cannot restore its simulation state; the envs "
                  "start new episodes, so this run will not match an uninterrupted one exactly", file=sys.stderr)
        print(f"resumed {self.run.path} at iteration {self.iteration} ({self.env_steps} env steps)", file=sys.stderr)

    # -- main loop -----------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self._stop_requested = True

    def evaluate(self, episodes: int, num_steps: int | None = None) -> dict[str, float]:
        """The deterministic policy (noise head dropped) on seeded episodes; the evaluation envs are
        kept for the next call (closed by :meth:`close`)."""
        self.policy.eval()
        return self.evaluator(self.policy, num_steps or self.K, episodes)

    def close_rollout_envs(self) -> None:
        """Release the rollout envs once learning is over (``learn`` cannot continue afterwards).

        robosuite's are worker processes of ~0.8 GB each that would otherwise sit idle beside the
        final evaluation's own (16 + 20 of them ran a 24 GB machine out of memory).
        """
        self.env.close()

    def close(self) -> None:
        """Release the rollout and evaluation envs (robosuite's are worker processes)."""
        self.close_rollout_envs()
        self.evaluator.close()

    def learn(self) -> FlowPolicy:
        """Run fine-tuning to the env-step budget (or ``train.max_minutes``); Ctrl-C stops after the
        current iteration with a checkpoint saved."""
        limit_s = 60.0 * self.cfg.train.max_minutes
        deadline = time.time() + limit_s if limit_s else math.inf
        writer = self.run.writer(purge_step=self.env_steps if self.env_steps else None)
        bar = tqdm(total=self.iterations * self.steps_per_iteration, initial=self.env_steps, unit="step",
                   desc=f"reinflow {self.task}", disable=not self.progress, dynamic_ncols=True, unit_scale=True)
        self._stop_requested = False
        try:
            with stop_on_ctrl_c(self.request_stop):
                if self.iteration == 0 and self.env_steps == 0:
                    self._record_eval(writer, bar)
                while self.iteration < self.iterations:
                    if self._stop_requested:
                        raise KeyboardInterrupt
                    out_of_time = self._iterate(writer, bar, deadline)
                    if out_of_time and self.iteration < self.iterations:
                        bar.write(f"stopped at the time limit (train.max_minutes={self.cfg.train.max_minutes:g}) "
                                  f"after iteration {self.iteration} of {self.iterations}, {self.env_steps} env "
                                  f"steps; continue with --resume --out {self.run.path}")
                        break
        except KeyboardInterrupt:
            self.save()
            bar.close()
            self.run.close()
            raise Interrupted(f"interrupted at iteration {self.iteration}; checkpoint saved, continue with "
                              f"--resume --out {self.run.path}") from None
        bar.close()
        writer.flush()
        return self.policy

    def _iterate(self, writer: Any, bar: Any, deadline: float = math.inf) -> bool:
        """One iteration: rollout, PPO update, logs, and the periodic evaluation and checkpoint, which
        also come after the last iteration and after one that ends past ``deadline`` (then: True)."""
        t = self.cfg.train
        start = time.time()
        logs = self._schedule()
        batch = self.collect()
        rollout_s = time.time() - start
        logs.update(self.update(batch))
        self.iteration += 1
        elapsed = time.time() - start
        self.wall_clock += elapsed
        self.iteration_seconds.append(elapsed)
        self.rollout_seconds.append(rollout_s)
        logs.update({"time/fps": self.steps_per_iteration / elapsed, "time/iteration_s": elapsed,
                     "time/rollout_s": rollout_s, "train/noise_std": self._mean_noise_std(batch["obs"])})
        if self.recent_returns:
            logs["rollout/ep_rew_mean"] = float(np.mean(self.recent_returns))
            logs["rollout/ep_len_mean"] = float(np.mean(self.recent_lengths))
        if self.recent_successes:
            logs["rollout/success_rate"] = float(np.mean(self.recent_successes))
        for k, v in logs.items():
            if v is not None:
                writer.add_scalar(k, v, self.env_steps)
        bar.update(self.steps_per_iteration)
        bar.set_postfix(ep_rew=f"{logs.get('rollout/ep_rew_mean', float('nan')):.1f}", it_s=f"{elapsed:.2f}")
        out_of_time = time.time() >= deadline
        last = self.iteration == self.iterations or out_of_time
        if self.iteration % t.eval_every == 0 or last:
            self._record_eval(writer, bar)
        if self.iteration % t.checkpoint_every == 0 or last:
            self.save()
        return out_of_time

    @torch.no_grad()
    def _mean_noise_std(self, obs: torch.Tensor) -> float:
        sample = obs[: min(len(obs), 1024)]
        cond = self.policy.encode(sample)
        stds = [self.noise(torch.full((len(sample),), k / self.K, device=self.device), cond).mean()
                for k in range(self.K)]
        return float(torch.stack(stds).mean())

    def _record_eval(self, writer: Any, bar: Any) -> None:
        r = self.evaluate(self.cfg.train.eval_episodes)
        writer.add_scalar("eval/mean_reward", r["return_mean"], self.env_steps)
        writer.add_scalar("eval/mean_ep_length", r["length_mean"], self.env_steps)
        if "success_rate" in r:
            writer.add_scalar("eval/success_rate", r["success_rate"], self.env_steps)
        bar.write(f"iteration {self.iteration} ({self.env_steps} env steps): eval return "
                  f"{r['return_mean']:.1f} ± {r['return_std']:.1f}")
        self.eval_history.append({"iteration": self.iteration, "env_steps": self.env_steps,
                                  "wall_clock_s": round(self.wall_clock, 2), "return_mean": r["return_mean"],
                                  "return_std": r["return_std"], **({"success_rate": r["success_rate"]}
                                                                    if "success_rate" in r else {})})
        if self.on_eval is not None:
            self.on_eval()
        if r["return_mean"] > self.best_return and self.iteration > 0:
            self.best_return = r["return_mean"]
            save_checkpoint(self.run.checkpoints / "best", self.policy, {**self._info(), "eval": r})

    def final_evaluation(self) -> list[dict[str, float]]:
        """The end of a run: the eval preset's episodes at each of its K, written to eval.json
        (the rollout envs are released first)."""
        self.close_rollout_envs()
        e = self.cfg.eval
        rows = [self.evaluate(e.episodes, k) for k in e.steps]
        checkpoint = self.run.checkpoint_dir(self.env_steps)
        self.run.write_eval({"checkpoint": str(checkpoint), "task": self.task, "step": self.env_steps,
                             "init": self.init_info, "results": rows})
        print(format_eval_table(rows, f"evaluation of {checkpoint} on {self.task}, {e.episodes} episodes per K"))
        return rows


__all__ = ["Critic", "NoiseHead", "ReinFlow", "RunningRewardScaler", "compute_gae", "sigma_upper_bound"]
