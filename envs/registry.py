"""The one registry of tasks: every fact about a task, in one place.

A task is registered once with :func:`register` (its family's module does it on import; importing
:mod:`flowrl.envs` imports the built-in families, and installed plugins are loaded on first use). ``make``,
config validation, the CLI's messages and the docs read this registry; backends run what it
describes and define no task of their own. Adding a task is one file plus its ``register`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowrl.errors import FlowrlError
from flowrl.plugins import load_plugins

BACKENDS = ("cpu", "warp", "gymnasium", "robosuite", "torch")
"""Every backend name: ``cpu`` (mujoco.batch), ``warp`` (MuJoCo Warp), ``gymnasium`` (gymnasium's
vector envs), ``robosuite`` (robosuite's own envs in worker processes), ``torch`` (tasks written
entirely in torch, which run wherever torch does)."""


@dataclass(frozen=True)
class TaskInfo:
    """What every part of flowrl needs to know about a task."""

    name: str
    """Canonical name, e.g. ``Hopper`` or ``robosuite/Lift``."""
    obs_dim: int
    act_dim: int
    max_episode_steps: int
    """The horizon: episodes are truncated after this many env steps."""
    backends: tuple[str, ...]
    """Backends that run it; the first is the default where ``auto`` has no better choice."""
    aliases: tuple[str, ...] = ()
    """Other spellings users may write (matched case-insensitively, like the name)."""
    task: Callable[[], Any] | None = None
    """Builds the task object (:class:`flowrl.envs.tasks.base.MujocoTask`) the cpu and warp backends run."""
    envs: dict[str, Callable[..., Any]] = field(default_factory=dict)
    """Env builders of the backends that are not MuJoCo backends of ours, by backend:
    ``envs[backend](task_info, num_envs, device=, seed=, **kwargs)``; for tasks that are their own
    simulator (``torch``) or run in another program (``robosuite``)."""
    gym_id: str = ""
    """gymnasium's id of the same task, for the ``gymnasium`` backend (and parity tests)."""
    model_file: str = ""
    """The MuJoCo model the task loads (informational; the task object loads it)."""
    warp_buffers: tuple[int, int] = (64, 256)
    """MuJoCo Warp's contacts and constraint rows per world (``nconmax``, ``njmax``)."""
    has_success: bool = False
    """Whether the task reports ``info["success"]``."""
    obs_layout: tuple[tuple[str, int], ...] = ()
    """Named parts of the observation, in order: (name, size). Empty: one unnamed vector."""
    medium_return: float = 0.0
    """Return of a medium-quality demonstrator (D4RL-like); picks the ``medium`` expert snapshot."""
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Facts specific to a task family (e.g. robosuite's env name and robots)."""

    @property
    def family(self) -> str:
        return "robosuite" if "robosuite" in self.backends else self.backends[0]

    def default_backend(self, device_type: str, warp_installed: bool) -> str:
        """What ``backend="auto"`` means for this task: warp on a CUDA device when installed and the
        task runs there, else the first of its backends that is not warp."""
        if device_type == "cuda" and warp_installed and "warp" in self.backends:
            return "warp"
        for b in self.backends:
            if b != "warp":
                return b
        return self.backends[0]


_TASKS: dict[str, TaskInfo] = {}
_OBSERVERS: list[Callable[[TaskInfo], None]] = []


def on_register(callback: Callable[[TaskInfo], None]) -> None:
    """Call ``callback(info)`` for every task registered from now on (gymnasium's ids follow the registry so)."""
    _OBSERVERS.append(callback)


def register(info: TaskInfo) -> TaskInfo:
    """Add a task to the registry (a name or alias already taken by another task is an error)."""
    taken = {k.lower(): t.name for t in _TASKS.values() for k in (t.name, *t.aliases)}
    for key in (info.name, *info.aliases):
        owner = taken.get(key.lower())
        if owner is not None and owner != info.name:
            raise FlowrlError(f"task name '{key}' is already registered by {owner}")
    unknown = [b for b in info.backends if b not in BACKENDS]
    if unknown or not info.backends:
        raise FlowrlError(f"task {info.name}: unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    _TASKS[info.name] = info
    for callback in _OBSERVERS:
        callback(info)
    return info


def registered_tasks() -> dict[str, TaskInfo]:
    """The tasks registered so far, without loading plugins (for code that runs while flowrl.envs imports)."""
    return dict(_TASKS)


def all_tasks() -> dict[str, TaskInfo]:
    """Every registered task by canonical name."""
    load_plugins()
    return dict(_TASKS)


def resolve_task(name: str) -> TaskInfo:
    """The task a user's spelling names (case-insensitive; aliases such as ``Hopper-v5`` or ``lift``)."""
    load_plugins()
    key = name.strip().lower()
    for info in _TASKS.values():
        if key == info.name.lower() or key in (a.lower() for a in info.aliases):
            return info
    raise FlowrlError(f"unknown task '{name}'; known tasks: {', '.join(sorted(_TASKS))}")


def canonical_task(name: str) -> str:
    """``hopper`` -> ``Hopper``, ``robosuite/lift`` -> ``robosuite/Lift``."""
    return resolve_task(name).name
