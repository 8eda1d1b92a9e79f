"""robosuite's NutAssemblySquare: a Panda fits the square nut onto its peg (robosuite, and its shipped scene on
cpu and warp).

* **Object state** (14): the square nut's pose seen from the hand one step late, then its own pose
  (:class:`~flowrl.envs.tasks.robosuite_scenes.HeldObjectSceneTask`). robosuite's round nut is cleared.
* **Success**: the nut within 0.03 (x, y) of its peg, below 0.05 above the table, the grip site away from it.
* **Scripted expert**: :class:`SquareExpert`.

Contacts and constraint rows measured on C MuJoCo (most at the end of any env step over 4 scripted-expert
episodes of 250 steps): 67/277 (the nut's many convex pieces on the peg and in the fingers), so MuJoCo Warp gets
3x Lift's contacts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from flowrl.envs.controllers import State
from flowrl.envs.registry import register
from flowrl.envs.tasks.robosuite_scenes import (
    CLOSED,
    NO_ROTATION,
    OPEN,
    ROT_SCALE,
    HeldObjectSceneTask,
    PickPlaceExpert,
    rotation_matrix,
)


def wrap_angle(a: float, period: float = 2 * math.pi) -> float:
    """``a`` folded into [-period/2, period/2)."""
    return (a + period / 2) % period - period / 2


class SquareExpert(PickPlaceExpert):
    """NutAssemblySquare: grasp the square nut by its handle and drop it over the square peg.

    The handle runs along the nut's local x axis; the Panda's fingers close along the gripper's y
    axis, so the gripper turns until that axis crosses the handle and grasps near its outer end.
    It lifts the nut, turns it square to the peg, centres the nut itself (not the gripper) over the
    peg with an integral term against the controller's steady offset, lowers it while tilting the
    gripper against the nut's sag, and lets go once the nut is on the peg: it slides down to rest
    below robosuite's success height, with the gripper far enough away for success to count.
    """

    object_slice = slice(7, 14)  # SquareNut_pos, SquareNut_quat (after the eef-relative pose)
    eef_index = 14
    eef_quat_index = 17
    peg = np.array([0.23, 0.10])  # robosuite's peg1 (fixed in the arena)
    handle_offset = 0.065  # along the handle (it spans 0.029-0.079 from the nut's centre; fingers clear the body)
    integral_gain = 0.1
    max_tilt_correction = 0.3  # radians per step; more drives the wrist into its joint limit
    carry_z = 1.08
    release_z = 0.925  # the nut has slid 1.5 cm down the peg (top at 0.95): let it fall the rest

    def __init__(self, num_envs: int, gain: float = 1.0) -> None:
        super().__init__(num_envs, gain)
        self.grasp_xy = np.zeros((num_envs, 2))
        self.integral = np.zeros((num_envs, 2))

    def reset(self, mask: np.ndarray | None = None) -> None:
        super().reset(mask)
        self.integral[slice(None) if mask is None else mask] = 0.0

    def _command(self, i: int, o: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        pose = o[self.object_slice]
        nut = pose[:3]
        nut_axes = rotation_matrix(pose[3:])  # robosuite's quaternions are (x, y, z, w)
        nut_yaw = math.atan2(nut_axes[1, 0], nut_axes[0, 0])  # heading of the handle (local x)
        eef = o[self.eef_index:self.eef_index + 3]
        eef_axes = rotation_matrix(o[self.eef_quat_index:self.eef_quat_index + 4])
        finger_yaw = math.atan2(eef_axes[1, 1], eef_axes[0, 1])  # direction the fingers close along
        handle = nut + self.handle_offset * np.array([math.cos(nut_yaw), math.sin(nut_yaw), 0.0])
        phase = self.phase[i]
        if phase <= 1:  # fingers across the handle: finger axis along the nut's local y (mod pi)
            yaw_err = wrap_angle(nut_yaw + math.pi / 2 - finger_yaw, math.pi)
        else:  # carrying: the nut square to the peg (mod pi/2)
            yaw_err = wrap_angle(-nut_yaw, math.pi / 2)
        rotation = np.array([0.0, 0.0, yaw_err / ROT_SCALE])
        if phase == 5:  # the nut sags in the grasp: tilt the gripper to keep it level going down
            tilt = np.cross(nut_axes[:, 2], [0.0, 0.0, 1.0])
            norm = np.linalg.norm(tilt)
            if norm > self.max_tilt_correction:
                tilt *= self.max_tilt_correction / norm
            rotation = rotation + tilt / ROT_SCALE
        if phase == 0:  # above the handle, turned
            target = handle + np.array([0.0, 0.0, 0.06])
            self.timer[i] += 1
            if (np.linalg.norm(eef - target) < 0.005 and abs(yaw_err) < 0.03) or self.timer[i] > 80:
                self.phase[i], self.timer[i] = 1, 0
            return target, OPEN, rotation
        if phase == 1:  # down onto the handle
            target = handle - np.array([0.0, 0.0, 0.005])
            self.timer[i] += 1
            if np.linalg.norm(eef - target) < 0.006 or self.timer[i] > 40:
                self.phase[i], self.timer[i] = 2, 0
            return target, OPEN, rotation
        if phase == 2:  # close
            self.timer[i] += 1
            if self.timer[i] >= 12:
                self.phase[i], self.timer[i] = 3, 0
                self.grasp_xy[i] = eef[:2]
            return eef, CLOSED, NO_ROTATION
        # where the eef must go for the nut to be centred; the integral removes the controller's steady offset
        error = self.peg - nut[:2]
        if phase >= 4 and np.linalg.norm(error) < 0.015:  # only near the peg, so it cannot wind up
            self.integral[i] = np.clip(self.integral[i] + error, -0.1, 0.1)
        over_peg = eef + np.append(error + self.integral_gain * self.integral[i], 0.0)
        if phase == 3:  # lift straight up from where it grasped
            target = np.array([*self.grasp_xy[i], self.carry_z])
            if eef[2] > self.carry_z - 0.02:
                self.phase[i] = 4
            return target, CLOSED, rotation
        if phase == 4:  # carry the nut over the peg, squared
            target = np.array([over_peg[0], over_peg[1], self.carry_z])
            if np.linalg.norm(error) < 0.003 and abs(yaw_err) < 0.05:
                self.phase[i] = 5
            return target, CLOSED, rotation
        if phase == 5:  # lower it onto the peg
            target = np.array([over_peg[0], over_peg[1], eef[2] - 0.01])
            if nut[2] < self.release_z:
                self.phase[i], self.timer[i] = 6, 0
            return target, CLOSED, rotation
        self.timer[i] += 1
        return eef + np.array([0.0, 0.0, 0.01 * (self.timer[i] > 5)]), OPEN, NO_ROTATION  # let go, then back off


@dataclass(frozen=True, kw_only=True, eq=False)
class NutAssemblySquare(HeldObjectSceneTask):
    def success(self, s: State) -> torch.Tensor:
        rule = self.facts["success"]
        p = s["xpos"][:, self.ids.object_body]
        peg = s["xpos"][:, self.ids.peg_body]
        tol = rule["xy_tolerance"]
        on_peg = ((p[:, 0] - peg[:, 0]).abs() < tol) & ((p[:, 1] - peg[:, 1]).abs() < tol) \
            & (p[:, 2] < rule["table_offset"][2] + rule["z_above_table_max"])
        return on_peg & self.let_go(s)


register(NutAssemblySquare(env_name="NutAssemblySquare", object_dim=14, expert=SquareExpert,
                           warp_buffers=(192, 1024), description="fit the square nut onto its peg"))
