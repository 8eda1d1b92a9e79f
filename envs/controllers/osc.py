"""Batched operational-space control (OSC_POSE) with robosuite 1.5.2's semantics, in torch.

robosuite drives its Panda through the BASIC composite controller: an ``OSC_POSE`` arm controller
(``robosuite/controllers/parts/arm/osc.py``) and a gripper controller. This module re-implements the
arm part for N environments at once (tensors ``(N, ...)``, float64 or float32, any device), written
from robosuite's source; ``tests/test_osc.py`` checks it against robosuite's own torques.

What robosuite does, and what :class:`OSCPose` does, per control step (20 Hz) and physics substep
(500 Hz, 25 per control step; robosuite runs them as ``mj_step1`` -> controller -> ``mj_step2``):

Once per control step, :meth:`OSCPose.set_goal` (robosuite ``OperationalSpaceController.set_goal``
with ``input_type="delta"``, ``input_ref_frame="base"``, goal update mode ``"achieved"``):

1. ``scaled = (clip(action, input_min, input_max) - input_mid) * scale + output_mid`` with
   ``scale = |output_max - output_min| / |input_max - input_min|`` (defaults: +-1 -> +-0.05 m, +-0.5 rad).
2. Position goal, relative to the *current* end effector (not to the previous goal): in the
   controller's base frame (origin ``o``, rotation ``O``: the ``robot0_right_center`` site),
   ``goal_pos_base = O^T (p_eef - o) + scaled[:3]``; the world goal used by the torques is
   ``o + O goal_pos_base``. robosuite re-reads ``o``, ``O`` at every substep; the Panda's base is fixed, so
   :meth:`OSCPose.set_goal` computes the world goals once (call :meth:`OSCPose.set_origin` first if it moves).
3. Orientation goal: ``R_delta`` from the axis-angle ``scaled[3:]`` (robosuite's ``axisangle2quat``
   then ``quat2mat``; a zero vector gives the identity), ``goal_ori_base = R_delta O^T R_eef``, world
   goal ``O goal_ori_base``. So the delta rotation is applied on the left (a rotation about base-frame
   axes) of the current end-effector orientation. robosuite's ``quat2mat`` is numba-compiled and rounds
   through float32: the quaternion is cast to float32, its squared norm is a float32 BLAS dot
   (OpenBLAS: float32 products summed in double), the products ``q q^T`` are float32, the diagonal
   ``1 - q_i^2 - q_j^2`` is evaluated in double and the off-diagonal sums/differences in float32.
   ``robosuite_rounding=True`` (the default) reproduces this bit for bit, so float64 torques match
   robosuite's to ~1e-11 N m rather than ~1e-5 (a float32 rounding of the delta, times kp and the inertia).

At every substep, :meth:`OSCPose.torques` (robosuite ``run_controller``, then the robot's clip):

4. Errors: ``e_pos = goal_pos - p_eef``; ``e_ori = 0.5 * sum_i (R_eef[:, i] x R_goal[:, i])``
   (robosuite ``orientation_error(desired, current)``); velocities ``v = J qdot`` (site Jacobian
   times the arm joint velocities: robosuite's ``get_site_xvelp/xvelr`` are ``jac @ qvel``) minus the
   base site's velocity (zero for a fixed base).
5. ``F = kp[:3] e_pos - kd[:3] v_lin``, ``T = kp[3:] e_ori - kd[3:] v_ang``, ``kd = 2 sqrt(kp) damping_ratio``.
6. ``M^-1 = inv(M)`` (arm block of the mass matrix, dense ``mj_fullM``), ``Lambda_full =
   pinv(J M^-1 J^T)`` (6x6), ``Lambda_pos = pinv(J_p M^-1 J_p^T)``, ``Lambda_ori = pinv(J_r M^-1 J_r^T)``
   (3x3 each); robosuite's ``pinv`` zeroes singular values below 1e-15 of the largest.
7. ``uncouple_pos_ori=True`` (robosuite's default): wrench ``[Lambda_pos F, Lambda_ori T]``;
   otherwise ``Lambda_full [F, T]``.
8. ``tau = J^T wrench + qfrc_bias`` (the arm's gravity + Coriolis/centrifugal compensation).
9. Nullspace: ``Jbar = M^-1 J^T Lambda_full``, ``N = I - Jbar J``, ``tau += N^T M (10 (q0 - q) -
   2 sqrt(10) qdot)`` toward ``q0``, the arm's joint positions when the controller was created:
   robosuite re-creates its controllers at every reset, after drawing the initial-posture noise, so
   ``q0`` is the episode's (noisy) initial arm qpos, not the nominal ``init_qpos``.
10. The robot clips the torques to the arm actuators' ``ctrlrange`` (Panda: +-80 N m for joints
    1-5, +-12 N m for 6-7) and writes them to ``ctrl`` (motors, gear 1). robosuite's controller does
    not clip itself; :meth:`OSCPose.torques` clips unless ``clip=False``.

One robosuite quirk is left to the caller: a controller created at reset skips its first state update,
so the first substep of an episode uses the mass matrix from when it was created, before the reset set
the finger joints (fingers at the model's qpos0 = 0, not +-0.020833; the arm block differs by ~1e-4 and
that substep's torques by a few 1e-3 N m). To reproduce it, pass the arm block of M computed with the
fingers at 0 as ``mass`` for that one substep (``tests/test_osc.py`` does; the trajectory then follows
robosuite's to ~1e-15 instead of ~1e-7 after 20 control steps).

Where the inputs come from, per substep (after positions and velocities are computed: ``mj_step1``):

* C MuJoCo / ``mujoco.batch`` (MuJoCo 4): ``Batch(model, nsim, nthread, persistent=True)``;
  ``batch.step(stage=mujoco.mjtStage.mjSTAGE_VEL)`` advances one substep and then computes the
  position and velocity stages at the new state (as ``mj_step1``; a persistent batch continues its
  next step from them, so this costs nothing extra). After it, ``bind("site_xpos")``,
  ``bind("site_xmat")``, ``bind("xanchor")``, ``bind("xaxis")``, ``bind("qfrc_bias")`` and
  ``bind("M")`` are current; write the torques into ``bind("ctrl")`` (a view of the state rows) before
  the next ``step``. ``qM`` is gone from MjData (MuJoCo >= 3.11); ``M`` is the CSR mass matrix
  (``model.M_rowadr``, ``M_rownnz``, ``M_colind``, lower triangle with the diagonal), bindable;
  :func:`mass_matrix_index` turns it into a dense arm block with one gather. ``qLD`` is bindable too,
  but it is a factor. ``mujoco.mj_fullM(m, d, dst)`` (MuJoCo >= 3.10 signature: model, data, dense
  output) needs an MjData, so it serves single-env code and tests. ``Batch.jac(body, point)``
  gives full (n, 3, nv) Jacobians but re-runs kinematics per simulation; :func:`site_jacobian`
  computes the arm's from the bound ``xanchor``/``xaxis``/``site_xpos`` instead (hinge joints:
  ``J_p[:, j] = a_j x (p - anchor_j)``, ``J_r[:, j] = a_j``), equal to ``mj_jacSite`` to ~1e-16.
* MuJoCo Warp (float32): ``d.site_xpos``, ``d.site_xmat``, ``d.xanchor``, ``d.xaxis``,
  ``d.qfrc_bias``, ``d.qpos``, ``d.qvel`` and ``d.M`` (CSR, ``(nworld, nC)``, same layout as C
  MuJoCo's ``M`` for the same model, so :func:`mass_matrix_index` from the C ``MjModel`` applies) are
  zero-copy torch tensors via ``wp.to_torch``. ``mujoco_warp.jac(m, d, jacp, jacr, point, body)``
  (kernel over worlds x dofs, from ``subtree_com`` and ``cdof``) fills preallocated
  ``(nworld, 3, nv)`` arrays; :func:`site_jacobian` needs no extra kernel. A per-substep hook: either
  ``mjw.step1(m, d)`` -> torques -> ``d.ctrl`` -> ``mjw.step2(m, d)``, or ``m.callback.control``, which
  ``mjw.step``/``forward`` call after the velocity stage (M, qfrc_bias and kinematics current). Under
  CUDA-graph capture, write into the captured ``d.ctrl`` with ``copy_`` and run the torch ops on
  Warp's stream.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowrl.errors import FlowrlError

Tensor = torch.Tensor


@dataclass(frozen=True)
class OSCConfig:
    """robosuite 1.5.2's default Panda OSC_POSE parameters (``controllers/config/robots/default_panda.json``)."""

    kp: tuple[float, ...] = (150.0,) * 6
    damping_ratio: float = 1.0
    input_max: tuple[float, ...] = (1.0,) * 6
    input_min: tuple[float, ...] = (-1.0,) * 6
    output_max: tuple[float, ...] = (0.05, 0.05, 0.05, 0.5, 0.5, 0.5)
    output_min: tuple[float, ...] = (-0.05, -0.05, -0.05, -0.5, -0.5, -0.5)
    uncouple_pos_ori: bool = True
    nullspace_kp: float = 10.0  # robosuite's nullspace_torques(joint_kp=10); kv = 2 sqrt(kp)
    torque_min: tuple[float, ...] = (-80.0, -80.0, -80.0, -80.0, -80.0, -12.0, -12.0)
    torque_max: tuple[float, ...] = (80.0, 80.0, 80.0, 80.0, 80.0, 12.0, 12.0)
    origin_pos: tuple[float, ...] = (-0.56, 0.0, 0.912)  # robot0_right_center in Lift; per scene in scene.json
    origin_rot: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    @property
    def kd(self) -> tuple[float, ...]:
        return tuple(2.0 * math.sqrt(k) * self.damping_ratio for k in self.kp)

    @classmethod
    def from_scene(cls, scene: str | Path | dict[str, Any], robot: int = 0) -> OSCConfig:
        """From a ``scene.json`` written by ``envs/assets/make_robosuite_scenes.py`` (a path or the dict), for its
        robot number ``robot`` (the robots share the gains; each has its own base frame)."""
        facts = json.loads(Path(scene).read_text()) if isinstance(scene, (str, Path)) else scene
        osc, origin = facts["osc"], facts["robots"][robot]["controller_origin_site"]
        expected = {"impedance_mode": "fixed", "input_type": "delta", "input_ref_frame": "base",
                    "goal_update_mode": "achieved", "interpolation": None, "position_limits": None,
                    "orientation_limits": None}
        if any(osc.get(k, v) != v for k, v in expected.items()):
            raise FlowrlError("OSCPose implements robosuite's fixed-impedance delta OSC_POSE in the base frame with "
                              f"'achieved' goal updates and no interpolation or limits; the scene asks for {osc}")
        return cls(kp=tuple(osc["kp"]), damping_ratio=float(osc["damping_ratio"]),
                   input_max=tuple(osc["input_max"]), input_min=tuple(osc["input_min"]),
                   output_max=tuple(osc["output_max"]), output_min=tuple(osc["output_min"]),
                   uncouple_pos_ori=bool(osc["uncouple_pos_ori"]), nullspace_kp=float(osc["nullspace_joint_kp"]),
                   torque_min=tuple(osc["torque_min"]), torque_max=tuple(osc["torque_max"]),
                   origin_pos=tuple(origin["pos"]), origin_rot=tuple(tuple(r) for r in origin["mat"]))


