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
import torch

from flowrl.envs.controllers.base import State
from flowrl.envs.registry import register
from flowrl.envs.tasks.base import MujocoTask

ASSETS = os.path.join(os.path.dirname(gymnasium.__file__), "envs", "mujoco", "assets")


@dataclass(frozen=True, kw_only=True, eq=False)
class LocomotionTask(MujocoTask):
    """gymnasium v5 semantics: reward from the forward velocity, terminations from health. ``model`` is a file
    name among gymnasium's MuJoCo assets; ``gym_id`` is the task's name with gymnasium's ``-v5``, unless given."""

    max_episode_steps: int = 1000
    backends: tuple[str, ...] = ("cpu", "warp", "gymnasium")

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", os.path.join(ASSETS, self.model))
        if not self.gym_id:
            object.__setattr__(self, "gym_id", f"{self.name}-v5")
        if not self.description:
            object.__setattr__(self, "description", f"gymnasium's {self.gym_id}")
        super().__post_init__()

    def tracked(self, s: State, model_info: dict[str, torch.Tensor]) -> torch.Tensor:
        """The x coordinate whose change per step is the forward velocity."""
        return s["qpos"][:, 0]

    def reward_and_termination(self, s, before, after, dt, action):
        return self.locomotion_reward(s, (after - before) / dt, action)

    def locomotion_reward(self, s: State, x_velocity: torch.Tensor,
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

    def locomotion_reward(self, s, x_velocity, action):
        qpos, qvel = s["qpos"], s["qvel"]
        z, angle = qpos[:, 1], qpos[:, 2]
        state = torch.cat([qpos, qvel], dim=1)[:, 2:]
        healthy = ((state > -100.0) & (state < 100.0)).all(dim=1) & (z > 0.7) & (angle > -0.2) & (angle < 0.2)
        reward = (x_velocity + healthy.double()) - _ctrl_cost(action, 1e-3)
        return reward, ~healthy


class Walker2d(LocomotionTask):
    def observation(self, s: State) -> torch.Tensor:
        return _planar_obs(s)

    def locomotion_reward(self, s, x_velocity, action):
        z, angle = s["qpos"][:, 1], s["qpos"][:, 2]
        healthy = (z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0)
        reward = (x_velocity + healthy.double()) - _ctrl_cost(action, 1e-3)
        return reward, ~healthy


class HalfCheetah(LocomotionTask):
    velocity_noise_normal = True

    def observation(self, s: State) -> torch.Tensor:
        return torch.cat([s["qpos"][:, 1:], s["qvel"]], dim=1)

    def locomotion_reward(self, s, x_velocity, action):
        return x_velocity - _ctrl_cost(action, 0.1), torch.zeros_like(x_velocity, dtype=torch.bool)


class Ant(LocomotionTask):
    velocity_noise_normal = True

    def tracked(self, s, model_info):
        return s["xpos"][:, 1, 0]  # the torso ("main body" 1)

    def observation(self, s: State) -> torch.Tensor:
        forces = s["cfrc_ext"].clamp(-1.0, 1.0)[:, 1:].flatten(1)
        return torch.cat([s["qpos"][:, 2:], s["qvel"], forces], dim=1)

    def locomotion_reward(self, s, x_velocity, action):
        qpos, qvel = s["qpos"], s["qvel"]
        finite = torch.isfinite(torch.cat([qpos, qvel], dim=1)).all(dim=1)
        healthy = finite & (qpos[:, 2] >= 0.2) & (qpos[:, 2] <= 1.0)
        contact_cost = 5e-4 * s["cfrc_ext"].clamp(-1.0, 1.0).square().sum(dim=(1, 2))
        reward = (x_velocity + healthy.double()) - (_ctrl_cost(action, 0.5) + contact_cost)
        return reward, ~healthy


class Humanoid(LocomotionTask):
    """gymnasium charges the control cost on ``data.ctrl`` (float64) here, not on the action."""

    def tracked(self, s, model_info):
        mass = model_info["body_mass"]
        return (mass * s["xipos"][:, :, 0]).sum(dim=1) / mass.sum()

    def observation(self, s: State) -> torch.Tensor:
        return torch.cat([s["qpos"][:, 2:], s["qvel"], s["cinert"][:, 1:].flatten(1), s["cvel"][:, 1:].flatten(1),
                          s["qfrc_actuator"][:, 6:], s["cfrc_ext"][:, 1:].flatten(1)], dim=1)

    def locomotion_reward(self, s, x_velocity, action):
        z = s["qpos"][:, 2]
        healthy = (z > 1.0) & (z < 2.0)
        contact_cost = (5e-7 * s["cfrc_ext"].square().sum(dim=(1, 2))).clamp(max=10.0)
        reward = (1.25 * x_velocity + 5.0 * healthy.double()) - (_ctrl_cost(action.double(), 0.1) + contact_cost)
        return reward, ~healthy


def _planar(nq: int, nv: int) -> tuple[tuple[str, int], ...]:
    return (("qpos[1:] (all but the x position)", nq - 1), ("qvel (clipped to +-10)", nv))


HUMANOID_LAYOUT = (("qpos[2:] (all but x, y)", 22), ("qvel", 23), ("cinert[1:] (body inertias)", 130),
                   ("cvel[1:] (body velocities)", 78), ("qfrc_actuator[6:]", 17), ("cfrc_ext[1:] (contact forces)", 78))
HUMANOID_FIELDS = ("xipos", "cinert", "cvel", "qfrc_actuator", "cfrc_ext")

register(Hopper(name="Hopper", aliases=("Hopper-v5",), model="hopper.xml", frame_skip=4, reset_noise_scale=5e-3,
                obs_layout=_planar(6, 6), act_dim=3, medium_return=1600.0, warp_buffers=(16, 64)))
register(Walker2d(name="Walker2d", aliases=("Walker2d-v5",), model="walker2d_v5.xml", frame_skip=4,
                  reset_noise_scale=5e-3, obs_layout=_planar(9, 9), act_dim=6, medium_return=2500.0,
                  warp_buffers=(24, 96)))
register(HalfCheetah(name="HalfCheetah", aliases=("HalfCheetah-v5",), model="half_cheetah.xml", frame_skip=5,
                     reset_noise_scale=0.1, obs_layout=(("qpos[1:] (all but the x position)", 8), ("qvel", 9)),
                     act_dim=6, medium_return=4500.0, warp_buffers=(24, 96)))
register(Ant(name="Ant", aliases=("Ant-v5",), model="ant.xml", frame_skip=5, reset_noise_scale=0.1,
             derived_fields=("xpos", "cfrc_ext"), needs_contact_forces=True,
             obs_layout=(("qpos[2:] (all but x, y)", 13), ("qvel", 14),
                         ("cfrc_ext[1:] (contact forces, clipped to +-1)", 78)),
             act_dim=8, medium_return=2500.0, warp_buffers=(48, 192)))
register(Humanoid(name="Humanoid", aliases=("Humanoid-v5",), model="humanoid.xml", frame_skip=5,
                  reset_noise_scale=1e-2, derived_fields=HUMANOID_FIELDS, needs_contact_forces=True,
                  obs_layout=HUMANOID_LAYOUT, act_dim=17, medium_return=2000.0, warp_buffers=(64, 256),
                  backends=("cpu", "gymnasium"),
                  description="gymnasium's Humanoid-v5 (PGS solver: MuJoCo Warp lacks it, use Humanoid-Newton)"))
register(Humanoid(name="Humanoid-Newton", model="humanoid.xml", gym_id="Humanoid-v5", frame_skip=5,
                  reset_noise_scale=1e-2, derived_fields=HUMANOID_FIELDS, needs_contact_forces=True, solver="newton",
                  obs_layout=HUMANOID_LAYOUT, act_dim=17, medium_return=2000.0, warp_buffers=(64, 256),
                  backends=("cpu", "warp"),
                  description="Humanoid-v5 with the Newton solver instead of the XML's PGS (what MuJoCo Warp runs)"))
