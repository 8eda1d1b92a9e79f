"""Scripted experts for robosuite's manipulation tasks (Panda, OSC_POSE deltas).

They read the flattened robomimic low-dim observation of robosuite's tasks (:mod:`flowrl.envs.tasks.manipulation`)
(sorted keys: ``object`` first, then ``robot0_eef_pos``, ``robot0_eef_quat``,
``robot0_gripper_qpos``) and keep a phase per env; the caller resets them (``reset()``) before
each batch of episodes, as collection and the benchmark do. Each is a
:class:`flowrl.rollout.ChunkPolicy` of one-action chunks. The PointReach demonstrator is here too.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial.transform import Rotation

OPEN, CLOSED = -1.0, 1.0
POS_SCALE = 0.05  # metres per unit of OSC_POSE position action (robosuite's default output_max)
ROT_SCALE = 0.5  # radians per unit of OSC_POSE rotation action (axis-angle in the base frame)
NO_ROTATION = np.zeros(3)


class PickPlaceExpert:
    """Pick an object and, where the task has a goal, carry it there and let go.

    Phases per env: hover above the object, descend around it, close the gripper, lift, then
    (pick-and-place tasks) move above the goal at lifting height, lower, and open.
    """

    object_slice = slice(0, 3)  # the object's position in the observation
    obs_history = 1
    act_steps = 1
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

    def _command(self, i: int, o: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """One env's (eef position target, gripper, rotation action (3,)) from its observation."""
        target, gripper = self._target(i, o[self.object_slice], o[self.eef_index:self.eef_index + 3])
        return target, gripper, NO_ROTATION

    def act_chunk(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H, obs_dim) histories -> one-action chunks (N, 1, act_dim) (the expert is deterministic)."""
        return self(obs)

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """(N, obs_dim) -> (N, act_dim); an (N, H, obs_dim) history -> a one-step chunk (N, 1, act_dim)."""
        history = obs.dim() == 3
        o = (obs[:, -1] if history else obs).detach().cpu().numpy()
        eef = o[:, self.eef_index:self.eef_index + 3]
        targets, grippers, rotations = zip(*(self._command(i, o[i]) for i in range(len(o))))
        delta = np.clip(self.gain * (np.stack(targets) - eef) / POS_SCALE, -1.0, 1.0)
        rotation = np.clip(np.stack(rotations), -1.0, 1.0)
        action = np.concatenate([delta, rotation, np.array(grippers)[:, None]], axis=1)
        action = torch.as_tensor(action, dtype=torch.float32)
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
        nut_axes = Rotation.from_quat(pose[3:]).as_matrix()  # robosuite's quaternions are (x, y, z, w)
        nut_yaw = math.atan2(nut_axes[1, 0], nut_axes[0, 0])  # heading of the handle (local x)
        eef = o[self.eef_index:self.eef_index + 3]
        eef_axes = Rotation.from_quat(o[self.eef_quat_index:self.eef_quat_index + 4]).as_matrix()
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


EXPERTS = {"robosuite/Lift": LiftExpert, "robosuite/PickPlaceCan": CanExpert,
           "robosuite/NutAssemblySquare": SquareExpert}


def write_demonstrations(path: str, episodes: int = 64, seed: int = 0, noise: float = 0.05) -> None:
    """Scripted demonstrations of PointReach (slow, slightly noisy) in our dataset layout."""
    from flowrl.datasets import Episodes, write_dataset
    from flowrl.envs.tasks.point_reach import HORIZON, PointReachEnv, scripted_action

    env = PointReachEnv(episodes, seed=seed)
    obs = env.reset()
    gen = torch.Generator().manual_seed(seed)
    keys = ("observations", "actions", "rewards", "terminated", "truncated")
    steps: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for _ in range(HORIZON):
        action = (scripted_action(obs) + noise * torch.randn(obs.shape[0], 2, generator=gen, dtype=torch.float64))
        action = action.clamp(-1.0, 1.0).float()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for k, v in zip(keys, (obs, action, reward, terminated, truncated)):
            steps[k].append(v.numpy())
        obs = next_obs
    eps = [{k: np.stack(v)[:, i] for k, v in steps.items()} for i in range(episodes)]
    write_dataset(path, Episodes.from_list(eps, {"task": "PointReach", "policy": {"kind": "scripted", "speed": 0.4,
                                                                              "noise": noise}}))