# ----------------------------------------------------------------------------------------------------------
# rotations


def delta_rotation(axis_angle: Tensor, robosuite_rounding: bool = True) -> Tensor:
    """(..., 3) axis-angle -> (..., 3, 3) rotation, as robosuite's ``quat2mat(axisangle2quat(v))``.

    ``axisangle2quat`` (float64): angle ``|v|``, exactly zero -> identity quaternion, else
    ``(v/|v| sin(angle/2), cos(angle/2))``. ``quat2mat`` (numba): see the module docstring; with
    ``robosuite_rounding`` its float32 steps are reproduced, else the matrix is computed in the input dtype.
    """
    dtype = axis_angle.dtype
    angle = torch.linalg.vector_norm(axis_angle, dim=-1, keepdim=True)
    nonzero = angle > 0
    axis = axis_angle / torch.where(nonzero, angle, torch.ones_like(angle))
    half = 0.5 * angle
    q = torch.cat([torch.cos(half), axis * torch.sin(half)], dim=-1)  # w, x, y, z
    identity = torch.zeros_like(q)
    identity[..., 0] = 1.0
    q = torch.where(nonzero, q, identity)
    if not robosuite_rounding:
        q = q * torch.sqrt(2.0 / (q * q).sum(-1, keepdim=True))
        qq = q.unsqueeze(-1) * q.unsqueeze(-2)
        one = torch.ones_like(qq[..., 0, 0])
        return _matrix_from_outer(qq, one - qq[..., 2, 2] - qq[..., 3, 3], one - qq[..., 1, 1] - qq[..., 3, 3],
                                  one - qq[..., 1, 1] - qq[..., 2, 2])
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    q32 = q.to(torch.float32)
    sq = q32 * q32  # float32 products ...
    n = sq.to(torch.float64).sum(-1, keepdim=True).to(torch.float32)  # ... summed in double (OpenBLAS sdot)
    scale = torch.sqrt(2.0 / n.to(torch.float64))  # numba: float64 literal / float32 -> float64
    q32 = (q32.to(torch.float64) * scale).to(torch.float32)
    qq = q32.unsqueeze(-1) * q32.unsqueeze(-2)  # np.outer in float32
    qw = qq.to(wide)
    one = torch.ones_like(qw[..., 0, 0])
    diag = (one - qw[..., 2, 2] - qw[..., 3, 3], one - qw[..., 1, 1] - qw[..., 3, 3],
            one - qw[..., 1, 1] - qw[..., 2, 2])
    return _matrix_from_outer(qq, *diag).to(dtype)


