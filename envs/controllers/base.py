"""The controller protocol the MuJoCo backends run between a policy's action and the actuators."""

from __future__ import annotations

from typing import Protocol

import torch

State = dict[str, torch.Tensor]
"""qpos (N, nq), qvel (N, nv) and the derived fields a task asks for, e.g. xpos (N, nbody, 3)."""


class Controller(Protocol):
    """A per-substep controller: ``set_goal`` once per env step, ``ctrl`` before every physics substep.

    Two methods are optional, and the backends call them only where a controller has them:
    ``state_tensors() -> dict[str, Tensor]``, the controller's per-env state (goals, posture targets, gripper
    state) by name, the tensors themselves, which a backend saves with its full state and restores in place;
    and ``reset(state, env_ids)``, envs ``env_ids`` starting an episode at the (forwarded) ``state``
    (robosuite re-creates its controllers at every reset).
    """

    def set_goal(self, state: State, action: torch.Tensor) -> None:
        """Take the (N, act_dim) policy action of this env step (already clipped to the action bounds)."""

    def ctrl(self, state: State) -> torch.Tensor:
        """(N, nu) actuator inputs for the next physics substep, from the current (forwarded) state."""
