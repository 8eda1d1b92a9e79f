"""Every flowrl task registered with gymnasium, under the ``flowrl/`` namespace.

Importing :mod:`flowrl.envs` calls :func:`register_gym_envs`, after which

- ``gym.make("flowrl/Hopper-v5", backend=..., device=..., seed=...)`` gives one env
  (:class:`FlowrlEnv`, a ``gymnasium.Env`` over a one-env :class:`BatchedEnv`, numpy in and out), with
  gymnasium's usual wrappers (``TimeLimit`` at the task's horizon, ``OrderEnforcing``,
  ``PassiveEnvChecker``);
- ``gym.make_vec("flowrl/Hopper-v5", num_envs=4096, vectorization_mode="vector_entry_point",
  backend="warp", device="cuda")`` gives the batched env itself as a gymnasium ``VectorEnv``
  (:class:`flowrl.envs.adapters.GymnasiumVectorEnv`, NEXT_STEP autoreset unless
  ``autoreset_mode=AutoresetMode.SAME_STEP``). ``vectorization_mode`` defaults to the vector entry
  point; ``"sync"``/``"async"`` build one :class:`FlowrlEnv` per env instead.

Every other keyword (``backend``, ``device``, ``seed``, ``terminate_on_success``, ...) goes to
:func:`flowrl.envs.make`.

The ids: ``flowrl/<name>-v<version>``, ``<name>`` the task's name without its family prefix
(``robosuite/Lift`` -> ``Lift``; the full name with ``-`` for ``/`` where two tasks would share
one), ``<version>`` the version of the gymnasium env the task reproduces (``Hopper`` ->
``Hopper-v5``, ``Humanoid-Newton`` -> ``Humanoid-Newton-v5``: both from ``Task.gym_id``) and
``v0`` for tasks of flowrl's own (robosuite's tasks, ``PointReach``).

This module does not import :mod:`flowrl.envs` (which imports it): the package hands it its
``make`` when it registers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from flowrl.envs.adapters import GymnasiumVectorEnv, finite_box, has_step_primitives, numpy_obs, seed_for_reset
from flowrl.envs.base import BatchedEnv
from flowrl.envs.registry import Task, all_tasks, on_register, registered_tasks, resolve_task
from flowrl.errors import FlowrlError

NAMESPACE = "flowrl"
ENTRY_POINT = "flowrl.envs.gym_registration:FlowrlEnv"
VECTOR_ENTRY_POINT = "flowrl.envs.gym_registration:make_vector_env"
_NO_HORIZON = 2**62
"""The one-env batched env's own horizon under :class:`FlowrlEnv`: gymnasium's ``TimeLimit`` owns it."""

_make: Callable[..., BatchedEnv] | None = None
""":func:`flowrl.envs.make`, handed over by :func:`register_gym_envs`."""


def gym_env_id(info: Task, taken: Iterable[str] = ()) -> str:
    """The gymnasium id of a task (see the module docstring); ``taken``: ids other tasks already hold."""
    match = re.search(r"-v(\d+)$", info.gym_id)
    version = match.group(1) if match else "0"
    short = f"{NAMESPACE}/{info.name.rsplit('/', 1)[-1]}-v{version}"
    return short if short not in set(taken) else f"{NAMESPACE}/{info.name.replace('/', '-')}-v{version}"


def _build(task: str, num_envs: int, **kwargs: Any) -> BatchedEnv:
    if _make is None:
        raise FlowrlError("flowrl's gymnasium entry points are used before flowrl.envs registered them; "
                          "import flowrl.envs first")
    try:
        return _make(task, num_envs, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise FlowrlError(f"{task}: {e} (keywords go to flowrl.envs.make and the backend it builds)") from None


class FlowrlEnv(gym.Env):
    """One flowrl env as a ``gymnasium.Env``: numpy in and out, the observation in the dtype of
    ``observation_space`` (float64 on the cpu backend), actions float32 in ``action_space``.

    As gymnasium's own MuJoCo env classes, it has no time limit of its own: ``gym.make`` adds
    ``TimeLimit`` at the task's horizon (``max_episode_steps=`` changes it). Backends that step whole
    chunks in worker processes (robosuite's) keep their horizon, the same one. Seeding is
    gymnasium's: ``reset(seed=s)`` reseeds, ``reset()`` continues from the last seed; the ``seed``
    keyword seeds the first ``reset()``. Keywords go to :func:`flowrl.envs.make`. It does not render
    (``render_modes`` is empty; ``flowrl eval --video`` renders).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, task: str, backend: str = "auto", device: str | torch.device = "cpu",
                 seed: int | None = None, render_mode: str | None = None, **kwargs: Any) -> None:
        if render_mode is not None:
            raise FlowrlError(f"{task}: flowrl's gymnasium envs do not render (render_mode={render_mode!r}); "
                              "flowrl eval --video renders a policy's episodes")
        self.task = resolve_task(task).name
        self.env = _build(self.task, 1, backend=backend, device=device, seed=seed, **kwargs)
        self.observation_space = finite_box(self.env.single_observation_space)
        self.action_space = self.env.single_action_space
        self.render_mode = None
        self._seed = seed
        self._first_reset = True
        self._primitives = has_step_primitives(self.env)
        if self._primitives:
            self.env.max_episode_steps = _NO_HORIZON
        self._no_reset = torch.zeros(1, dtype=torch.bool, device=self.env.device)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode; ``seed`` reseeds (see the class docstring). No ``options`` are offered."""
        if options:
            raise FlowrlError(f"{self.task}: reset options are not supported, got {sorted(options)}")
        if seed is None and self._first_reset:
            seed = self._seed
        super().reset(seed=seed)
        obs = self.env.reset(seed=seed_for_reset(seed, self._first_reset, self.np_random))
        self._first_reset = False
        return numpy_obs(obs[0], self.observation_space), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """One step: observation, reward, terminated, truncated, info (``success`` where the task has one)."""
        act = np.asarray(action)
        if act.shape != self.action_space.shape:
            raise FlowrlError(f"{self.task}: action of shape {act.shape}, expected {self.action_space.shape}")
        batch = torch.as_tensor(act).unsqueeze(0)
        if self._primitives:
            obs, reward, terminated, truncated, info = self.env.step_or_reset(batch, self._no_reset)
        else:  # robosuite's workers: they reset a finished env at once; its last observation is final_obs
            obs, reward, terminated, truncated, info = self.env.step(batch)
            obs = info["final_obs"]
        out: dict[str, Any] = {}
        if "success" in info:
            out["success"] = bool(info["success"][0])
        return (numpy_obs(obs[0], self.observation_space), float(reward[0]), bool(terminated[0]),
                bool(truncated[0]), out)

    def close(self) -> None:
        """Close the batched env (again is fine)."""
        self.env.close()


def make_vector_env(task: str, num_envs: int = 1, max_episode_steps: int | None = None,
                    autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, backend: str = "auto",
                    device: str | torch.device = "cpu", seed: int | None = None, render_mode: str | None = None,
                    **kwargs: Any) -> GymnasiumVectorEnv:
    """``gym.make_vec``'s vector entry point: ``num_envs`` envs of ``task`` as one batched env seen as a
    gymnasium ``VectorEnv``. ``max_episode_steps`` (gymnasium passes the spec's, the task's horizon)
    sets the batched env's horizon."""
    if render_mode is not None:
        raise FlowrlError(f"{task}: flowrl's gymnasium envs do not render (render_mode={render_mode!r})")
    if num_envs < 1:
        raise FlowrlError(f"num_envs must be >= 1, got {num_envs}")
    env = _build(task, num_envs, backend=backend, device=device, seed=seed, **kwargs)
    try:
        if max_episode_steps is not None and max_episode_steps != env.max_episode_steps:
            if max_episode_steps < 1:
                raise FlowrlError(f"{task}: max_episode_steps must be >= 1, got {max_episode_steps}")
            if not has_step_primitives(env):
                raise FlowrlError(f"{task}: {type(env).__name__} fixes its horizon ({env.max_episode_steps}) when "
                                  "it starts its workers; max_episode_steps cannot change it")
            env.max_episode_steps = int(max_episode_steps)
        return GymnasiumVectorEnv(env, autoreset_mode=autoreset_mode, seed=seed)
    except FlowrlError:
        env.close()
        raise


