"""PointReach: a tiny task in pure torch, made for fast tests of the learning algorithms.

A point in [-1, 1]^2 must reach a goal; the action moves it by ``0.1 * action`` per step; the
reward is minus the distance to the goal after the move; episodes are truncated after 30 steps.
The scripted demonstrator moves at 40% of full speed, so behaviour cloning learns a slow policy
and online RL has a clear margin to improve on (moving at full speed).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from flowrl.envs.base import BatchedEnv, env_device
from flowrl.envs.registry import Task, register

HORIZON = 30


class PointReachEnv(BatchedEnv):
    def __init__(self, num_envs: int, device: str | torch.device = "cpu", seed: int | None = None) -> None:
        self.task = "PointReach"
        self.num_envs = num_envs
        self.device = env_device(device)
        self.max_episode_steps = HORIZON
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float64)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._seed = seed
        self.gen = torch.Generator(device="cpu")
        self.pos = torch.zeros(num_envs, 2, dtype=torch.float64)
        self.goal = torch.zeros(num_envs, 2, dtype=torch.float64)

    def _obs(self) -> torch.Tensor:
        return torch.cat([self.pos, self.goal - self.pos], dim=1).to(self.device)

    def _reset_mask(self, mask: torch.Tensor) -> None:
        n = int(mask.sum())
        fresh = torch.rand((n, 4), generator=self.gen, dtype=torch.float64) * 2 - 1
        self.pos[mask], self.goal[mask] = fresh[:, :2], fresh[:, 2:]

    def reset(self, seed: int | None = None) -> torch.Tensor:
        seed = self._seed if seed is None else seed
        if seed is not None:
            self.gen.manual_seed(seed)
        self._reset_mask(torch.ones(self.num_envs, dtype=torch.bool))
        self._clear_counters()
        return self._obs()

    def _step(self, action: torch.Tensor, alive: torch.Tensor):
        a = torch.as_tensor(action).detach().cpu().double().clamp(-1.0, 1.0)
        self.pos = (self.pos + 0.1 * a).clamp(-1.5, 1.5)
        reward = -(self.goal - self.pos).norm(dim=1)
        return self._obs(), reward.to(self.device), torch.zeros(self.num_envs, dtype=torch.bool, device=self.device), {}

    def _reset_envs(self, done: torch.Tensor) -> torch.Tensor:
        self._reset_mask(done.cpu())
        return self._obs()

    def get_full_state(self) -> dict[str, torch.Tensor]:
        returns, elapsed = self._counters()
        return {"pos": self.pos.clone(), "goal": self.goal.clone(), "elapsed": elapsed.cpu().clone(),
                "returns": returns.cpu().clone(), "generator": self.gen.get_state()}

    def set_full_state(self, state: dict[str, torch.Tensor]) -> None:
        self.pos, self.goal = state["pos"].clone(), state["goal"].clone()
        returns, elapsed = self._counters()
        elapsed.copy_(state["elapsed"])
        returns.copy_(state["returns"])
        self.gen.set_state(state["generator"])


def scripted_action(obs: torch.Tensor, speed: float = 0.4) -> torch.Tensor:
    """The demonstrator: straight at the goal at ``speed`` of the maximum."""
    delta = obs[:, 2:4]
    return speed * delta / delta.norm(dim=1, keepdim=True).clamp_min(1e-6) * torch.clamp(
        delta.norm(dim=1, keepdim=True) / 0.1, max=1.0)


register(Task(name="PointReach", obs_layout=(("position", 2), ("goal - position", 2)), act_dim=2,
              max_episode_steps=HORIZON, backends=("torch",),
              envs={"torch": lambda task, n, device="cpu", seed=None, **kw: PointReachEnv(n, device, seed, **kw)},
              description="a point reaches a goal in [-1, 1]^2 (pure torch; fast tests of learning)"))
