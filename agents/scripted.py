"""Scripted experts for robosuite's manipulation tasks (Panda, OSC_POSE deltas).

They read the flattened robomimic low-dim observation of :mod:`flowrl.envs.robosuite_backend`
(sorted keys: ``object`` first, then ``robot0_eef_pos``, ``robot0_eef_quat``,
``robot0_gripper_qpos``) and keep a phase per env, reset when its episode ends.
"""

from __future__ import annotations

import numpy as np
import torch

OPEN, CLOSED = -1.0, 1.0
POS_SCALE = 0.05  # metres per unit of OSC_POSE position action (robosuite's default output_max)


class PickPlaceExpert:
    """Pick an object and, where the task has a goal, carry it there and let go.

    Phases per env: hover above the object, descend around it, close the gripper, lift, then
    (pick-and-place tasks) move above the goal at lifting height, lower, and open.
    """

    object_slice = slice(0, 3)  # the object's position in the observation
    eef_index = 10  # where robot0_eef_pos starts (after the ``object`` block)
    goal: np.ndarray | None = None
    lift_height = 0.25
    grasp_offset = np.array([0.0, 0.0, -0.005])

    def __init__(self, num_envs: int, gain: float = 1.0) -> None:
        self.phase = np.zeros(num_envs, dtype=np.int64)
        self.timer = np.zeros(num_envs, dtype=np.int64)
        self.lift_z = np.zeros(num_envs)
        self.gain = gain

    def reset(self, mask: np.ndarray | None = None) -> None:
        mask = np.ones_like(self.phase, dtype=bool) if mask is None else mask
        self.phase[mask], self.timer[mask] = 0, 0

    def _target(self, i: int, obj: np.ndarray, eef: np.ndarray) -> tuple[np.ndarray, float]:
        phase = self.phase[i]
        if phase == 0:  # hover above the object
            target = obj + np.array([0.0, 0.0, 0.08])
            if np.linalg.norm(eef - target) < 0.01:
                self.phase[i] = 1
            return target, OPEN
        if phase == 1:  # descend around it (contact may stop it short: then grasp where it is)
            target = obj + self.grasp_offset
            self.timer[i] += 1
            if np.linalg.norm(eef - target) < 0.008 or self.timer[i] > 40:
                self.phase[i], self.timer[i] = 2, 0
            return target, OPEN
        if phase == 2:  # close the gripper
            self.timer[i] += 1
            if self.timer[i] >= 12:
                self.phase[i], self.lift_z[i] = 3, obj[2] + self.lift_height
            return eef, CLOSED
        target = np.array([eef[0], eef[1], self.lift_z[i]])
        if phase == 3:  # lift
            if self.goal is not None and eef[2] > self.lift_z[i] - 0.02:
                self.phase[i] = 4
            return target, CLOSED
        goal_above = np.array([self.goal[0], self.goal[1], self.lift_z[i]])
        if phase == 4:  # carry above the goal
            if np.linalg.norm(eef[:2] - goal_above[:2]) < 0.01:
                self.phase[i] = 5
            return goal_above, CLOSED
        if phase == 5:  # lower into the goal
            lowered = np.array([self.goal[0], self.goal[1], self.goal[2] + 0.15])
            if eef[2] < lowered[2] + 0.01:
                self.phase[i] = 6
            return lowered, CLOSED
        return eef, OPEN  # let go

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """(N, obs_dim) -> (N, act_dim); an (N, H, obs_dim) history -> a one-step chunk (N, 1, act_dim)."""
        history = obs.dim() == 3
        o = (obs[:, -1] if history else obs).detach().cpu().numpy()
        obj, eef = o[:, self.object_slice], o[:, self.eef_index:self.eef_index + 3]
        targets, grippers = zip(*(self._target(i, obj[i], eef[i]) for i in range(len(o))))
        delta = np.clip(self.gain * (np.stack(targets) - eef) / POS_SCALE, -1.0, 1.0)
        action = torch.as_tensor(np.concatenate([delta, np.zeros((len(o), 3)), np.array(grippers)[:, None]], axis=1),
                                 dtype=torch.float32)
        return action.unsqueeze(1) if history else action


class LiftExpert(PickPlaceExpert):
    """Lift: pick the cube and hold it up."""


class CanExpert(PickPlaceExpert):
    """PickPlaceCan: the can into its quadrant of the right bin (robosuite's target placement)."""

    object_slice = slice(7, 10)  # object-state: Can_to_robot0_eef_pos, _quat, then Can_pos, Can_quat
    eef_index = 14
    goal = np.array([0.1975, 0.4025, 0.8])
    grasp_offset = np.array([0.0, 0.0, 0.0])
    lift_height = 0.2


EXPERTS = {"robosuite/Lift": LiftExpert, "robosuite/PickPlaceCan": CanExpert}
