"""robosuite 1.5.2 on MuJoCo >= 3.10: the two places it breaks, replaced at import time.

1. ``MjModel.get_joint_qpos_addr`` / ``get_joint_qvel_addr`` assert
   ``joint_type in (mjJNT_HINGE, mjJNT_SLIDE)``; from MuJoCo 3.12 the enum no longer compares
   equal to the numpy integer stored in ``jnt_type``, so every env construction fails. Ours maps
   the type through ``int()`` and looks the width up in a table.
2. ``Controller.update`` calls ``mj_fullM(m, dst, d.qM)``; MuJoCo 3.10 changed the signature to
   ``mj_fullM(m, d, dst)`` and 3.11 removed ``MjData.qM``. Ours computes the same state with the
   new call.

Each replacement is feature-detected (a no-op where robosuite already works) and idempotent.
Every process that builds a robosuite env must call :func:`apply` (worker processes included).
"""

from __future__ import annotations

import logging
from typing import Any

import mujoco
import numpy as np

_QPOS_WIDTH = {int(mujoco.mjtJoint.mjJNT_FREE): 7, int(mujoco.mjtJoint.mjJNT_BALL): 4,
               int(mujoco.mjtJoint.mjJNT_SLIDE): 1, int(mujoco.mjtJoint.mjJNT_HINGE): 1}
_QVEL_WIDTH = {int(mujoco.mjtJoint.mjJNT_FREE): 6, int(mujoco.mjtJoint.mjJNT_BALL): 3,
               int(mujoco.mjtJoint.mjJNT_SLIDE): 1, int(mujoco.mjtJoint.mjJNT_HINGE): 1}
_applied: dict[str, bool] = {}


def _address(model: Any, name: str, table: dict[int, int], field: str) -> int | tuple[int, int]:
    joint = model.joint_name2id(name)
    start = int(getattr(model, field)[joint])
    width = table[int(model.jnt_type[joint])]
    return start if width == 1 else (start, start + width)


def _get_joint_qpos_addr(self: Any, name: str) -> int | tuple[int, int]:
    """qpos address of a joint: an int for 1-dof joints, else (start, end)."""
    return _address(self, name, _QPOS_WIDTH, "jnt_qposadr")


def _get_joint_qvel_addr(self: Any, name: str) -> int | tuple[int, int]:
    """qvel (dof) address of a joint: an int for 1-dof joints, else (start, end)."""
    return _address(self, name, _QVEL_WIDTH, "jnt_dofadr")


def _controller_update(self: Any, force: bool = False) -> None:
    """robosuite's ``Controller.update`` with the MuJoCo >= 3.10 mass-matrix call."""
    if not (self.new_update or force):
        return
    if force or not self.lite_physics:
        self.sim.forward()
    if self.ref_name is not None:
        self.update_reference_data()
    self.joint_pos = np.array(self.sim.data.qpos[self.qpos_index])
    self.joint_vel = np.array(self.sim.data.qvel[self.qvel_index])
    nv = self.sim.model.nv
    full = np.zeros((nv, nv), dtype=np.float64)
    mujoco.mj_fullM(self.sim.model._model, self.sim.data._data, full)
    self.mass_matrix = full[self.qvel_index, :][:, self.qvel_index]
    self.new_update = False


def _has_qm() -> bool:
    return hasattr(mujoco.MjData, "qM")


def _enum_compares_with_numpy() -> bool:
    return bool(mujoco.mjtJoint.mjJNT_HINGE == np.int32(int(mujoco.mjtJoint.mjJNT_HINGE)))


def apply() -> dict[str, bool]:
    """Install the replacements this MuJoCo needs (and quiet robosuite's routine log lines, see
    :func:`quiet_logs`); returns which replacements are active."""
    quiet_logs()
    from robosuite.controllers.parts import controller
    from robosuite.utils import binding_utils

    if not _enum_compares_with_numpy() and not _applied.get("joint_addr"):
        binding_utils.MjModel.get_joint_qpos_addr = _get_joint_qpos_addr
        binding_utils.MjModel.get_joint_qvel_addr = _get_joint_qvel_addr
        _applied["joint_addr"] = True
    if not _has_qm() and not _applied.get("full_mass_matrix"):
        controller.Controller.update = _controller_update
        _applied["full_mass_matrix"] = True
    return {"joint_addr": _applied.get("joint_addr", False),
            "full_mass_matrix": _applied.get("full_mass_matrix", False)}


def self_check(task: str = "Lift", steps: int = 5) -> dict[str, Any]:
    """Build ``task`` with a Panda under OSC_POSE, step it, and check what the replacements feed:
    joint address tables against the model, and a symmetric positive-definite arm mass matrix."""
    import robosuite

    active = apply()
    env = robosuite.make(task, robots="Panda", has_renderer=False, has_offscreen_renderer=False,
                         use_camera_obs=False, horizon=steps + 1)
    try:
        env.reset()
        for _ in range(steps):
            env.step(np.zeros(env.action_dim))
        model = env.sim.model
        robot = env.robots[0]
        for name in robot.robot_joints:
            j = model.joint_name2id(name)
            assert model.get_joint_qpos_addr(name) == int(model.jnt_qposadr[j]), name
            assert model.get_joint_qvel_addr(name) == int(model.jnt_dofadr[j]), name
        mass = robot.part_controllers["right"].mass_matrix
        symmetric = bool(np.allclose(mass, mass.T, atol=1e-10))
        positive = bool(np.linalg.eigvalsh(0.5 * (mass + mass.T)).min() > 0)
        if not (symmetric and positive):
            raise AssertionError("arm mass matrix is not symmetric positive definite")
        return {"mujoco": mujoco.__version__, "robosuite": robosuite.__version__, "replacements": active,
                "task": task, "steps": steps, "mass_matrix_shape": list(mass.shape)}
    finally:
        env.close()


class _DropRoutineRecords(logging.Filter):
    """robosuite's import-time notices (no private macro file, robosuite_models and mink not installed:
    neither is used by flowrl's Panda tasks) and its INFO lines; its errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_logs() -> None:
    """Keep robosuite's routine log lines out of flowrl's output (call before importing robosuite;
    idempotent): only its errors get through."""
    logger = logging.getLogger("robosuite_logs")  # the logger robosuite configures on import
    if not any(isinstance(f, _DropRoutineRecords) for f in logger.filters):
        logger.addFilter(_DropRoutineRecords())
