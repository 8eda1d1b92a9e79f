"""robosuite's TwoArmTransport: two Pandas facing each other across two tables hand a hammer (the payload) from a
lidded start bin into a target bin, whose piece of trash goes into a trash bin (robosuite, and its shipped scene on
cpu and warp).

* **Robots and action** (14): robot 0 (``y < 0``, the start bin's table) then robot 1 (the target and trash bins'
  table), each six OSC_POSE deltas in its own base frame and a gripper
  (:class:`~flowrl.envs.controllers.PandaOSCController` with two arms).
* **Object state** (41), robosuite's order: ``payload_pos``, ``payload_quat``, ``trash_pos``, ``trash_quat``,
  ``lid_handle_pos``, ``lid_handle_quat`` (x y z w, w >= 0, as robosuite's ``mat2quat`` gives them),
  ``target_bin_pos``, ``trash_bin_pos`` (their base geoms), ``payload_in_target_bin``, ``trash_in_trash_bin``
  (0/1), then ``gripper0_to_payload``, ``gripper0_to_lid_handle``, ``gripper1_to_payload``, ``gripper1_to_trash``
  (object minus grip site, read from the same refresh: no one-step lag here).
* **Success**: the payload touches the target bin's base and the trash touches the trash bin's base: robosuite's
  ``check_contact``, any contact between the geom groups. The backends have no contact list per env, so the task
  adds two MuJoCo contact sensors to the model it loads (``data="found"``: the number of matching contacts, of the
  contacts the last physics step computed, as robosuite's ``sim.data.contact`` after its step), which
  ``mujoco.batch`` binds as ``sensordata`` and MuJoCo Warp evaluates in its own kernels. Reward: 1 on success.
* **Reset**: both arms' noise, then robosuite's samplers (each bin at its table's spot within 5 mm, the trash turned
  about z by up to 0.3 pi, the payload about y by pi/2 +- pi/6 composed with one of the hammer's two flips), then
  the lid and payload on the start bin and the trash in the target bin (:meth:`TwoArmTransport.arrange`).
* **MuJoCo Warp's buffers** (256 contacts, 1024 constraint rows per world): the most measured on C MuJoCo at the
  end of any env step over 60 random-action steps of 4 envs were 93 and 297 (three bins on the tables, the lid on
  its bin, both hands).
* **Difference from robosuite**: robosuite redraws the hammer's head half-size from U(0.015, 0.018) at every
  reset (it rebuilds the model); the shipped scene keeps seed 0's draw in every world.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import mujoco
import torch

from flowrl.envs.controllers import State
from flowrl.envs.registry import register
from flowrl.envs.tasks.base import Draws
from flowrl.envs.tasks.robosuite_scenes import DERIVED_FIELDS, PandaSceneTask, _quat_mul, quat_xyzw

CONTACT_CHECKS = ("payload_in_target_bin", "trash_in_trash_bin")
"""robosuite's two contact checks, in observation order; each becomes a contact sensor of that name."""


def _wxyz(q_xyzw: torch.Tensor) -> torch.Tensor:
    return torch.cat([q_xyzw[..., 3:], q_xyzw[..., :3]], dim=-1)


def _positive_w(q: torch.Tensor) -> torch.Tensor:
    """(w, x, y, z) quaternions with w >= 0 (robosuite's ``mat2quat`` sign), in x y z w order."""
    return quat_xyzw(torch.where(q[..., :1] < 0, -q, q))


