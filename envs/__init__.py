"""Batched, torch-native environments.

``make(task, num_envs, backend=..., device=..., seed=...)`` is the one entry point; every backend
returns a :class:`BatchedEnv` with the same interface, so agents never depend on which one runs.
"""

from __future__ import annotations

from typing import Any

import torch

from flowrl.envs.base import BatchedEnv
from flowrl.envs.tasks import TASKS, TaskSpec, resolve_task
from flowrl.errors import FlowrlError

BACKENDS = ("cpu", "warp", "gymnasium")


def is_robosuite(task: str) -> bool:
    """Whether ``task`` names one of robosuite's tasks (``robosuite/<name>``, any case)."""
    return task.strip().lower().startswith("robosuite/")


def canonical_task(name: str) -> str:
    """The canonical name of any task ``make`` builds: ``hopper`` -> ``Hopper``,
    ``robosuite/lift`` -> ``robosuite/Lift``; an unknown name is a FlowrlError listing the known."""
    if is_robosuite(name):
        from flowrl.envs.robosuite_backend import robosuite_task

        return f"robosuite/{robosuite_task(name)}"
    return resolve_task(name).name


def make(
    task: str,
    num_envs: int = 1,
    backend: str = "gymnasium",
    device: str | torch.device = "cpu",
    seed: int | None = None,
    **kwargs: Any,
) -> BatchedEnv:
    """Build ``num_envs`` copies of ``task`` stepped together on ``backend``.

    Backends: ``cpu`` (mujoco.batch on a thread pool, float64), ``warp`` (MuJoCo Warp, float32, on the
    GPU or Warp's CPU device), ``gymnasium`` (gymnasium's own vector envs; ``vectorization="async"``
    for subprocesses), ``auto`` (warp on a CUDA device when installed, else cpu).
    ``seed`` seeds env i with ``seed + i`` at the first ``reset()``.
    """
    if num_envs < 1:
        raise FlowrlError(f"num_envs must be >= 1, got {num_envs}")
    if is_robosuite(task):
        from flowrl.envs.robosuite_backend import RobosuiteEnv

        return RobosuiteEnv(task, num_envs, device=device, seed=seed, **kwargs)
    spec = resolve_task(task)
    if spec.name == "PointReach":  # pure torch: one implementation whatever the backend
        from flowrl.envs.point_reach import PointReachEnv

        return PointReachEnv(num_envs, device=device, seed=seed)
    if backend == "auto":
        from flowrl.envs.mujoco_warp_backend import warp_available

        on_gpu = torch.device(device).type == "cuda" and torch.cuda.is_available()
        backend = "warp" if on_gpu and warp_available() and spec.name != "Humanoid" else "cpu"
    if backend == "warp":
        from flowrl.envs.locomotion import locomotion_task
        from flowrl.envs.mujoco_warp_backend import MujocoWarpEnv

        kwargs.pop("threads", None)
        return MujocoWarpEnv(locomotion_task(spec.name), num_envs, device=device, seed=seed, **kwargs)
    if backend == "cpu":
        from flowrl.envs.locomotion import locomotion_task
        from flowrl.envs.mujoco_batch_backend import MujocoBatchEnv

        return MujocoBatchEnv(locomotion_task(spec.name), num_envs, device=device, seed=seed, **kwargs)
    if backend == "gymnasium":
        if spec.name == "Humanoid-Newton":
            raise FlowrlError("Humanoid-Newton runs on the cpu and warp backends only (gymnasium's XML uses PGS)")
        from flowrl.envs.gymnasium_backend import GymnasiumEnv

        return GymnasiumEnv(spec.name, spec.gym_id, num_envs, device=device, seed=seed, **kwargs)
    raise FlowrlError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}, auto")


__all__ = ["BACKENDS", "BatchedEnv", "TASKS", "TaskSpec", "canonical_task", "is_robosuite", "make", "resolve_task"]
