"""A task defined in one file outside flowrl: a point on a line moves to the origin (pure torch).

Importing this module registers it; nothing in flowrl is edited to add it.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from flowrl.envs import BatchedEnv, Task, register


class ToyLineEnv(BatchedEnv):
    def __init__(self, num_envs: int, device: str | torch.device = "cpu", seed: int | None = None) -> None:
        self.task, self.num_envs, self.device = "ToyLine", num_envs, torch.device(device)
        self.max_episode_steps = 10
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.gen = torch.Generator().manual_seed(0 if seed is None else seed)
        self.x = torch.zeros(num_envs, 1, dtype=torch.float64)

    def reset(self, seed: int | None = None) -> torch.Tensor:
        if seed is not None:
            self.gen.manual_seed(seed)
        self.x = torch.rand((self.num_envs, 1), generator=self.gen, dtype=torch.float64) * 2 - 1
        self._clear_counters()
        return self.x.clone()

    def _step(self, action, alive):
        self.x = self.x + 0.2 * torch.as_tensor(action).double().clamp(-1, 1)
        return self.x.clone(), -self.x.abs().squeeze(1), torch.zeros(self.num_envs, dtype=torch.bool), {}

    def _reset_envs(self, done):
        fresh = torch.rand((self.num_envs, 1), generator=self.gen, dtype=torch.float64) * 2 - 1
        self.x = torch.where(done.unsqueeze(1), fresh, self.x)
        return self.x.clone()


register(Task(name="ToyLine", obs_layout=(("x", 1),), act_dim=1, max_episode_steps=10, backends=("torch",),
              envs={"torch": lambda task, n, device="cpu", seed=None, **kw: ToyLineEnv(n, device, seed)},
              description="a point on a line moves to the origin"))


def write_demonstrations(path: str, episodes: int = 32) -> None:
    """The demonstrator moves at half speed toward the origin."""
    from flowrl.datasets import Episodes, write_dataset

    env = ToyLineEnv(episodes, seed=0)
    obs = env.reset()
    steps: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "terminated", "truncated")}
    for t in range(10):
        action = (-0.5 * torch.sign(obs)).float()
        nxt, reward, term, trunc, _ = env.step(action)
        for k, v in zip(steps, (obs, action, reward, term, trunc)):
            steps[k].append(v.numpy())
        obs = nxt
    eps = [{k: np.stack(v)[:, i] for k, v in steps.items()} for i in range(episodes)]
    write_dataset(path, Episodes.from_list(eps, {"task": "ToyLine"}))
