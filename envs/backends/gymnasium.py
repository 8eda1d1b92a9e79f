"""Backend over gymnasium's own vector envs: the reference for parity and the way to run any
registered gymnasium task. Numpy stays inside; the interface is torch."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from flowrl.envs.base import BatchedEnv, env_device
from flowrl.envs.tasks.base import quiet_settotalmass


class GymnasiumEnv(BatchedEnv):
    """A gymnasium vector env (sync or async) without autoreset, seen through torch; finished envs
    are reset at the chunk boundary (``reset_mask``), as :class:`BatchedEnv` promises."""

    def __init__(
        self,
        task: str,
        gym_id: str,
        num_envs: int,
        device: str | torch.device = "cpu",
        seed: int | None = None,
        vectorization: str = "sync",
        render: bool = False,
        **make_kwargs: Any,
    ) -> None:
        self.task = task
        self.num_envs = num_envs
        self.device = env_device(device)
        kwargs = dict(make_kwargs)
        if render:
            kwargs["render_mode"] = "rgb_array"
        with quiet_settotalmass():  # gymnasium compiles its models here (in this process when sync)
            self._env = gym.make_vec(
                gym_id,
                num_envs=num_envs,
                vectorization_mode=vectorization,
                vector_kwargs=dict(autoreset_mode=gym.vector.AutoresetMode.DISABLED),
                **kwargs,
            )
        self.single_observation_space = self._env.single_observation_space
        self.single_action_space = self._env.single_action_space
        self.max_episode_steps = int(gym.spec(gym_id).max_episode_steps or 0)
        self._seed = seed
        self._low = self.single_action_space.low
        self._high = self.single_action_space.high

    def _t(self, x: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=self.device)

    def reset(self, seed: int | None = None) -> torch.Tensor:
        seed = self._seed if seed is None else seed
        seeds = None if seed is None else [int(seed) + i for i in range(self.num_envs)]
        obs, _ = self._env.reset(seed=seeds)
        self._clear_counters()
        return self._t(obs)

    def _step(self, action: torch.Tensor, alive: torch.Tensor):
        act = np.clip(action.detach().cpu().numpy().astype(self.single_action_space.dtype), self._low, self._high)
        obs, reward, terminated, _, info = self._env.step(act)  # truncation: BatchedEnv counts the horizon
        out: dict[str, Any] = {}
        if "success" in info:
            out["success"] = self._t(info["success"], torch.bool)
        return self._t(obs), self._t(reward), self._t(terminated, torch.bool), out

    def _reset_envs(self, done: torch.Tensor) -> torch.Tensor:
        obs, _ = self._env.reset(options={"reset_mask": done.cpu().numpy()})
        return self._t(obs)

    def render(self, index: int = 0) -> np.ndarray:
        frames = self._env.render()
        return np.asarray(frames[index])

    def close(self) -> None:
        self._env.close()
