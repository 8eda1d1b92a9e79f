"""Our batched envs seen as a gymnasium ``VectorEnv`` or a Stable-Baselines3 ``VecEnv``.

:class:`GymnasiumVectorEnv` offers gymnasium's two autoreset modes, named in
``metadata["autoreset_mode"]``:

- ``NEXT_STEP`` (the default, gymnasium's own default, which its stateful vector wrappers such as
  ``NormalizeObservation`` and ``NormalizeReward`` require): the step that ends an episode returns
  its true last observation with ``terminated``/``truncated``; the next ``step`` resets that env
  (its action is ignored) and returns the reset observation with reward 0 and
  terminated = truncated = False. It runs on the backend's per-step primitives
  (:meth:`BatchedEnv.step_or_reset`), so no env takes an extra physics step.
- ``SAME_STEP`` (opt-in, the backend's own mode): a finished env resets in the step that ends its
  episode; ``info["final_obs"]`` / ``info["_final_obs"]`` hold the last observation.

:func:`sb3_vec_env` keeps the same-step autoreset that SB3 expects, with ``terminal_observation`` and
``TimeLimit.truncated`` in each env's info dict, as SB3's own VecEnvs do.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from flowrl.envs.base import BatchedEnv
from flowrl.errors import FlowrlError

_SEED_SPAN = 2**31 - 1


def parse_autoreset_mode(mode: AutoresetMode | str) -> AutoresetMode:
    """``mode`` as an :class:`AutoresetMode` (the enum, its value such as ``"NextStep"`` or its name such
    as ``"next_step"``); only NEXT_STEP and SAME_STEP are offered."""
    if isinstance(mode, AutoresetMode):
        found: AutoresetMode | None = mode
    else:
        key = str(mode).replace("_", "").replace("-", "").lower()
        found = next((m for m in AutoresetMode if key in (m.value.lower(), m.name.replace("_", "").lower())), None)
    if found not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
        raise FlowrlError(f"autoreset_mode {mode!r} is not offered; use AutoresetMode.NEXT_STEP (the default) "
                          "or AutoresetMode.SAME_STEP")
    return found


def has_step_primitives(env: BatchedEnv) -> bool:
    """Whether ``env`` steps through :meth:`BatchedEnv._step` (so it can reset on the next step) rather
    than running whole chunks in its own workers (robosuite's backend)."""
    return type(env)._step is not BatchedEnv._step


def finite_box(space: gym.spaces.Box) -> gym.spaces.Box:
    """``space`` with its infinite bounds replaced by the dtype's largest finite values.

    The backends' observations are always finite (the MuJoCo backends replace a diverged state's
    non-finite values and count it in ``info["bad_state_count"]``), so this states the same set of
    values; gymnasium's ``check_env`` asks for finite bounds.
    """
    if not np.issubdtype(space.dtype, np.floating):
        return space
    big = np.finfo(space.dtype).max
    low = np.where(np.isneginf(space.low), -big, space.low).astype(space.dtype)
    high = np.where(np.isposinf(space.high), big, space.high).astype(space.dtype)
    return gym.spaces.Box(low, high, space.shape, space.dtype)


def numpy_obs(obs: torch.Tensor, space: gym.spaces.Box) -> np.ndarray:
    """A fresh numpy copy of ``obs`` in the dtype ``space`` declares (nothing returned shares memory
    with the backend's buffers)."""
    return np.array(obs.detach().cpu().numpy(), dtype=space.dtype)


def seed_for_reset(seed: int | None, first: bool, np_random: np.random.Generator, span: int = _SEED_SPAN
                   ) -> int | None:
    """The seed to reset a batched env with, gymnasium style: a given seed as is; None on the first
    reset without one (the batched env's own seed, or fresh entropy); later a seed drawn from
    ``np_random`` (seeded by the last ``reset(seed=s)``), so ``reset()`` continues deterministically
    after a seeded reset instead of repeating the same episode starts."""
    if seed is not None:
        return int(seed)
    if first:
        return None
    return int(np_random.integers(0, span))


class GymnasiumVectorEnv(gym.vector.VectorEnv):
    """A :class:`BatchedEnv` as a gymnasium ``VectorEnv`` (numpy in, numpy out).

    ``autoreset_mode``: :attr:`AutoresetMode.NEXT_STEP` (default) or :attr:`AutoresetMode.SAME_STEP`
    (see the module docstring). ``seed``: the seed of the first ``reset()`` given none (the seed the
    batched env was made with, when known); env i is seeded ``seed + i``. ``reset(seed=s)`` seeds
    env i with ``s + i``; a list of seeds must be ``[s, s + 1, ...]``.
    """

    def __init__(self, env: BatchedEnv, autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                 seed: int | None = None) -> None:
        mode = parse_autoreset_mode(autoreset_mode)
        if mode == AutoresetMode.NEXT_STEP and not has_step_primitives(env):
            raise FlowrlError(f"{env.task}: {type(env).__name__} steps whole chunks in its own workers, so it has "
                              "no NEXT_STEP autoreset; pass autoreset_mode=AutoresetMode.SAME_STEP (or a cpu/warp "
                              "backend)")
        self.env = env
        self.num_envs = env.num_envs
        self.single_observation_space = finite_box(env.single_observation_space)
        self.single_action_space = env.single_action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, env.num_envs)
        self.action_space = gym.vector.utils.batch_space(env.single_action_space, env.num_envs)
        self.metadata = {"autoreset_mode": mode, "render_modes": []}
        self.render_mode = None
        self._seed = seed
        self._first_reset = True
        self._reset_next = torch.zeros(env.num_envs, dtype=torch.bool, device=env.device)

    @property
    def autoreset_mode(self) -> AutoresetMode:
        """The autoreset mode (also in ``metadata["autoreset_mode"]``)."""
        return self.metadata["autoreset_mode"]

    def _obs(self, obs: torch.Tensor) -> np.ndarray:
        return numpy_obs(obs, self.observation_space)

    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every env (partial resets through ``options`` are not offered)."""
        if options:
            raise FlowrlError(f"{self.env.task}: reset options are not supported, got {sorted(options)}")
        if isinstance(seed, (list, tuple)):
            seed = self._consecutive(seed)
        if seed is None and self._first_reset:
            seed = self._seed
        super().reset(seed=seed)
        chosen = seed_for_reset(seed, self._first_reset, self.np_random, _SEED_SPAN - self.num_envs)
        obs = self.env.reset(seed=chosen)
        self._first_reset = False
        self._reset_next.zero_()
        return self._obs(obs), {}

    def _consecutive(self, seeds: list[int | None] | tuple[int | None, ...]) -> int | None:
        if len(seeds) != self.num_envs:
            raise FlowrlError(f"{self.env.task}: {len(seeds)} seeds for {self.num_envs} envs")
        if all(s is None for s in seeds):
            return None
        first = seeds[0]
        if first is None or list(seeds) != [int(first) + i for i in range(self.num_envs)]:
            raise FlowrlError(f"{self.env.task}: per-env seeds must be consecutive [s, s + 1, ...] (env i is seeded "
                              f"s + i); pass one int instead of {list(seeds)[:4]}...")
        return int(first)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """One step of every env, with the autoreset of ``metadata["autoreset_mode"]``."""
        action = torch.as_tensor(np.asarray(actions))
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            return self._step_next(action)
        return self._step_same(action)

    def _step_next(self, action: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        reset = self._reset_next
        obs, reward, terminated, truncated, info = self.env.step_or_reset(action, reset)
        self._reset_next = info["done_mask"].clone()
        out: dict[str, Any] = {}
        if "success" in info:
            out["success"] = info["success"].cpu().numpy()
            out["_success"] = (~reset).cpu().numpy()
        return (self._obs(obs), reward.cpu().numpy(), terminated.cpu().numpy(), truncated.cpu().numpy(), out)

    def _step_same(self, action: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = info["done_mask"].cpu().numpy()
        out: dict[str, Any] = {}
        if done.any():
            final = self._obs(info["final_obs"])
            out["final_obs"] = np.empty(self.num_envs, dtype=object)  # gymnasium's layout: None where not done
            for i in np.flatnonzero(done):
                out["final_obs"][i] = final[i]
            out["_final_obs"] = done
        if "success" in info:
            out["success"] = info["success"].cpu().numpy()
            out["_success"] = np.ones(self.num_envs, dtype=bool)
        return (self._obs(obs), reward.cpu().numpy(), terminated.cpu().numpy(), truncated.cpu().numpy(), out)

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
