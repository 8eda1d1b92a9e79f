"""The one registry of tasks: a task is one object holding every fact and term about it.

A task is a :class:`Task` (or a subclass: :class:`flowrl.envs.tasks.base.MujocoTask` adds the model and
the terms the cpu and warp backends run), built with keyword arguments and registered once with
:func:`register` by the file that defines it (importing :mod:`flowrl.envs` imports the built-in task
files; installed plugins are loaded on first use). ``make``, config validation, ``flowrl describe``,
checkpoints, gymnasium's ids, demonstration collection and the CLI's messages read this registry;
backends run what it holds and define no task of their own. Adding a task is one file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowrl.errors import FlowrlError
from flowrl.plugins import load_plugins

BACKENDS = ("cpu", "warp", "gymnasium", "robosuite", "torch")
"""Every backend name: ``cpu`` (mujoco.batch), ``warp`` (MuJoCo Warp), ``gymnasium`` (gymnasium's
vector envs), ``robosuite`` (robosuite's own envs in worker processes), ``torch`` (tasks written
entirely in torch, which run wherever torch does)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Task:
    """What every part of flowrl needs to know about a task. Tasks are compared by identity: the
    registry holds one object per task."""

    name: str
    """Canonical name, e.g. ``Hopper`` or ``robosuite/Lift``."""
    obs_layout: tuple[tuple[str, int], ...]
    """Named parts of the observation, in order: (name, size); the observation's size is their sum."""
    act_dim: int
    max_episode_steps: int
    """The horizon: episodes are truncated after this many env steps."""
    backends: tuple[str, ...]
    """Backends that run it; the first is the default where ``auto`` has no better choice."""
    aliases: tuple[str, ...] = ()
    """Other spellings users may write (matched case-insensitively, like the name)."""
    description: str = ""
    envs: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    """Env builders of the backends that are not MuJoCo backends of ours, by backend:
    ``envs[backend](task, num_envs, device=, seed=, **kwargs)``; for tasks that are their own
    simulator (``torch``) or run in another program (``robosuite``)."""
    gym_id: str = ""
    """gymnasium's id of the same task, for the ``gymnasium`` backend (and parity tests)."""
    action_names: tuple[str, ...] = ()
    """Names of the action's dimensions where the task fixes them (empty: ``a[i]``)."""
    has_success: bool = False
    """Whether the task reports ``info["success"]``."""
    cameras: tuple[str, ...] = ()
    """Named cameras of the model that images and videos may use; a video shows the first (none: a
    camera tracking the robot's body 1)."""
    hidden_geom_groups: tuple[int, ...] = ()
    """Geom groups images and videos leave out (robosuite's collision geoms, group 0)."""
    expert: Callable[[int], Any] | None = None
    """The scripted expert: ``expert(num_envs)`` is a :class:`flowrl.rollout.ChunkPolicy` of the task's
    observations with a ``reset(mask=None)`` of its per-env state (``flowrl collect scripted``)."""
    medium_return: float = 0.0
    """Return of a medium-quality demonstrator (D4RL-like); picks ``flowrl expert``'s ``medium`` snapshot."""
    warp_buffers: tuple[int, int] = (64, 256)
    """MuJoCo Warp's contacts and constraint rows per world (``nconmax``, ``njmax``)."""
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    """Config values every run of this task takes unless a preset or the command line sets them, by dotted
    key (``{"eval.end_on_success": True}``): what holds for all of the task's presets, said once."""

    def __post_init__(self) -> None:
        bad = [p for p in self.obs_layout if not (len(p) == 2 and isinstance(p[0], str) and int(p[1]) > 0)]
        if bad or not self.obs_layout:
            raise FlowrlError(f"task {self.name}: obs_layout must be (name, size > 0) pairs, got {self.obs_layout!r}")
        if self.action_names and len(self.action_names) != self.act_dim:
            raise FlowrlError(f"task {self.name}: {len(self.action_names)} action_names for act_dim {self.act_dim}")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise FlowrlError(f"task {self.name}: unknown backends {unknown}; known: {', '.join(BACKENDS)}")

    @property
    def obs_dim(self) -> int:
        return sum(size for _, size in self.obs_layout)

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


_TASKS: dict[str, Task] = {}
_OBSERVERS: list[Callable[[Task], None]] = []


def on_register(callback: Callable[[Task], None]) -> None:
    """Call ``callback(task)`` for every task registered from now on (gymnasium's ids follow the registry so)."""
    _OBSERVERS.append(callback)


def register(task: Task) -> Task:
    """Add a task to the registry (a name or alias already taken by another task is an error)."""
    if not isinstance(task, Task):
        raise FlowrlError(f"register: expected a flowrl.envs.Task, got {type(task).__name__}")
    taken = {k.lower(): t.name for t in _TASKS.values() for k in (t.name, *t.aliases)}
    for key in (task.name, *task.aliases):
        owner = taken.get(key.lower())
        if owner is not None and owner != task.name:
            raise FlowrlError(f"task name '{key}' is already registered by {owner}")
    _TASKS[task.name] = task
    for callback in _OBSERVERS:
        callback(task)
    return task


def registered_tasks() -> dict[str, Task]:
    """The tasks registered so far, without loading plugins (for code that runs while flowrl.envs imports)."""
    return dict(_TASKS)


def all_tasks() -> dict[str, Task]:
    """Every registered task by canonical name."""
    load_plugins()
    return dict(_TASKS)


def resolve_task(name: str) -> Task:
    """The task a user's spelling names (case-insensitive; aliases such as ``Hopper-v5`` or ``lift``)."""
    load_plugins()
    key = name.strip().lower()
    for task in _TASKS.values():
        if key == task.name.lower() or key in (a.lower() for a in task.aliases):
            return task
    raise FlowrlError(f"unknown task '{name}'; known tasks: {', '.join(sorted(_TASKS))}")


def canonical_task(name: str) -> str:
    """``hopper`` -> ``Hopper``, ``robosuite/lift`` -> ``robosuite/Lift``."""
    return resolve_task(name).name
