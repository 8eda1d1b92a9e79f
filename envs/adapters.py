"""Our batched envs seen as a gymnasium ``VectorEnv`` or a Stable-Baselines3 ``VecEnv``.

Both keep the backend's same-step autoreset: gymnasium's vector API gets
``autoreset_mode=SAME_STEP`` metadata with ``final_obs``/``_final_obs`` in ``info``; SB3 gets
``terminal_observation`` and ``TimeLimit.truncated`` in each env's info dict, as its own VecEnvs do.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from flowrl.envs.base import BatchedEnv


class GymnasiumVectorEnv(gym.vector.VectorEnv):
    """A :class:`BatchedEnv` as a gymnasium ``VectorEnv`` (numpy in, numpy out)."""

    def __init__(self, env: BatchedEnv) -> None:
        self.env = env
        self.num_envs = env.num_envs
        self.single_observation_space = env.single_observation_space
        self.single_action_space = env.single_action_space
        self.observation_space = gym.vector.utils.batch_space(env.single_observation_space, env.num_envs)
        self.action_space = gym.vector.utils.batch_space(env.single_action_space, env.num_envs)
        self.metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        if isinstance(seed, list):
            seed = seed[0]
        return self.env.reset(seed=seed).cpu().numpy(), {}

    def step(self, actions: np.ndarray):
        obs, reward, terminated, truncated, info = self.env.step(torch.as_tensor(actions))
        done = info["done_mask"].cpu().numpy()
        out_info: dict[str, Any] = {}
        if done.any():
            out_info["final_obs"] = np.array(list(info["final_obs"].cpu().numpy()), dtype=object)
            out_info["_final_obs"] = done
        return (obs.cpu().numpy(), reward.cpu().numpy(), terminated.cpu().numpy(), truncated.cpu().numpy(), out_info)

    def close_extras(self, **kwargs: Any) -> None:
        self.env.close()


def sb3_vec_env(env: BatchedEnv):
    """A :class:`BatchedEnv` as a Stable-Baselines3 ``VecEnv`` (imports SB3 lazily)."""
    from stable_baselines3.common.vec_env import VecEnv

    class SB3VecEnv(VecEnv):
        def __init__(self, inner: BatchedEnv) -> None:
            self.env = inner
            space = inner.single_observation_space
            obs_space = gym.spaces.Box(-np.inf, np.inf, space.shape, np.float32)
            super().__init__(inner.num_envs, obs_space, inner.single_action_space)
            self._actions: np.ndarray | None = None
            self._seed: int | None = None

        def reset(self) -> np.ndarray:
            obs = self.env.reset(seed=self._seed)
            self._seed = None
            return obs.cpu().numpy().astype(np.float32)

        def step_async(self, actions: np.ndarray) -> None:
            self._actions = actions

        def step_wait(self):
            obs, reward, terminated, truncated, info = self.env.step(torch.as_tensor(self._actions))
            done = info["done_mask"].cpu().numpy()
            final = info["final_obs"].cpu().numpy().astype(np.float32)
            trunc = (truncated & ~terminated).cpu().numpy()
            infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
            for i in np.flatnonzero(done):
                infos[i] = {"terminal_observation": final[i], "TimeLimit.truncated": bool(trunc[i]),
                            "episode": {"r": float(info["episode_return"][i]), "l": int(info["episode_length"][i]),
                                        "t": 0.0}}
            return obs.cpu().numpy().astype(np.float32), reward.cpu().numpy().astype(np.float32), done, infos

        def seed(self, seed: int | None = None):
            self._seed = seed
            return [None if seed is None else seed + i for i in range(self.num_envs)]

        def close(self) -> None:
            self.env.close()

        def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
            if attr_name == "render_mode":
                return [None] * self.num_envs
            return [getattr(self.env, attr_name)] * self.num_envs

        def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
            setattr(self.env, attr_name, value)

        def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
            return [getattr(self.env, method_name)(*args, **kwargs)]

        def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
            return [False] * self.num_envs

    return SB3VecEnv(env)
