"""The controller protocol the MuJoCo backends run between a policy's action and the actuators."""

from __future__ import annotations

from typing import Protocol

import torch

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

    def reset(self, state: State, env_ids: torch.Tensor) -> None:
        """Optional. Envs ``env_ids`` start an episode at the (forwarded) ``state`` (robosuite re-creates its
        controllers at every reset)."""