def register_gym_envs(make: Callable[..., BatchedEnv] | None = None, include_plugins: bool = False) -> list[str]:
    """Register every task of flowrl's registry with gymnasium; returns the ids registered now.

    ``make``: :func:`flowrl.envs.make` (the package passes it on import). Ids gymnasium already holds
    are left as they are, so calling this again (a re-import, or after registering more tasks) is
    safe; tasks registered afterwards get their ids when they are registered. ``include_plugins``: also load the ``flowrl.plugins`` entry points first (import time does
    not, so a broken plugin cannot break ``import flowrl.envs``); call it that way to give plugin tasks
    their ids.
    """
    global _make
    if make is not None:
        _make = make
    tasks = all_tasks() if include_plugins else registered_tasks()
    taken: list[str] = []
    added: list[str] = []
    for info in tasks.values():
        env_id = gym_env_id(info, taken)
        taken.append(env_id)
        if env_id in gym.registry:
            continue
        gym.register(env_id, entry_point=ENTRY_POINT, vector_entry_point=VECTOR_ENTRY_POINT,
                     max_episode_steps=info.max_episode_steps, kwargs={"task": info.name})
        added.append(env_id)
    global _following
    if not _following:  # tasks registered later (plugins, a user's own) get their ids as they come
        on_register(lambda info: register_gym_envs())
        _following = True
    return added


_following = False


def gym_env_ids() -> dict[str, str]:
    """Every registered flowrl task's gymnasium id, by task name."""
    taken: list[str] = []
    for info in all_tasks().values():
        taken.append(gym_env_id(info, taken))
    return dict(zip(all_tasks(), taken))
