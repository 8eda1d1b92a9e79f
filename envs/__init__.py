"""Batched, torch-native environments.

``make(task, num_envs, backend=..., device=..., seed=...)`` is the one entry point; every backend
returns a :class:`BatchedEnv` with the same interface, so agents never depend on which one runs.
A task is one object (:class:`Task`; :class:`MujocoTask` for the cpu and warp backends) in one registry
(:mod:`flowrl.envs.registry`); the backends in :mod:`flowrl.envs.backends` run them.
"""

from __future__ import annotations

from typing import Any

import torch

from flowrl.envs.base import BatchedEnv, ChunkResult
from flowrl.envs.registry import BACKENDS, Task, all_tasks, canonical_task, register, resolve_task
from flowrl.envs.tasks.base import MujocoTask
from flowrl.errors import FlowrlError


def is_robosuite(task: str) -> bool:
    """Whether ``task`` is one of robosuite's tasks (run by robosuite's own worker processes)."""
    return resolve_task(task).family == "robosuite"


def warp_available() -> bool:
    """Whether MuJoCo Warp and Warp are installed (the ``warp`` extra)."""
    from flowrl.envs.backends.warp import warp_available as available

    return available()


BATCHED_RENDERING_BACKENDS = ("cpu", "warp")
"""The batched backends that render camera images (flowrl.envs.cameras), which ``auto`` picks for a pixel
policy; robosuite's workers render too when made with ``render=True``, one env per process."""


def resolve_backend(task: str, backend: str, device: str | torch.device, images: bool = False) -> str:
    """The backend ``make`` would use: ``auto`` becomes warp on a CUDA device when installed and the
    task runs there, else the task's first other backend (cpu for MuJoCo tasks); with ``images`` (a
    pixel policy's envs) ``auto`` picks one of the backends that render camera images."""
    info = resolve_task(task)
    if backend == "auto":
        dev = torch.device(device)
        on_gpu = dev.type == "cuda" and torch.cuda.is_available()
        chosen = info.default_backend("cuda" if on_gpu else "cpu", on_gpu and warp_available())
        if images and chosen not in BATCHED_RENDERING_BACKENDS and "cpu" in info.backends:
            return "cpu"
        return chosen
    if backend not in BACKENDS:
        raise FlowrlError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}, auto")
    if not isinstance(info, MujocoTask):  # its own simulator only: one implementation whatever the backend asked for
        return info.backends[0]
    if backend not in info.backends:
        raise FlowrlError(f"task {info.name} does not run on the {backend} backend; it runs on "
                          f"{', '.join(info.backends)}" + (f" ({info.description})" if info.description else ""))
    return backend


def make(
    task: str,
    num_envs: int = 1,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    seed: int | None = None,
    images: bool = False,
    **kwargs: Any,
) -> BatchedEnv:
    """Build ``num_envs`` copies of ``task`` stepped together on ``backend``.

    Backends: ``cpu`` (mujoco.batch on a thread pool, float64), ``warp`` (MuJoCo Warp, float32, on the
    GPU or Warp's CPU device), ``gymnasium`` (gymnasium's own vector envs; ``vectorization="async"``
    for subprocesses), ``auto`` (the default: warp on a CUDA device when installed, else cpu).
    robosuite's tasks and pure-torch tasks are their own backend whatever is asked.
    ``seed`` seeds env i with ``seed + i`` at the first ``reset()``. ``images``: the envs will render camera
    images (a pixel policy's): ``auto`` picks a backend that renders, and robosuite's workers get their
    offscreen renderer. Other keyword arguments go to the backend: ``threads`` (cpu),
    ``nconmax``/``njmax``/``capture_controller`` (warp), ``terminate_on_success``.
    """
    if num_envs < 1:
        raise FlowrlError(f"num_envs must be >= 1, got {num_envs}")
    info = resolve_task(task)
    backend = resolve_backend(info.name, backend, device, images=images)
    if images and backend == "robosuite":
        kwargs["render"] = True
    if backend in info.envs:
        return info.envs[backend](info, num_envs, device=device, seed=seed, **kwargs)
    if backend == "gymnasium":
        from flowrl.envs.backends.gymnasium import GymnasiumEnv

        kwargs.pop("threads", None)
        return GymnasiumEnv(info.name, info.gym_id, num_envs, device=device, seed=seed, **kwargs)
    if not isinstance(info, MujocoTask):
        raise FlowrlError(f"task {info.name} is no MujocoTask and has no env builder for the {backend} backend")
    if backend == "warp":
        from flowrl.envs.backends.warp import MujocoWarpEnv

        kwargs.pop("threads", None)
        return MujocoWarpEnv(info, num_envs, device=device, seed=seed, **kwargs)
    from flowrl.envs.backends.cpu import MujocoBatchEnv

    return MujocoBatchEnv(info, num_envs, device=device, seed=seed, **kwargs)


import flowrl.envs.tasks  # noqa: E402,F401  (registers the built-in tasks)

__all__ = ["BACKENDS", "BatchedEnv", "ChunkResult", "MujocoTask", "Task", "all_tasks", "canonical_task", "is_robosuite",
           "make", "register", "BATCHED_RENDERING_BACKENDS", "resolve_backend", "resolve_task", "warp_available"]

from flowrl.envs.gym_registration import register_gym_envs as _register_gym_envs; _register_gym_envs(make)  # noqa: E402,E702,I001  (gymnasium ids flowrl/<task>-v<n>)
