"""The task abstraction the MuJoCo backends (cpu, warp) run.

A :class:`MujocoTask` holds everything about a task except how physics is stepped: the model it
loads, its substeps per env step, its reset distribution, observation, reward, termination and
success, and an optional per-substep controller (a policy action becomes a goal once per env step;
the controller turns it into actuator inputs at every physics substep, as robosuite's OSC does).
Backends hand it the simulation state as (N, ...) torch tensors and never define task logic.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import mujoco
import numpy as np
import torch

if TYPE_CHECKING:
    from flowrl.envs.registry import TaskInfo

SETTOTALMASS_DEPRECATED = "compiler attribute 'settotalmass' is deprecated"
"""The start of MuJoCo 4's warning about gymnasium's half_cheetah.xml (``<compiler settotalmass=...>``)."""


@contextmanager
def quiet_settotalmass() -> Iterator[None]:
    """While inside, MuJoCo's warning that the compiler attribute ``settotalmass`` is deprecated is
    dropped. Gymnasium's HalfCheetah model sets it and MuJoCo 4 warns at every compile of that model,
    on the C library's stdout (into ``--json`` output too) with nothing a user can change; the model
    still compiles to the same masses. Any other MuJoCo warning goes on to the handler that was
    installed before, or to stderr as ``WARNING: ...`` when there was none (MuJoCo's default)."""
    previous = mujoco.get_mju_user_warning()

    def handler(message: str) -> None:
        if message.startswith(SETTOTALMASS_DEPRECATED):
            return
        if previous is not None:
            previous(message)
        else:
            print(f"WARNING: {message}", file=sys.stderr)

    mujoco.set_mju_user_warning(handler)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


State = dict[str, torch.Tensor]
"""qpos (N, nq), qvel (N, nv) and the derived fields a task asks for, e.g. xpos (N, nbody, 3)."""


class Controller(Protocol):
    """A per-substep controller: ``set_goal`` once per env step, ``ctrl`` before every physics substep."""

    def set_goal(self, state: State, action: torch.Tensor) -> None:
        """Take the (N, act_dim) policy action of this env step (already clipped to the action bounds)."""

    def ctrl(self, state: State) -> torch.Tensor:
        """(N, nu) actuator inputs for the next physics substep, from the current (forwarded) state."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optional. The controller's per-env state (goals, posture targets, gripper state), by name: the tensors
        themselves, which a backend saves with its full state and restores in place."""


@dataclass(frozen=True)
class MujocoTask:
    """One MuJoCo task; subclasses fill in the task-specific terms."""

    info: "TaskInfo"
    frame_skip: int
    """Physics substeps per env step."""
    reset_noise_scale: float = 0.0
    derived_fields: tuple[str, ...] = ()
    """MjData fields beyond qpos/qvel the task reads (backends expose them in the state)."""
    needs_contact_forces: bool = False
    """The task reads ``cfrc_ext`` after each step (backends run ``mj_rnePostConstraint``)."""
    solver: str | None = None
    """Override of the model's solver (``newton`` for MuJoCo Warp, which lacks PGS)."""

    velocity_noise_normal = False
    """Reset velocities are ``scale * N(0, 1)`` instead of ``U(-scale, scale)``."""

    observation_memory_dim = 0
    """Width of what an observation remembers of the previous env step (:meth:`observation_memory`); 0: the
    observation is a function of the current state alone."""

    def model_path(self) -> str:
        raise NotImplementedError

    def load_model(self) -> mujoco.MjModel:
        with quiet_settotalmass():
            model = mujoco.MjModel.from_xml_path(self.model_path())
        if self.solver == "newton":
            model.opt.solver = int(mujoco.mjtSolver.mjSOL_NEWTON)
        return model

    def dt(self, model: mujoco.MjModel) -> float:
        return float(model.opt.timestep) * self.frame_skip

    def controller(self, model: mujoco.MjModel, num_envs: int, device: torch.device,
                   dtype: torch.dtype) -> Controller | None:
        """The per-substep controller, or None when the action is the actuator input (clipped to ctrlrange)."""
        return None

    def action_bounds(self, model: mujoco.MjModel) -> tuple[np.ndarray, np.ndarray]:
        """The policy action's bounds: the actuators' ctrlrange unless a controller says otherwise."""
        low, high = model.actuator_ctrlrange.T
        return low.copy(), high.copy()

    # -- reset distribution --------------------------------------------------------------------
    def reset_state(self, rng: np.random.Generator, qpos0: np.ndarray, nv: int) -> tuple[np.ndarray, np.ndarray]:
        """(qpos, qvel) of a fresh episode from one env's numpy generator (the order gymnasium draws in)."""
        s = self.reset_noise_scale
        qpos = qpos0 + rng.uniform(low=-s, high=s, size=len(qpos0))
        qvel = (np.zeros(nv) + s * rng.standard_normal(nv)) if self.velocity_noise_normal else \
            np.zeros(nv) + rng.uniform(low=-s, high=s, size=nv)
        return qpos, qvel

    def reset_noise_batch(self, gen: torch.Generator, n: int, nq: int, nv: int, like: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(qpos offset, qvel) for n fresh episodes at once on the simulation's device, from the same
        distributions as :meth:`reset_state` (autoresets on the GPU)."""
        s = self.reset_noise_scale
        kw: dict[str, Any] = {"generator": gen, "device": like.device, "dtype": like.dtype}
        dq = (torch.rand((n, nq), **kw) * 2 - 1) * s
        qvel = s * torch.randn((n, nv), **kw) if self.velocity_noise_normal else (torch.rand((n, nv), **kw) * 2 - 1) * s
        return dq, qvel

    # -- terms ---------------------------------------------------------------------------------
    def tracked(self, s: State, model_info: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) quantity whose change over a step the reward uses (locomotion: the forward position).
        Backends keep it from the previous step and hand both values to :meth:`reward_and_termination`."""
        return torch.zeros_like(s["qpos"][:, 0])

    def observation(self, s: State, memory: torch.Tensor | None = None) -> torch.Tensor:
        """(N, obs_dim). ``memory`` (tasks with ``observation_memory_dim`` > 0; the others may leave it out of
        their signature): :meth:`observation_memory` of the previous env step, all zeros in the rows of envs at
        the first step of an episode; None (a caller without a previous step) reads the current state instead."""
        raise NotImplementedError

    def observation_memory(self, s: State) -> torch.Tensor | None:
        """(N, observation_memory_dim) of the current state that the next env step's observation reads
        (robosuite's observation cache); backends keep it between steps, zero it at resets and save it with
        their full state."""
        return None

    def reward_and_termination(self, s: State, before: torch.Tensor, after: torch.Tensor, dt: float,
                               action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward, terminated) of the step just taken; ``before``/``after`` are :meth:`tracked`."""
        raise NotImplementedError

    def success(self, s: State) -> torch.Tensor | None:
        """(N,) bool, for tasks that define success; None otherwise."""
        return None
