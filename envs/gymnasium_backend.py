"""Backend over gymnasium's own vector envs: the reference for parity and the way to run any
registered gymnasium task. Numpy stays inside; the interface is torch."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from flowrl.envs.base import BatchedEnv


class GymnasiumEnv(BatchedEnv):
    """A gymnasium vector env (sync or async) in same-step autoreset mode, seen through torch."""

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
        self.device = torch.device(device)
        kwargs = dict(make_kwargs)
        if render:
            kwargs["render_mode"] = "rgb_array"
        self._env = gym.make_vec(
            gym_id,
            num_envs=num_envs,
            vectorization_mode=vectorization,
            vector_kwargs=dict(autoreset_mode=gym.vector.AutoresetMode.SAME_STEP),
            **kwargs,
        )
        self.single_observation_space = self._env.single_observation_space
        self.single_action_space = self._env.single_action_space
        self.max_episode_steps = int(gym.spec(gym_id).max_episode_steps or 0)
        self._seed = seed
        self._returns = np.zeros(num_envs)
        self._lengths = np.zeros(num_envs, dtype=np.int64)
        self._low = self.single_action_space.low
        self._high = self.single_action_space.high

    def _t(self, x: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=self.device)

    def reset(self, seed: int | None = None) -> torch.Tensor:
        seed = self._seed if seed is None else seed
        seeds = None if seed is None else [int(seed) + i for i in range(self.num_envs)]
        obs, _ = self._env.reset(seed=seeds)
        self._returns[:] = 0.0
        self._lengths[:] = 0
        return self._t(obs)

    def step(self, action: torch.Tensor):
        act = np.clip(action.detach().cpu().numpy().astype(self.single_action_space.dtype), self._low, self._high)
        obs, reward, terminated, truncated, info = self._env.step(act)
        done = np.logical_or(terminated, truncated)
        self._returns += reward
        self._lengths += 1
        out_info: dict[str, Any] = {
            "done_mask": self._t(done, torch.bool),
            "episode_return": self._t(self._returns.copy()),
            "episode_length": self._t(self._lengths.copy(), torch.int64),
        }
        final_obs = np.array(obs, dtype=np.float64, copy=True)
        if done.any():
            mask = info["_final_obs"]
            for i in np.flatnonzero(mask):
                final_obs[i] = info["final_obs"][i]
            if "final_info" in info and "success" in info["final_info"]:
                out_info["success"] = self._t(info["final_info"]["success"], torch.bool)
            self._returns[done] = 0.0
            self._lengths[done] = 0
        out_info["final_obs"] = self._t(final_obs)
        return (
            self._t(obs),
            self._t(reward),
            self._t(terminated, torch.bool),
            self._t(truncated, torch.bool),
            out_info,
        )

    def render(self, index: int = 0) -> np.ndarray:
        frames = self._env.render()
        return np.asarray(frames[index])

    def close(self) -> None:
        self._env.close()
