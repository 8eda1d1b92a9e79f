"""Locomotion tasks written once in torch, shared by every simulation backend.

Each task reproduces gymnasium v5's definition (observation, reward terms, termination, reset
noise, frame skip) on gymnasium's own XML files, so a backend only has to step MuJoCo and hand
over the state as (N, ...) tensors. Two gymnasium quirks are kept on purpose, for parity:

- the "before" position of Ant and Humanoid comes from derived fields (``xpos``, ``xipos``) which,
  after ``mj_step``, describe the state before the last substep; backends hand over exactly those;
- gymnasium computes ``cfrc_ext`` with ``mj_rnePostConstraint`` after a step but not after a reset,
  so the contact forces in a first observation are zero.

Reset noise is drawn from one numpy Generator per env, seeded like gymnasium's (``seed + i``) and
drawn in the same order, so ``reset(seed)`` gives gymnasium's initial states bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gymnasium
import mujoco
import numpy as np
import torch

from flowrl.envs.tasks import TaskSpec, resolve_task

ASSETS = os.path.join(os.path.dirname(gymnasium.__file__), "envs", "mujoco", "assets")

State = dict[str, torch.Tensor]
"""qpos (N, nq), qvel (N, nv) and the derived fields a task asks for, e.g. xpos (N, nbody, 3)."""


@dataclass(frozen=True)
class LocomotionTask:
    """gymnasium v5 semantics of one task; subclasses fill in the task-specific terms."""

    spec: TaskSpec
    xml_file: str
    frame_skip: int
    reset_noise_scale: float
    derived_fields: tuple[str, ...] = ()
    needs_contact_forces: bool = False
    solver: str | None = None  # override of the XML's solver (e.g. "newton" for Warp)

    def load_model(self) -> mujoco.MjModel:
        """gymnasium's XML, loaded as gymnasium loads it (the Newton variant switches the solver)."""
        model = mujoco.MjModel.from_xml_path(os.path.join(ASSETS, self.xml_file))
        if self.solver == "newton":
            model.opt.solver = int(mujoco.mjtSolver.mjSOL_NEWTON)
        return model

    def dt(self, model: mujoco.MjModel) -> float:
        return float(model.opt.timestep) * self.frame_skip

    def reset_state(self, rng: np.random.Generator, qpos0: np.ndarray, nv: int) -> tuple[np.ndarray, np.ndarray]:
        """(qpos, qvel) of a fresh episode, drawn exactly as gymnasium's ``reset_model``."""
        s = self.reset_noise_scale
        qpos = qpos0 + rng.uniform(low=-s, high=s, size=len(qpos0))
        qvel = np.zeros(nv) + rng.uniform(low=-s, high=s, size=nv)
        return qpos, qvel

    def reset_noise_batch(self, gen: torch.Generator, n: int, nq: int, nv: int, like: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(qpos noise, qvel) for n fresh episodes at once, from the same distributions as
        :meth:`reset_state`, drawn on the simulation's device (for autoresets on the GPU)."""
        s = self.reset_noise_scale
        uniform = lambda k: (torch.rand((n, k), generator=gen, device=like.device, dtype=like.dtype) * 2 - 1) * s  # noqa: E731
        if self.velocity_noise_normal:
            return uniform(nq), s * torch.randn((n, nv), generator=gen, device=like.device, dtype=like.dtype)
        return uniform(nq), uniform(nv)

    velocity_noise_normal = False

    def position(self, s: State, model_info: dict[str, torch.Tensor]) -> torch.Tensor:
        """The x coordinate whose change per step is the forward velocity."""
        return s["qpos"][:, 0]

    def observation(self, s: State) -> torch.Tensor:
        raise NotImplementedError

    def reward_and_termination(self, s: State, x_velocity: torch.Tensor,
                               action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _planar_obs(s: State) -> torch.Tensor:
    return torch.cat([s["qpos"][:, 1:], s["qvel"].clamp(-10.0, 10.0)], dim=1)


def numpy_order_sum(x: torch.Tensor) -> torch.Tensor:
    """Row sums of (N, n) in numpy's summation order and dtype (sequential below 8 terms, then 8
    partial sums combined pairwise), so that float32 costs round exactly as gymnasium's."""
    n = x.shape[1]
    if n < 8:
        total = torch.zeros_like(x[:, 0])
        for i in range(n):
            total = total + x[:, i]
        return total
    r = x[:, :8].clone()
    full = n - n % 8
    for i in range(8, full, 8):
        r = r + x[:, i:i + 8]
    total = ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))
    for i in range(full, n):
        total = total + x[:, i]
    return total


def _ctrl_cost(action: torch.Tensor, weight: float) -> torch.Tensor:
    """gymnasium's ``weight * np.sum(np.square(action))``, in the action's own dtype."""
    return (numpy_order_sum(action.square()) * torch.tensor(weight, dtype=action.dtype)).double()


