"""robosuite's BASIC composite controller of a Panda, batched: OSC_POSE for the arm, the Panda gripper.

The per-substep controller (:class:`flowrl.envs.controllers.base.Controller`) the robosuite scenes run on
the cpu and warp backends, built from a shipped scene's facts (``scene.json``, written by
``envs/assets/make_robosuite_scenes.py``): which joints, site and actuators are the arm's and the
gripper's, and the controller's gains and limits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from flowrl.envs.controllers.base import State
from flowrl.envs.controllers.gripper import PandaGripper
from flowrl.envs.controllers.osc import ArmIndices, OSCConfig, OSCPose


@contextlib.contextmanager
def one_torch_thread(device: torch.device) -> Iterator[None]:
    """On CPU, the controller's tiny batched linear algebra runs on one torch thread: torch's OpenMP pool and
    mujoco.batch's worker threads otherwise fight over the cores at every substep (measured on 2 cores: 5x
    slower env steps). Restores the caller's setting."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class PandaOSCController:
    """robosuite's BASIC composite controller of the Panda for N envs: OSC_POSE for the arm, the Panda gripper.

    The action is (N, 7): the OSC_POSE deltas, then the gripper. Besides the protocol's methods it has
    :meth:`reset`, which the backends call after they reset envs (robosuite re-creates its controllers at every
    reset: the nullspace target becomes the episode's initial arm posture and the gripper state goes back to 0).
    """

    def __init__(self, facts: dict[str, Any], model: Any, num_envs: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        robot = facts["robot"]
        self.arm = ArmIndices.from_model(model, robot["arm_joints"]["names"], robot["eef_site"]["name"]).to(device)
        # on a GPU the controller runs inside a CUDA graph, which the eigendecomposition behind robosuite's pinv
        # cannot join (it checks its result on the host)
        self.osc = OSCPose(OSCConfig.from_scene(facts), num_envs=num_envs, device=device, dtype=dtype,
                           lambda_inverse="inv" if torch.device(device).type == "cuda" else "pinv")
        self.gripper = PandaGripper.from_scene(facts, num_envs=num_envs, device=device, dtype=dtype)
        self.arm_act = torch.as_tensor(robot["arm_actuators"]["ids"], device=device)
        self.grip_act = torch.as_tensor(robot["gripper_actuators"]["ids"], device=device)
        self.out = torch.zeros(num_envs, model.nu, dtype=dtype, device=device)

    def _inputs(self, s: State) -> dict[str, torch.Tensor]:
        return self.arm.state(s["qpos"], s["qvel"], s["xanchor"], s["xaxis"], s["site_xpos"], s["site_xmat"],
                              s["qfrc_bias"], s["M"])

    def reset(self, state: State, env_ids: torch.Tensor) -> None:
        """Envs ``env_ids`` start an episode at the (forwarded) ``state``."""
        x = self._inputs(state)
        ids = env_ids.to(self.out.device)
        self.osc.reset(x["qpos"][ids], x["eef_pos"][ids], x["eef_rot"][ids], env_ids=ids)
        self.gripper.reset(ids)

    def set_goal(self, state: State, action: torch.Tensor) -> None:
        with one_torch_thread(self.out.device):
            x = self._inputs(state)
            action = action.to(self.out.dtype)
            self.osc.set_goal(action[:, :6], x["eef_pos"], x["eef_rot"])
            self.out[:, self.grip_act] = self.gripper.step(action[:, 6])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        o = self.osc
        return {"goal_pos": o.goal_pos, "goal_rot": o.goal_rot, "initial_joint": o.initial_joint,
                "origin_pos": o.origin_pos, "origin_rot": o.origin_rot, "gripper": self.gripper.state, "ctrl": self.out}

    def ctrl(self, state: State) -> torch.Tensor:
        with one_torch_thread(self.out.device):
            x = self._inputs(state)
            self.out[:, self.arm_act] = self.osc.torques(x["eef_pos"], x["eef_rot"], x["jac"], x["mass"], x["bias"],
                                                         x["qpos"], x["qvel"])
        return self.out
