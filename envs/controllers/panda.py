"""robosuite's BASIC composite controller of one or more Pandas, batched: OSC_POSE for each arm, the Panda gripper.

The per-substep controller (:class:`flowrl.envs.controllers.base.Controller`) the robosuite scenes run on
the cpu and warp backends, built from a shipped scene's facts (``scene.json``, written by
``envs/assets/make_robosuite_scenes.py``): which joints, site and actuators are each robot's arm's and
gripper's, each arm's base frame, and the controllers' gains and limits (the same for every robot).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from flowrl.envs.controllers.base import State
from flowrl.envs.controllers.gripper import PandaGripper
from flowrl.envs.controllers.osc import ArmIndices, OSCConfig, OSCPose

ROBOT_ACTION_DIM = 7
"""One robot's action: six OSC_POSE deltas, then the gripper."""


@contextlib.contextmanager
def one_torch_thread(device: torch.device) -> Iterator[None]:
    """On CPU, the controller's tiny batched linear algebra runs on one torch thread: torch's OpenMP pool and
    mujoco.batch's worker threads otherwise fight over the cores at every substep, which makes env steps several
    times slower. Restores the caller's setting."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Robot:
    """One Panda: its arm's addresses, OSC_POSE, gripper, actuator ids and state-tensor name prefix."""

    arm: ArmIndices
    osc: OSCPose
    gripper: PandaGripper
    arm_act: torch.Tensor
    grip_act: torch.Tensor
    prefix: str


class PandaOSCController:
    """robosuite's BASIC composite controller of the scene's Pandas for N envs: OSC_POSE for each arm, the Panda
    gripper.

    The action is (N, 7 R) for R robots, robosuite's order: robot 0's six OSC_POSE deltas and gripper, then
    robot 1's. Besides the protocol's methods it has :meth:`reset`, which the backends call after they reset envs
    (robosuite re-creates its controllers at every reset: the nullspace target becomes the episode's initial arm
    posture and the gripper state goes back to 0). The per-env state tensors of robot 0 keep their plain names
    (``goal_pos``, ...), robot r's are prefixed ``robot{r}.``.
    """

    def __init__(self, facts: dict[str, Any], model: Any, num_envs: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        device = torch.device(device)
        self.robots: list[_Robot] = []
        for r, robot in enumerate(facts["robots"]):
            # on a GPU the controller runs inside a CUDA graph, which the eigendecomposition behind robosuite's
            # pinv cannot join (it checks its result on the host)
            osc = OSCPose(OSCConfig.from_scene(facts, robot=r), num_envs=num_envs, device=device, dtype=dtype,
                          lambda_inverse="inv" if device.type == "cuda" else "pinv")
            self.robots.append(_Robot(
                arm=ArmIndices.from_model(model, robot["arm_joints"]["names"], robot["eef_site"]["name"]).to(device),
                osc=osc, gripper=PandaGripper.from_scene(facts, num_envs=num_envs, device=device, dtype=dtype),
                arm_act=torch.as_tensor(robot["arm_actuators"]["ids"], device=device),
                grip_act=torch.as_tensor(robot["gripper_actuators"]["ids"], device=device),
                prefix="" if r == 0 else f"robot{r}."))
        self.act_dim = ROBOT_ACTION_DIM * len(self.robots)
        self.out = torch.zeros(num_envs, model.nu, dtype=dtype, device=device)

    @staticmethod
    def _inputs(robot: _Robot, s: State) -> dict[str, torch.Tensor]:
        return robot.arm.state(s["qpos"], s["qvel"], s["xanchor"], s["xaxis"], s["site_xpos"], s["site_xmat"],
                               s["qfrc_bias"], s["M"])

    def reset(self, state: State, env_ids: torch.Tensor) -> None:
        """Envs ``env_ids`` start an episode at the (forwarded) ``state``."""
        ids = env_ids.to(self.out.device)
        for robot in self.robots:
            x = self._inputs(robot, state)
            robot.osc.reset(x["qpos"][ids], x["eef_pos"][ids], x["eef_rot"][ids], env_ids=ids)
            robot.gripper.reset(ids)

    def set_goal(self, state: State, action: torch.Tensor) -> None:
        with one_torch_thread(self.out.device):
            action = action.to(self.out.dtype)
            for r, robot in enumerate(self.robots):
                x = self._inputs(robot, state)
                a = action[:, ROBOT_ACTION_DIM * r:ROBOT_ACTION_DIM * (r + 1)]
                robot.osc.set_goal(a[:, :6], x["eef_pos"], x["eef_rot"])
                self.out[:, robot.grip_act] = robot.gripper.step(a[:, 6])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"ctrl": self.out}
        for robot in self.robots:
            o, p = robot.osc, robot.prefix
            tensors.update({f"{p}goal_pos": o.goal_pos, f"{p}goal_rot": o.goal_rot, f"{p}initial_joint": o.initial_joint,
                            f"{p}origin_pos": o.origin_pos, f"{p}origin_rot": o.origin_rot,
                            f"{p}gripper": robot.gripper.state})
        return tensors

    def ctrl(self, state: State) -> torch.Tensor:
        with one_torch_thread(self.out.device):
            for robot in self.robots:
                x = self._inputs(robot, state)
                self.out[:, robot.arm_act] = robot.osc.torques(x["eef_pos"], x["eef_rot"], x["jac"], x["mass"],
                                                               x["bias"], x["qpos"], x["qvel"])
        return self.out