@dataclass(frozen=True, kw_only=True, eq=False)
class TwoArmTransport(PandaSceneTask):
    derived_fields: tuple[str, ...] = DERIVED_FIELDS + ("geom_xpos", "sensordata")
    cameras: tuple[str, ...] = ("agentview", "shouldercamera0", "shouldercamera1", "robot0_eye_in_hand",
                                "robot1_eye_in_hand")

    def load_model(self) -> mujoco.MjModel:
        """The shipped scene plus one contact sensor per success check (``found``: matching contacts; a sensor
        changes no physics)."""
        spec = mujoco.MjSpec.from_file(self.model)
        for name in CONTACT_CHECKS:
            rule = self.facts["success"][name]
            (geom,) = rule["geoms"]
            sensor = spec.add_sensor()
            sensor.name, sensor.type = name, mujoco.mjtSensor.mjSENS_CONTACT
            sensor.objtype, sensor.objname = mujoco.mjtObj.mjOBJ_GEOM, geom
            sensor.reftype, sensor.refname = mujoco.mjtObj.mjOBJ_BODY, rule["body"]
            sensor.intprm[0], sensor.intprm[1], sensor.intprm[2] = 1, 0, 1  # data "found", no reduction, one slot
        return spec.compile()

    @functools.cached_property
    def model_ids(self) -> dict[str, Any]:
        """Addresses in the task's model (with its contact sensors) that the terms read."""
        model = self.load_model()
        facts = self.facts["transport"]
        geom = functools.partial(mujoco.mj_name2id, model, mujoco.mjtObj.mjOBJ_GEOM)
        body = functools.partial(mujoco.mj_name2id, model, mujoco.mjtObj.mjOBJ_BODY)
        handle = geom(facts["lid_handle_geom"])
        return {"payload": body(facts["payload_body"]), "trash": body(facts["trash_body"]), "lid_handle": handle,
                "lid_body": int(model.geom_bodyid[handle]),
                "handle_quat": tuple(float(v) for v in model.geom_quat[handle]),
                "target_bin_base": geom(facts["target_bin_base_geom"]),
                "trash_bin_base": geom(facts["trash_bin_base_geom"]),
                "sensors": tuple(int(model.sensor_adr[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SENSOR, name)])
                                 for name in CONTACT_CHECKS)}

    def contacts(self, s: State) -> torch.Tensor:
        """(N, 2) bool: robosuite's ``payload_in_target_bin``, ``trash_in_trash_bin``."""
        return s["sensordata"][:, list(self.model_ids["sensors"])] > 0

    # -- reset ---------------------------------------------------------------------------------
    hammer_draws = 5
    """robosuite draws the hammer's handle radius, length, density, friction (fixed: uniform(a, a)) and head size
    from the env's generator when it rebuilds the model at reset, before the arms' noise."""

    def reset(self, draws: Draws, qpos0: torch.Tensor, nv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """robosuite's reset, its generator's draws in its order: the hammer's (unused: the shipped head size is
        kept), the arms' noise, the placements (so a per-env seed gives robosuite's initial state)."""
        draws.uniform(0.0, 1.0, (self.hammer_draws,))
        return super().reset(draws, qpos0, nv)

    def placement_quat(self, obj: dict[str, Any], draws: Draws) -> torch.Tensor:
        """The payload's sampled rotation composed with one of the hammer's two flips, as robosuite composes them
        (its ``quat_multiply`` reads both as x y z w and returns float32; the product is then set as w x y z)."""
        quat = super().placement_quat(obj, draws)
        facts = self.facts["transport"]
        if obj["name"] != facts["arrangement"]["payload"]:
            return quat
        draws.uniform(0.0, 1.0)  # robosuite evaluates init_quat once more (hasattr) and discards that flip
        first = draws.uniform(0.0, 1.0) >= 0.5
        a, b = (draws.tensor(c) for c in facts["payload_init_quat"]["choices_xyzw"])
        flip = torch.where(first.unsqueeze(-1), a, b)
        return quat_xyzw(_quat_mul(_wxyz(quat), _wxyz(flip))).to(torch.float32).to(quat.dtype)

    def arrange(self, qpos: torch.Tensor) -> None:
        """robosuite's reset puts the lid on the start bin, the payload in it and the trash in the target bin: at
        the bin's sampled (x, y), each keeping its own sampled height raised by the bin's height or wall."""
        arrangement = self.facts["transport"]["arrangement"]
        adr = {o["name"]: o["qpos_adr"] for o in self.ids.objects}
        for obj, bin_, lift in (("lid", "start_bin", arrangement["bin_height"]),
                                ("payload", "start_bin", arrangement["start_bin_wall_thickness"]),
                                ("trash", "target_bin", arrangement["target_bin_wall_thickness"])):
            o, b = adr[arrangement[obj]], adr[arrangement[bin_]]
            qpos[:, o:o + 2] = qpos[:, b:b + 2]
            qpos[:, o + 2] += lift

    # -- terms ---------------------------------------------------------------------------------
    def object_state(self, s, memory, eef_pos, hand_quat):
        ids = self.model_ids
        payload, trash = s["xpos"][:, ids["payload"]], s["xpos"][:, ids["trash"]]
        handle = s["geom_xpos"][:, ids["lid_handle"]]
        handle_quat = _quat_mul(s["xquat"][:, ids["lid_body"]],
                                torch.as_tensor(ids["handle_quat"], dtype=payload.dtype, device=payload.device))
        return [payload, _positive_w(s["xquat"][:, ids["payload"]]), trash, _positive_w(s["xquat"][:, ids["trash"]]),
                handle, _positive_w(handle_quat), s["geom_xpos"][:, ids["target_bin_base"]],
                s["geom_xpos"][:, ids["trash_bin_base"]], self.contacts(s).to(payload.dtype),
                payload - eef_pos[:, 0], handle - eef_pos[:, 0], payload - eef_pos[:, 1], trash - eef_pos[:, 1]]

    def success(self, s: State) -> torch.Tensor:
        return self.contacts(s).all(dim=-1)


register(TwoArmTransport(
    env_name="TwoArmTransport", robots=("Panda", "Panda"), object_dim=41, max_episode_steps=800,
    warp_buffers=(256, 1024), description="two arms hand a hammer over into a bin, trash into another"))
