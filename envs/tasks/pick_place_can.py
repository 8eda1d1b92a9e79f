"""robosuite's PickPlaceCan: a Panda moves a can from one bin to its place in another (robosuite, and its
shipped scene on cpu and warp).

* **Object state** (14): the can's pose seen from the hand one step late, then its own pose
  (:class:`~flowrl.envs.tasks.robosuite_scenes.HeldObjectSceneTask`). robosuite's other three objects are cleared.
* **Success**: the can strictly inside its bin quarter (and below 0.1 above the bin floor) with the grip site
  farther than ``atanh(0.4)/10`` from it.
* **Scripted expert**: pick the can, carry it above its quarter of the right bin, lower it and let go.

Contacts and constraint rows measured on C MuJoCo (most at the end of any env step over 4 scripted-expert
episodes of 250 steps): 26/113.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowrl.envs.controllers import State
from flowrl.envs.registry import register
from flowrl.envs.tasks.robosuite_scenes import HeldObjectSceneTask, PickPlaceExpert


class CanExpert(PickPlaceExpert):
    """PickPlaceCan: the can into its quadrant of the right bin (robosuite's target placement)."""

    object_slice = slice(7, 10)  # object-state: Can_to_robot0_eef_pos, _quat, then Can_pos, Can_quat
    eef_index = 14
    goal = np.array([0.1975, 0.4025, 0.8])
    grasp_offset = np.array([0.0, 0.0, 0.0])
    lift_height = 0.2


@dataclass(frozen=True, kw_only=True, eq=False)
class PickPlaceCan(HeldObjectSceneTask):
    def success(self, s: State) -> torch.Tensor:
        rule = self.facts["success"]
        p = s["xpos"][:, self.ids.object_body]
        inside = self.let_go(s)
        for axis, key in enumerate(("x_range", "y_range", "z_range")):
            lo, hi = rule[key]
            inside = inside & (p[:, axis] > lo) & (p[:, axis] < hi)
        return inside


register(PickPlaceCan(env_name="PickPlaceCan", object_dim=14, expert=CanExpert, warp_buffers=(64, 512),
                      description="move a can from one bin to its place in another"))