def _matrix_from_outer(qq: Tensor, d0: Tensor, d1: Tensor, d2: Tensor) -> Tensor:
    """Rotation matrix from the outer product of a scaled (w, x, y, z) quaternion; off-diagonals in qq's dtype."""
    wide = d0.dtype
    rows = [
        [d0, (qq[..., 1, 2] - qq[..., 3, 0]).to(wide), (qq[..., 1, 3] + qq[..., 2, 0]).to(wide)],
        [(qq[..., 1, 2] + qq[..., 3, 0]).to(wide), d1, (qq[..., 2, 3] - qq[..., 1, 0]).to(wide)],
        [(qq[..., 1, 3] - qq[..., 2, 0]).to(wide), (qq[..., 2, 3] + qq[..., 1, 0]).to(wide), d2],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def orientation_error(desired: Tensor, current: Tensor) -> Tensor:
    """robosuite's ``orientation_error``: ``0.5 * sum_i current[:, i] x desired[:, i]`` ((..., 3, 3) -> (..., 3))."""
    return 0.5 * torch.linalg.cross(current, desired, dim=-2).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# operational-space matrices


def _pinv_sym(a: Tensor) -> Tensor:
    """numpy.linalg.pinv (rcond 1e-15) of symmetric positive semi-definite matrices."""
    return torch.linalg.pinv(a, rtol=1e-15, hermitian=True)


def _inv(a: Tensor) -> Tensor:
    """LU inverse without ``inv``'s singularity check: that check is a host sync over the batch (milliseconds per
    call on CPU) and cannot run inside a CUDA graph."""
    return torch.linalg.inv_ex(a)[0]


LAMBDA_INVERSES = ("pinv", "inv")


def opspace_matrices(mass: Tensor, jac: Tensor, lambda_inverse: str = "pinv"
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """robosuite's ``opspace_matrices``: (Lambda_full, Lambda_pos, Lambda_ori, nullspace N, M^-1).

    ``lambda_inverse``: ``"pinv"`` inverts the task-space matrices as robosuite does (numpy's pinv, through an
    eigendecomposition); ``"inv"`` with an LU inverse, equal away from kinematic singularities (where both give
    torques beyond the actuators' range) and free of host syncs, so the controller can be captured in a CUDA graph.
    """
    mass_inv = _inv(mass)  # positive definite
    jm = jac @ mass_inv  # (N, 6, n)
    lam_full_inv = jm @ jac.transpose(-1, -2)
    lam_pos_inv = jm[..., :3, :] @ jac[..., :3, :].transpose(-1, -2)
    lam_ori_inv = jm[..., 3:, :] @ jac[..., 3:, :].transpose(-1, -2)
    if lambda_inverse not in LAMBDA_INVERSES:
        raise FlowrlError(f"lambda_inverse {lambda_inverse!r}: expected one of {LAMBDA_INVERSES}")
    invert = _pinv_sym if lambda_inverse == "pinv" else _inv
    lam_full, lam_pos, lam_ori = invert(lam_full_inv), invert(lam_pos_inv), invert(lam_ori_inv)
    jbar = mass_inv @ jac.transpose(-1, -2) @ lam_full  # (N, n, 6)
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
    nullspace = eye - jbar @ jac
    return lam_full, lam_pos, lam_ori, nullspace, mass_inv


# ----------------------------------------------------------------------------------------------------------
# the controller


class OSCPose:
    """robosuite's OSC_POSE for ``num_envs`` arms (see the module docstring for the order of operations).

    Per episode: :meth:`reset` with the initial arm posture (the nullspace target). Per control step:
    :meth:`set_goal`. Per physics substep: :meth:`torques` -> the arm actuators' ``ctrl``.
    ``lambda_inverse``: see :func:`opspace_matrices` (``"inv"`` for CUDA-graph capture).
    """

    def __init__(self, config: OSCConfig | None = None, num_envs: int = 1, n_joints: int = 7,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
                 robosuite_rounding: bool = True, lambda_inverse: str = "pinv") -> None:
        if lambda_inverse not in LAMBDA_INVERSES:
            raise FlowrlError(f"lambda_inverse {lambda_inverse!r}: expected one of {LAMBDA_INVERSES}")
        self.config = config or OSCConfig()
        self.lambda_inverse = lambda_inverse
        self.num_envs, self.n_joints = num_envs, n_joints
        self.device, self.dtype = torch.device(device), dtype
        self.robosuite_rounding = robosuite_rounding
        c, t = self.config, (lambda v: torch.as_tensor(v, dtype=dtype, device=self.device))
        if len(c.torque_min) != n_joints:
            raise FlowrlError(f"OSCPose: {len(c.torque_min)} torque limits for {n_joints} joints")
        self.kp, self.kd = t(c.kp), t(c.kd)
        self.input_min, self.input_max = t(c.input_min), t(c.input_max)
        in_min, in_max, out_min, out_max = (torch.as_tensor(v, dtype=torch.float64) for v in
                                            (c.input_min, c.input_max, c.output_min, c.output_max))
        # computed in float64 as robosuite does, then cast
        self.action_scale = t((out_max - out_min).abs() / (in_max - in_min).abs())
        self.action_output_mid = t((out_max + out_min) / 2.0)
        self.action_input_mid = t((in_max + in_min) / 2.0)
        self.torque_min, self.torque_max = t(c.torque_min), t(c.torque_max)
        self.nullspace_kp = c.nullspace_kp
        self.nullspace_kv = 2.0 * math.sqrt(c.nullspace_kp)
        self.origin_pos = t(c.origin_pos).expand(num_envs, 3).clone()
        self.origin_rot = t(c.origin_rot).expand(num_envs, 3, 3).clone()
        self.goal_pos = torch.zeros(num_envs, 3, dtype=dtype, device=self.device)  # world frame
        self.goal_rot = torch.eye(3, dtype=dtype, device=self.device).expand(num_envs, 3, 3).clone()
        self.initial_joint = torch.zeros(num_envs, n_joints, dtype=dtype, device=self.device)

    def _rows(self, env_ids: Tensor | None) -> Any:
        return slice(None) if env_ids is None else env_ids

    def reset(self, initial_joint: Tensor, eef_pos: Tensor, eef_rot: Tensor, env_ids: Tensor | None = None) -> None:
        """Episode start (robosuite re-creates the controller and calls ``reset_goal``): the nullspace target is
        the current arm posture, the goal the current pose. Rows ``env_ids`` (all when None)."""
        rows = self._rows(env_ids)
        self.initial_joint[rows] = initial_joint.to(self.dtype)
        self.goal_pos[rows] = eef_pos.to(self.dtype)
        self.goal_rot[rows] = eef_rot.to(self.dtype)

    def set_origin(self, origin_pos: Tensor, origin_rot: Tensor, env_ids: Tensor | None = None) -> None:
        """The controller's base frame (robosuite ``update_origin``: the ``robot0_right_center`` site)."""
        rows = self._rows(env_ids)
        self.origin_pos[rows] = origin_pos.to(self.dtype)
        self.origin_rot[rows] = origin_rot.to(self.dtype)

    def scale_action(self, action: Tensor) -> Tensor:
        """robosuite's ``Controller.scale_action``: clip to the input range, map linearly to the output range."""
        a = torch.clamp(action.to(self.dtype), self.input_min, self.input_max)
        return (a - self.action_input_mid) * self.action_scale + self.action_output_mid

    def set_goal(self, action: Tensor, eef_pos: Tensor, eef_rot: Tensor) -> None:
        """Once per control step, from the state of its first substep: (N, 6) actions, (N, 3) grip-site position,
        (N, 3, 3) grip-site rotation (world)."""
        delta = self.scale_action(action)
        o, rot = self.origin_pos, self.origin_rot
        rot_t = rot.transpose(-1, -2)
        eef_pos, eef_rot = eef_pos.to(self.dtype), eef_rot.to(self.dtype)
        goal_pos_base = (rot_t @ (eef_pos - o).unsqueeze(-1)).squeeze(-1) + delta[:, :3]
        goal_rot_base = delta_rotation(delta[:, 3:], self.robosuite_rounding) @ (rot_t @ eef_rot)
        # in place: the buffers keep their storage (CUDA-graph capture keeps raw pointers)
        self.goal_pos.copy_(o + (rot @ goal_pos_base.unsqueeze(-1)).squeeze(-1))
        self.goal_rot.copy_(rot @ goal_rot_base)

    def torques(self, eef_pos: Tensor, eef_rot: Tensor, jac: Tensor, mass: Tensor, bias: Tensor, qpos: Tensor,
                qvel: Tensor, origin_vel: Tensor | None = None, clip: bool = True) -> Tensor:
        """Arm torques (N, n) at one substep.

        eef_pos (N, 3), eef_rot (N, 3, 3): grip site; jac (N, 6, n): its [translational; rotational] Jacobian
        over the arm's dofs; mass (N, n, n): arm block of the mass matrix; bias (N, n): the arm's
        ``qfrc_bias``; qpos, qvel (N, n): arm joints; origin_vel (N, 6): the base site's [linear, angular]
        velocity (zero, the default, for a fixed base). ``clip``: clip to the actuators' torque range.
        """
        dt = self.dtype
        jac, mass, bias, qpos, qvel = (x.to(dt) for x in (jac, mass, bias, qpos, qvel))
        pos_err = self.goal_pos - eef_pos.to(dt)
        ori_err = orientation_error(self.goal_rot, eef_rot.to(dt))
        vel = (jac @ qvel.unsqueeze(-1)).squeeze(-1)
        if origin_vel is not None:
            vel = vel - origin_vel.to(dt)
        force = self.kp[:3] * pos_err - self.kd[:3] * vel[:, :3]
        torque = self.kp[3:] * ori_err - self.kd[3:] * vel[:, 3:]
        lam_full, lam_pos, lam_ori, nullspace, _ = opspace_matrices(mass, jac, self.lambda_inverse)
        if self.config.uncouple_pos_ori:
            wrench = torch.cat([(lam_pos @ force.unsqueeze(-1)).squeeze(-1),
                                (lam_ori @ torque.unsqueeze(-1)).squeeze(-1)], dim=-1)
        else:
            wrench = (lam_full @ torch.cat([force, torque], -1).unsqueeze(-1)).squeeze(-1)
        tau = (jac.transpose(-1, -2) @ wrench.unsqueeze(-1)).squeeze(-1) + bias
        pose = self.nullspace_kp * (self.initial_joint - qpos) - self.nullspace_kv * qvel
        pose_torques = (mass @ pose.unsqueeze(-1)).squeeze(-1)
        tau = tau + (nullspace.transpose(-1, -2) @ pose_torques.unsqueeze(-1)).squeeze(-1)
        if clip:
            tau = torch.clamp(tau, self.torque_min, self.torque_max)
        return tau


# ----------------------------------------------------------------------------------------------------------
# inputs from batches of MuJoCo states


def site_jacobian(xanchor: Tensor, xaxis: Tensor, site_pos: Tensor) -> Tensor:
    """(N, 6, n) [translational; rotational] Jacobian of a point ``site_pos`` (N, 3) over a chain of n hinge
    joints with world anchors ``xanchor`` (N, n, 3) and unit axes ``xaxis`` (N, n, 3), all ancestors of the
    point's body (Panda: joints 1-7 for the grip site). Column j: ``[a_j x (p - anchor_j); a_j]``, what
    ``mj_jacSite`` gives for these dofs."""
    lin = torch.linalg.cross(xaxis, site_pos.unsqueeze(-2) - xanchor, dim=-1)
    return torch.cat([lin, xaxis], dim=-1).transpose(-1, -2)


def mass_matrix_index(model: Any, dofs: Sequence[int]) -> Tensor:
    """(n, n) int64 indices into MjData.M (CSR, ``model.M_rowadr/M_rownnz/M_colind``: each row's columns <= the
    row, diagonal included) such that ``M[..., index]`` is the dense (symmetric) block of ``dofs``; -1 marks
    a structural zero (none for a serial arm). Works for ``mujoco.batch``'s ``bind("M")`` and MuJoCo Warp's
    ``d.M`` (same layout)."""
    dofs = [int(d) for d in dofs]
    index = torch.full((len(dofs), len(dofs)), -1, dtype=torch.int64)
    for a, i in enumerate(dofs):
        for b, j in enumerate(dofs):
            row, col = max(i, j), min(i, j)
            start, nnz = int(model.M_rowadr[row]), int(model.M_rownnz[row])
            for k in range(start, start + nnz):
                if int(model.M_colind[k]) == col:
                    index[a, b] = k
    return index


def gather_mass_matrix(m_csr: Tensor, index: Tensor) -> Tensor:
    """Dense (N, n, n) block from a (N, nC) CSR mass matrix and :func:`mass_matrix_index`."""
    index = index.to(m_csr.device)
    dense = m_csr[:, index.clamp(min=0).reshape(-1)].reshape(m_csr.shape[0], *index.shape)
    return torch.where(index >= 0, dense, torch.zeros_like(dense))


@dataclass
class ArmIndices:
    """Addresses of the arm and its grip site in a MuJoCo model (C ``MjModel``; the same for MuJoCo Warp)."""

    joint_ids: Tensor  # (n,) joints, for xanchor / xaxis
    qpos_adr: Tensor  # (n,)
    dof_adr: Tensor  # (n,)
    site_id: int
    mass_index: Tensor  # (n, n) into M

    @classmethod
    def from_model(cls, model: Any, joint_names: Sequence[str], site_name: str) -> ArmIndices:
        import mujoco

        ids = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, n) for n in joint_names]
        if min(ids) < 0:
            raise FlowrlError(f"joints {list(joint_names)} not all in the model")
        for j in ids:
            if int(model.jnt_type[j]) != int(mujoco.mjtJoint.mjJNT_HINGE):
                raise FlowrlError("site_jacobian assumes hinge joints")
        site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, site_name)
        if site < 0:
            raise FlowrlError(f"site {site_name} not in the model")
        dofs = [int(model.jnt_dofadr[j]) for j in ids]
        return cls(torch.as_tensor(ids), torch.as_tensor([int(model.jnt_qposadr[j]) for j in ids]),
                   torch.as_tensor(dofs), site, mass_matrix_index(model, dofs))

    def to(self, device: str | torch.device) -> ArmIndices:
        """A copy with the index tensors on ``device``: :meth:`state` then copies nothing from the host, as CUDA-graph
        capture requires."""
        move = (lambda t: t.to(device))
        return ArmIndices(move(self.joint_ids), move(self.qpos_adr), move(self.dof_adr), self.site_id,
                          move(self.mass_index))

    def state(self, qpos: Tensor, qvel: Tensor, xanchor: Tensor, xaxis: Tensor, site_xpos: Tensor, site_xmat: Tensor,
              qfrc_bias: Tensor, m_csr: Tensor) -> dict[str, Tensor]:
        """The inputs :meth:`OSCPose.torques` needs, from batched MjData-shaped fields ((N, nq), (N, nv),
        (N, njnt, 3), (N, njnt, 3), (N, nsite, 3), (N, nsite, 9), (N, nv), (N, nC)): ``mujoco.batch`` binds
        or MuJoCo Warp arrays as torch tensors."""
        dev = qpos.device
        j, s = self.joint_ids.to(dev), self.site_id
        eef_pos = site_xpos[:, s]
        return {"eef_pos": eef_pos, "eef_rot": site_xmat[:, s].reshape(-1, 3, 3),
                "jac": site_jacobian(xanchor[:, j], xaxis[:, j], eef_pos),
                "mass": gather_mass_matrix(m_csr, self.mass_index), "bias": qfrc_bias[:, self.dof_adr.to(dev)],
                "qpos": qpos[:, self.qpos_adr.to(dev)], "qvel": qvel[:, self.dof_adr.to(dev)]}
