"""PointReach: a tiny task in pure torch, made for fast tests of the learning algorithms.

A point in [-1, 1]^2 must reach a goal; the action moves it by ``0.1 * action`` per step; the
reward is minus the distance to the goal after the move; episodes are truncated after 30 steps.
The scripted demonstrator moves at 40% of full speed, so behaviour cloning learns a slow policy
and online RL has a clear margin to improve on (moving at full speed).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from flowrl.envs.base import BatchedEnv
from flowrl.envs.tasks import TaskSpec

SPEC = TaskSpec("PointReach", "", 4, 2, max_episode_steps=30)


class PointReachEnv(BatchedEnv):
    def __init__(self, num_envs: int, device: str | torch.device = "cpu", seed: int | None = None) -> None:
        self.task = SPEC.name
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.max_episode_steps = SPEC.max_episode_steps
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float64)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._seed = seed
        self.gen = torch.Generator(device="cpu")
        self.pos = torch.zeros(num_envs, 2, dtype=torch.float64)
        self.goal = torch.zeros(num_envs, 2, dtype=torch.float64)
        self.elapsed = torch.zeros(num_envs, dtype=torch.int64)
        self.returns = torch.zeros(num_envs, dtype=torch.float64)

    def _obs(self) -> torch.Tensor:
        return torch.cat([self.pos, self.goal - self.pos], dim=1).to(self.device)

    def _reset_mask(self, mask: torch.Tensor) -> None:
        n = int(mask.sum())
        fresh = torch.rand((n, 4), generator=self.gen, dtype=torch.float64) * 2 - 1
        self.pos[mask], self.goal[mask] = fresh[:, :2], fresh[:, 2:]
        self.elapsed[mask] = 0
        self.returns[mask] = 0.0

    def reset(self, seed: int | None = None) -> torch.Tensor:
        seed = self._seed if seed is None else seed
        if seed is not None:
            self.gen.manual_seed(seed)
        self._reset_mask(torch.ones(self.num_envs, dtype=torch.bool))
        return self._obs()

    def step(self, action: torch.Tensor):
        a = torch.as_tensor(action).detach().cpu().double().clamp(-1.0, 1.0)
        self.pos = (self.pos + 0.1 * a).clamp(-1.5, 1.5)
        reward = -(self.goal - self.pos).norm(dim=1)
        self.elapsed += 1
        self.returns += reward
        terminated = torch.zeros(self.num_envs, dtype=torch.bool)
        truncated = self.elapsed >= self.max_episode_steps
        final_obs = self._obs()
        info: dict[str, Any] = {"done_mask": truncated.to(self.device), "episode_return": self.returns.clone(),
                                "episode_length": self.elapsed.clone(), "final_obs": final_obs}
        if truncated.any():
            self._reset_mask(truncated)
        return self._obs(), reward.to(self.device), terminated.to(self.device), truncated.to(self.device), info

    def get_full_state(self) -> dict[str, torch.Tensor]:
        return {"pos": self.pos.clone(), "goal": self.goal.clone(), "elapsed": self.elapsed.clone(),
                "returns": self.returns.clone(), "generator": self.gen.get_state()}

    def set_full_state(self, state: dict[str, torch.Tensor]) -> None:
        self.pos, self.goal = state["pos"].clone(), state["goal"].clone()
        self.elapsed, self.returns = state["elapsed"].clone(), state["returns"].clone()
        self.gen.set_state(state["generator"])


def scripted_action(obs: torch.Tensor, speed: float = 0.4) -> torch.Tensor:
    """The demonstrator: straight at the goal at ``speed`` of the maximum."""
    delta = obs[:, 2:4]
    return speed * delta / delta.norm(dim=1, keepdim=True).clamp_min(1e-6) * torch.clamp(
        delta.norm(dim=1, keepdim=True) / 0.1, max=1.0)


def write_demonstrations(path: str, episodes: int = 64, seed: int = 0, noise: float = 0.05) -> None:
    """Scripted demonstrations of PointReach (slow, slightly noisy) in our dataset layout."""
    from flowrl.datasets import Episodes, write_dataset

    env = PointReachEnv(episodes, seed=seed)
    obs = env.reset()
    gen = torch.Generator().manual_seed(seed)
    keys = ("observations", "actions", "rewards", "terminated", "truncated")
    steps: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for _ in range(SPEC.max_episode_steps):
        action = (scripted_action(obs) + noise * torch.randn(obs.shape[0], 2, generator=gen, dtype=torch.float64))
        action = action.clamp(-1.0, 1.0).float()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for k, v in zip(keys, (obs, action, reward, terminated, truncated)):
            steps[k].append(v.numpy())
        obs = next_obs
    eps = [{k: np.stack(v)[:, i] for k, v in steps.items()} for i in range(episodes)]
    write_dataset(path, Episodes.from_list(eps, {"task": SPEC.name, "policy": {"kind": "scripted", "speed": 0.4,
                                                                              "noise": noise}}))
