"""Batched robot controllers in torch with robosuite 1.5.2's semantics (no robosuite at run time).

:class:`Controller` is the protocol the MuJoCo backends run between a policy's action and the actuators.
:class:`OSCPose` is robosuite's OSC_POSE arm controller and :class:`PandaGripper` its Panda gripper
mapping, for N environments at once; :class:`PandaOSCController` combines them as robosuite's BASIC
composite controller of a Panda; :class:`ArmIndices`, :func:`site_jacobian` and
:func:`mass_matrix_index` get their inputs from batches of MuJoCo states (``mujoco.batch`` binds or
MuJoCo Warp arrays). See :mod:`flowrl.envs.controllers.osc` for the order of operations.
"""

from flowrl.envs.controllers.base import Controller, State
from flowrl.envs.controllers.gripper import PandaGripper
from flowrl.envs.controllers.osc import (
    ArmIndices,
    OSCConfig,
    OSCPose,
    delta_rotation,
    gather_mass_matrix,
    mass_matrix_index,
    opspace_matrices,
    orientation_error,
    site_jacobian,
)
from flowrl.envs.controllers.panda import PandaOSCController

__all__ = ["ArmIndices", "Controller", "OSCConfig", "OSCPose", "PandaGripper", "PandaOSCController", "State",
           "delta_rotation", "gather_mass_matrix", "mass_matrix_index", "opspace_matrices", "orientation_error",
           "site_jacobian"]
