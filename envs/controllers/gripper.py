"""robosuite 1.5.2's Panda gripper control, batched in torch.

robosuite's ``PandaGripper.format_action`` keeps a per-episode state ``s`` (two fingers, zero at reset)
and, once per control step (the composite controller's ``set_goal``), moves it by the *sign* of the
one-dimensional action: ``s = clip(s + [-1, 1] * 0.2 * sign(a), -1, 1)``. So +1 closes and -1 opens at
0.2 per control step (5 steps from open to closed), and the magnitude of the action does not matter.
Its ``GRIP`` controller (``SimpleGripController``) then clips ``s`` to [-1, 1] (input range = output
range, so the scaling is the identity) and maps it to the finger actuators' control range:
``ctrl = mid(ctrlrange) + half_width(ctrlrange) * s``; the robot clips that to ``ctrlrange`` and writes
it to ``ctrl`` (position actuators, kp 1000: finger 1 in [0, 0.04], finger 2 in [-0.04, 0]). The value
is constant over the control step's physics substeps.
"""

from __future__ import annotations

from typing import Any

import torch

from flowrl.errors import FlowrlError

Tensor = torch.Tensor

PANDA_FINGER_CTRLRANGE = ((0.0, 0.04), (-0.04, 0.0))


class PandaGripper:
    """``num_envs`` Panda grippers: :meth:`reset` per episode, :meth:`step` once per control step -> (N, 2) ctrl."""

    def __init__(self, num_envs: int = 1, ctrlrange: Any = PANDA_FINGER_CTRLRANGE, speed: float = 0.2,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> None:
        self.num_envs, self.speed, self.dtype = num_envs, float(speed), dtype
        self.device = torch.device(device)
        rng = torch.as_tensor(ctrlrange, dtype=torch.float64)
        if rng.shape != (2, 2):
            raise FlowrlError(f"PandaGripper: ctrlrange of shape {tuple(rng.shape)}, expected (2, 2)")
        self.ctrl_low = rng[:, 0].to(dtype=dtype, device=self.device)
        self.ctrl_high = rng[:, 1].to(dtype=dtype, device=self.device)
        self.bias = (0.5 * (rng[:, 1] + rng[:, 0])).to(dtype=dtype, device=self.device)
        self.weight = (0.5 * (rng[:, 1] - rng[:, 0])).to(dtype=dtype, device=self.device)
        self.direction = torch.tensor([-1.0, 1.0], dtype=dtype, device=self.device)
        self.state = torch.zeros(num_envs, 2, dtype=dtype, device=self.device)

    @classmethod
    def from_scene(cls, facts: dict[str, Any], **kwargs: Any) -> PandaGripper:
        """From a scene.json dict written by ``envs/assets/make_robosuite_scenes.py``."""
        return cls(ctrlrange=facts["gripper"]["ctrlrange"], speed=facts["gripper"]["speed"], **kwargs)

    def reset(self, env_ids: Tensor | None = None) -> None:
        if env_ids is None:
            self.state.zero_()
        else:
            self.state[env_ids] = 0.0

    def step(self, action: Tensor) -> Tensor:
        """(N,) or (N, 1) gripper actions -> (N, 2) finger controls for this control step."""
        a = action.to(device=self.device, dtype=self.dtype).reshape(self.num_envs, 1)
        self.state.copy_(torch.clamp(self.state + self.direction * self.speed * torch.sign(a), -1.0, 1.0))
        ctrl = self.bias + self.weight * torch.clamp(self.state, -1.0, 1.0)
        return torch.clamp(ctrl, self.ctrl_low, self.ctrl_high)