class Hopper(LocomotionTask):
    def observation(self, s: State) -> torch.Tensor:
        return _planar_obs(s)

    def reward_and_termination(self, s, x_velocity, action):
        qpos, qvel = s["qpos"], s["qvel"]
        z, angle = qpos[:, 1], qpos[:, 2]
        state = torch.cat([qpos, qvel], dim=1)[:, 2:]
        healthy = ((state > -100.0) & (state < 100.0)).all(dim=1) & (z > 0.7) & (angle > -0.2) & (angle < 0.2)
        reward = (x_velocity + healthy.double()) - _ctrl_cost(action, 1e-3)
        return reward, ~healthy


class Walker2d(LocomotionTask):
    def observation(self, s: State) -> torch.Tensor:
        return _planar_obs(s)

    def reward_and_termination(self, s, x_velocity, action):
        z, angle = s["qpos"][:, 1], s["qpos"][:, 2]
        healthy = (z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0)
        reward = (x_velocity + healthy.double()) - _ctrl_cost(action, 1e-3)
        return reward, ~healthy


class HalfCheetah(LocomotionTask):
    velocity_noise_normal = True

    def reset_state(self, rng, qpos0, nv):
        s = self.reset_noise_scale
        qpos = qpos0 + rng.uniform(low=-s, high=s, size=len(qpos0))
        qvel = np.zeros(nv) + s * rng.standard_normal(nv)
        return qpos, qvel

    def observation(self, s: State) -> torch.Tensor:
        return torch.cat([s["qpos"][:, 1:], s["qvel"]], dim=1)

    def reward_and_termination(self, s, x_velocity, action):
        return x_velocity - _ctrl_cost(action, 0.1), torch.zeros_like(x_velocity, dtype=torch.bool)


class Ant(LocomotionTask):
    reset_state = HalfCheetah.reset_state
    velocity_noise_normal = True

    def position(self, s, model_info):
        return s["xpos"][:, 1, 0]  # the torso ("main body" 1)

    def observation(self, s: State) -> torch.Tensor:
        forces = s["cfrc_ext"].clamp(-1.0, 1.0)[:, 1:].flatten(1)
        return torch.cat([s["qpos"][:, 2:], s["qvel"], forces], dim=1)

    def reward_and_termination(self, s, x_velocity, action):
        qpos, qvel = s["qpos"], s["qvel"]
        finite = torch.isfinite(torch.cat([qpos, qvel], dim=1)).all(dim=1)
        healthy = finite & (qpos[:, 2] >= 0.2) & (qpos[:, 2] <= 1.0)
        contact_cost = 5e-4 * s["cfrc_ext"].clamp(-1.0, 1.0).square().sum(dim=(1, 2))
        reward = (x_velocity + healthy.double()) - (_ctrl_cost(action, 0.5) + contact_cost)
        return reward, ~healthy


class Humanoid(LocomotionTask):
    """gymnasium charges the control cost on ``data.ctrl`` (float64) here, not on the action."""

    def position(self, s, model_info):
        mass = model_info["body_mass"]
        return (mass * s["xipos"][:, :, 0]).sum(dim=1) / mass.sum()

    def observation(self, s: State) -> torch.Tensor:
        return torch.cat([s["qpos"][:, 2:], s["qvel"], s["cinert"][:, 1:].flatten(1), s["cvel"][:, 1:].flatten(1),
                          s["qfrc_actuator"][:, 6:], s["cfrc_ext"][:, 1:].flatten(1)], dim=1)

    def reward_and_termination(self, s, x_velocity, action):
        z = s["qpos"][:, 2]
        healthy = (z > 1.0) & (z < 2.0)
        contact_cost = (5e-7 * s["cfrc_ext"].square().sum(dim=(1, 2))).clamp(max=10.0)
        reward = (1.25 * x_velocity + 5.0 * healthy.double()) - (_ctrl_cost(action.double(), 0.1) + contact_cost)
        return reward, ~healthy


def locomotion_task(name: str) -> LocomotionTask:
    """The task definition for a task name (``Humanoid-Newton``: Humanoid with the Newton solver)."""
    spec = resolve_task(name)
    if spec.name == "Hopper":
        return Hopper(spec, "hopper.xml", 4, 5e-3)
    if spec.name == "Walker2d":
        return Walker2d(spec, "walker2d_v5.xml", 4, 5e-3)
    if spec.name == "HalfCheetah":
        return HalfCheetah(spec, "half_cheetah.xml", 5, 0.1)
    if spec.name == "Ant":
        return Ant(spec, "ant.xml", 5, 0.1, ("xpos", "cfrc_ext"), True)
    fields = ("xipos", "cinert", "cvel", "qfrc_actuator", "cfrc_ext")
    if spec.name == "Humanoid":
        return Humanoid(spec, "humanoid.xml", 5, 1e-2, fields, True)
    if spec.name == "Humanoid-Newton":
        return Humanoid(spec, "humanoid.xml", 5, 1e-2, fields, True, solver="newton")
    raise KeyError(spec.name)
