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


class LiftExpert:
    """Above the cube, down, grasp, lift: the four phases of a pick."""

    def __init__(self, num_envs: int, gain: float = 1.0) -> None:
        self.phase = np.zeros(num_envs, dtype=np.int64)
        self.timer = np.zeros(num_envs, dtype=np.int64)
        self.gain = gain

    def reset(self, mask: np.ndarray | None = None) -> None:
        mask = np.ones_like(self.phase, dtype=bool) if mask is None else mask
        self.phase[mask], self.timer[mask] = 0, 0

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """(N, obs_dim) -> (N, act_dim); an (N, H, obs_dim) history -> a one-step chunk (N, 1, act_dim)."""
        history = obs.dim() == 3
        o = (obs[:, -1] if history else obs).detach().cpu().numpy()
        cube, eef = o[:, 0:3], o[:, 10:13]
        target = cube.copy()
        gripper = np.full(len(o), OPEN)
        above = cube + np.array([0.0, 0.0, 0.08])
        for i in range(len(o)):
            if self.phase[i] == 0:  # hover above the cube
                target[i] = above[i]
                if np.linalg.norm(eef[i] - above[i]) < 0.01:
                    self.phase[i] = 1
            elif self.phase[i] == 1:  # descend around it
                target[i] = cube[i] + np.array([0.0, 0.0, -0.005])
                if np.linalg.norm(eef[i] - target[i]) < 0.008:
                    self.phase[i], self.timer[i] = 2, 0
            elif self.phase[i] == 2:  # close the gripper
                target[i] = eef[i]
                gripper[i] = CLOSED
                self.timer[i] += 1
                if self.timer[i] >= 12:
                    self.phase[i] = 3
            else:  # lift
                target[i] = np.array([eef[i, 0], eef[i, 1], cube[i, 2] + 0.25])
                gripper[i] = CLOSED
        delta = np.clip(self.gain * (target - eef) / POS_SCALE, -1.0, 1.0)
        action = torch.as_tensor(np.concatenate([delta, np.zeros((len(o), 3)), gripper[:, None]], axis=1),
                                 dtype=torch.float32)
        return action.unsqueeze(1) if history else action


EXPERTS = {"robosuite/Lift": LiftExpert}
