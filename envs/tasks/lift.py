"""robosuite's Lift: a Panda lifts a cube off the table (robosuite, and its shipped scene on cpu and warp).

* **Object state** (10): ``cube_pos``, ``cube_quat`` (x y z w), ``gripper_to_cube_pos`` (``cube_pos - eef_pos``
  despite its name).
* **Success**: the cube above the table by 0.04. Reward: robosuite's 2.25 scaled by ``reward_scale / 2.25``.
* **Difference from robosuite**: robosuite draws the cube's half-sizes from U(0.020, 0.022) at every reset; we
  keep the shipped nominal cube (the one in ``scene.xml``) in every world.
* **Scripted expert**: hover above the cube, descend, grasp, lift.

Contacts and constraint rows measured on C MuJoCo (most at the end of any env step over 4 scripted-expert
episodes of 250 steps): 18/69; MuJoCo Warp's buffers of 64/512 held 4096 worlds on an H200 without overflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowrl.envs.controllers import State
from flowrl.envs.registry import register
from flowrl.envs.tasks.robosuite_scenes import PandaSceneTask, PickPlaceExpert, quat_xyzw


class LiftExpert(PickPlaceExpert):
    """Lift: pick the cube and hold it up."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Lift(PandaSceneTask):
    reward_scale = 2.25 * (1.0 / 2.25)

    def object_state(self, s, memory, eef_pos, hand_quat):
        body = self.ids.object_body
        cube_pos = s["xpos"][:, body]
        return [cube_pos, quat_xyzw(s["xquat"][:, body]), cube_pos - eef_pos[:, 0]]

    def success(self, s: State) -> torch.Tensor:
        rule = self.facts["success"]
        return s["xpos"][:, self.ids.object_body, 2] > rule["table_offset"][2] + rule["z_above_table"]


register(Lift(env_name="Lift", object_dim=10, description="lift a cube off the table", expert=LiftExpert,
              warp_buffers=(64, 512)))
