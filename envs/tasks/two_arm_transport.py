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
* **Scripted expert**: :class:`TransportExpert` (the trash and the lid first, then a handover of the hammer over
  the gap between the tables).
* **Difference from robosuite**: robosuite redraws the hammer's head half-size from U(0.015, 0.018) at every
  reset (it rebuilds the model); the shipped scene keeps seed 0's draw in every world.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import mujoco
import numpy as np
import torch

from flowrl.envs.controllers import State
from flowrl.envs.registry import register
from flowrl.envs.tasks.base import Draws
from flowrl.envs.tasks.robosuite_scenes import (
    CLOSED,
    DERIVED_FIELDS,
    OPEN,
    POS_SCALE,
    ROT_SCALE,
    PandaSceneTask,
    _quat_mul,
    quat_xyzw,
    rotation_matrix,
    rotation_vector,
    scene_facts,
)

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
    handle_radius = 0.015
    """robosuite's hammer handle radius r in this task (fixed: its draw is uniform(r, r)); the head half-size is
    drawn from U(r, 1.2 r)."""

    def robosuite_head_halfsize(self, seed: int) -> float:
        """The hammer head's half-size robosuite builds for an episode reset with ``seed`` (its last hammer draw,
        U(r, 1.2 r) of the handle radius r); the shipped scene has ``robosuite_head_halfsize(0)`` in every world."""
        u = np.random.default_rng(seed).uniform(0.0, 1.0, self.hammer_draws)[-1]
        return self.handle_radius * (1.0 + 0.2 * float(u))

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



# -- scripted expert --------------------------------------------------------------------------------------------
class TransportExpert:
    """TwoArmTransport: robot 1 moves the trash into the trash bin while robot 0 lifts the lid off and sets it
    aside; robot 0 then picks the hammer by the handle's end nearer to it and holds it out over the gap, handle
    along y; robot 1 grasps the handle's other end, robot 0 lets go, and robot 1 lowers the hammer into the target
    bin and lets go.

    Each arm keeps its gripper pointing down with its fingers closing across what it grasps (an orientation
    error fed back as OSC_POSE's rotation, in the arm's base frame) and moves toward a target position at up to
    5 cm per step. It keeps a phase per env and arm; the caller resets it (``reset()``) before each batch of
    episodes. A :class:`flowrl.rollout.ChunkPolicy` of one-action chunks.
    """

    obs_history = 1
    act_steps = 1
    carry_z = 1.1
    clear_z = 1.25  # robot 1 carries the hammer, hanging from its end, this high over the bins' walls
    release_z = 0.88  # and lets go with the hammer inside the target bin, near its base
    carry_fingers = np.array([0.0, -1.0, 0.0])  # robot 1's fingers while it carries the hammer: it lies along x
    handover = np.array([0.0, -0.055, 1.05])  # where robot 0 holds its end of the handle
    grasp_offset = 0.055  # each arm's grasp point from the handle's centre, along it
    max_rotation = 0.2  # radians per step
    carry_rotation = 0.06  # radians per step while robot 1 turns the hammer it holds by one end (faster slips)
    robot1_carries = 14  # robot 1's phase from which it holds the hammer alone
    grasps = ({2: 0, 10: 8}, {3: 1, 11: 9})
    """Per arm, its closing phases and the phase each goes back to when it closed on nothing: robot 0's on the lid
    and the hammer, robot 1's on the trash and the hammer."""
    closed_on_nothing = 0.01  # finger opening (m) below which a grasp holds nothing (the thinnest, the lid's handle: 0.02)

    def __init__(self, num_envs: int) -> None:
        facts = scene_facts("TwoArmTransport")
        self.base_rot = [np.asarray(r["controller_origin_site"]["mat"]) for r in facts["robots"]]
        self.phase = np.zeros((num_envs, 2), dtype=np.int64)
        self.timer = np.zeros((num_envs, 2), dtype=np.int64)
        self.lid_drop = np.array([-0.2, -0.45, 0.95])

    def reset(self, mask: np.ndarray | None = None) -> None:
        rows = slice(None) if mask is None else mask
        self.phase[rows], self.timer[rows] = 0, 0

    # -- geometry ------------------------------------------------------------------------------
    @staticmethod
    def _handle_axis(quat_xyzw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The hammer handle's direction (its local z) pointing toward +y, and the horizontal direction across it."""
        axis = rotation_matrix(quat_xyzw)[:, 2]
        axis = axis if axis[1] >= 0 else -axis
        return axis, np.array([axis[1], -axis[0], 0.0])

    def _rotation(self, robot: int, hand_xyzw: np.ndarray, fingers: np.ndarray | None, limit: float,
                  signed: bool) -> np.ndarray:
        """OSC_POSE rotation action (at most ``limit`` radians) turning the hand to point down with its fingers
        closing along ``fingers`` (horizontal; either sign unless ``signed``), or along their present heading
        (None: while closing on or holding something)."""
        current = rotation_matrix(hand_xyzw)
        y = np.array([*current[:2, 1], 0.0]) if fingers is None else fingers
        y = y / np.linalg.norm(y)
        if y @ current[:, 1] < 0 and not signed:
            y = -y
        z = np.array([0.0, 0.0, -1.0])
        target = np.stack([np.cross(y, z), y, z], axis=1)
        error = rotation_vector(target @ current.T)
        norm = np.linalg.norm(error)
        if norm > limit:
            error *= limit / norm
        return self.base_rot[robot].T @ error / ROT_SCALE

    # -- the two arms --------------------------------------------------------------------------
    def _robot0(self, i: int, o: np.ndarray, eef: np.ndarray) -> tuple[np.ndarray, float, np.ndarray | None]:
        """(target position, gripper, finger direction) of robot 0."""
        self.timer[i, 0] += 1
        handle = o[14:17]
        across_lid = np.array([1.0, 0.0, 0.0])  # the lid's handle runs along y
        axis, across_hammer = self._handle_axis(o[3:7])
        grasp = o[0:3] - self.grasp_offset * axis  # the hammer handle's end nearer robot 0
        steps = [  # (target, gripper, fingers, done)
            (handle + [0, 0, 0.08], OPEN, across_lid, lambda: np.linalg.norm(eef - handle - [0, 0, 0.08]) < 0.01),
            (handle, OPEN, across_lid, lambda: np.linalg.norm(eef - handle) < 0.008 or self.timer[i, 0] > 40),
            (handle, CLOSED, None, lambda: self.timer[i, 0] >= 12),
            (np.array([*handle[:2], self.carry_z]), CLOSED, None, lambda: eef[2] > self.carry_z - 0.03),
            (self.lid_drop + [0, 0, 0.1], CLOSED, across_lid, lambda: np.linalg.norm(eef[:2] - self.lid_drop[:2]) < 0.03),
            (self.lid_drop, CLOSED, across_lid, lambda: eef[2] < self.lid_drop[2] + 0.02 or self.timer[i, 0] > 30),
            (eef, OPEN, across_lid, lambda: self.timer[i, 0] >= 8),
            (np.array([*grasp[:2], self.carry_z]), OPEN, across_hammer,
             lambda: np.linalg.norm(eef[:2] - grasp[:2]) < 0.01),
            (grasp + [0, 0, 0.05], OPEN, across_hammer, lambda: np.linalg.norm(eef - grasp - [0, 0, 0.05]) < 0.01),
            (grasp, OPEN, across_hammer, lambda: np.linalg.norm(eef - grasp) < 0.008 or self.timer[i, 0] > 40),
            (grasp, CLOSED, None, lambda: self.timer[i, 0] >= 12),
            (np.array([*eef[:2], self.carry_z]), CLOSED, None, lambda: eef[2] > self.carry_z - 0.03),
            (self.handover, CLOSED, np.array([1.0, 0.0, 0.0]),
             lambda: self.phase[i, 1] >= 13),  # hold until robot 1 has closed on the other end
            (eef, OPEN, np.array([1.0, 0.0, 0.0]), lambda: self.timer[i, 0] >= 10),
            (np.array([0.0, -0.35, self.carry_z]), OPEN, np.array([1.0, 0.0, 0.0]), lambda: False),
        ]
        return self._advance(i, 0, o, steps)

    def _robot1(self, i: int, o: np.ndarray, eef: np.ndarray) -> tuple[np.ndarray, float, np.ndarray | None]:
        """(target position, gripper, finger direction) of robot 1."""
        self.timer[i, 1] += 1
        trash, trash_bin, target_bin = o[7:10], o[24:27], o[21:24]
        faces = rotation_matrix(o[10:14])[:, :2].T  # the cube's x and y axes: either will do
        fingers_now = rotation_matrix(o[53:57])[:, 1]
        across_trash = max(faces, key=lambda f: abs(f @ fingers_now)) * [1.0, 1.0, 0.0]
        axis, across_hammer = self._handle_axis(o[3:7])
        grasp = o[0:3] + self.grasp_offset * axis  # the hammer handle's end nearer robot 1
        payload = o[0:3]
        over_bin = eef + np.append(target_bin[:2] - payload[:2], 0.0)
        waiting = np.array([0.0, 0.2, self.carry_z])
        along_y = self.carry_fingers
        steps = [  # (target, gripper, fingers, done)
            (np.array([*trash[:2], 1.05]), OPEN, across_trash, lambda: np.linalg.norm(eef[:2] - trash[:2]) < 0.01),
            (trash + [0, 0, 0.08], OPEN, across_trash, lambda: np.linalg.norm(eef - trash - [0, 0, 0.08]) < 0.01),
            (trash, OPEN, across_trash, lambda: np.linalg.norm(eef - trash) < 0.008 or self.timer[i, 1] > 40),
            (trash, CLOSED, None, lambda: self.timer[i, 1] >= 12),
            (np.array([*trash[:2], self.carry_z]), CLOSED, None, lambda: eef[2] > self.carry_z - 0.03),
            (np.array([*trash_bin[:2], self.carry_z]), CLOSED, None,
             lambda: np.linalg.norm(eef[:2] - trash_bin[:2]) < 0.02),
            (np.array([*trash_bin[:2], 1.0]), CLOSED, None, lambda: eef[2] < 1.02 or self.timer[i, 1] > 30),
            (eef, OPEN, None, lambda: self.timer[i, 1] >= 8),
            (waiting, OPEN, np.array([1.0, 0.0, 0.0]), lambda: self.phase[i, 0] >= 12 and (  # robot 0 holds it out
                np.linalg.norm(o[41:44] - self.handover) < 0.02 or self.timer[i, 0] > 40)),
            (grasp + [0, 0, 0.06], OPEN, across_hammer,
             lambda: np.linalg.norm(eef - grasp - [0, 0, 0.06]) < 0.01 or self.timer[i, 1] > 40),
            (grasp, OPEN, across_hammer, lambda: np.linalg.norm(eef - grasp) < 0.008 or self.timer[i, 1] > 40),
            (grasp, CLOSED, None, lambda: self.timer[i, 1] >= 12),
            (eef, CLOSED, None, lambda: True),  # one step holding: robot 0 lets go from the next phase on
            (eef, CLOSED, None, lambda: self.phase[i, 0] >= 14),  # robot 0 has let go
            # the hammer hangs from its end: lift it clear of the bin's walls, turn it to lie along x (its centre
            # then needs no reach toward robot 1's base), carry it over the bin, lower it inside
            (np.array([*eef[:2], self.clear_z]), CLOSED, along_y,
             lambda: eef[2] > self.clear_z - 0.03 or self.timer[i, 1] > 30),
            (np.array([*over_bin[:2], self.clear_z]), CLOSED, along_y,
             lambda: np.linalg.norm(payload[:2] - target_bin[:2]) < 0.02 or self.timer[i, 1] > 60),
            (np.array([*over_bin[:2], self.release_z]), CLOSED, along_y,
             lambda: eef[2] < self.release_z + 0.02 or self.timer[i, 1] > 50),
            (eef, OPEN, along_y, lambda: self.timer[i, 1] >= 10),
            (np.array([*eef[:2], self.carry_z]), OPEN, along_y, lambda: False),
        ]
        return self._advance(i, 1, o, steps)

    def _advance(self, i: int, robot: int, o: np.ndarray, steps: list) -> tuple[np.ndarray, float, np.ndarray | None]:
        """The arm's command in its present phase; the next phase once this one is done, or back to the approach
        when a grasp closed on nothing (its fingers shut)."""
        phase = self.phase[i, robot]
        target, gripper, fingers, done = steps[min(phase, len(steps) - 1)]
        if phase < len(steps) - 1 and done():
            fingers_at = 48 if robot == 0 else 57
            missed = o[fingers_at] - o[fingers_at + 1] < self.closed_on_nothing
            retry = self.grasps[robot].get(int(phase))
            self.phase[i, robot] = retry if retry is not None and missed else phase + 1
            self.timer[i, robot] = 0
        return target, gripper, fingers

    def _action(self, i: int, o: np.ndarray) -> np.ndarray:
        action = np.zeros(14)
        for r, (command, eef_at) in enumerate(((self._robot0, 41), (self._robot1, 50))):
            eef = o[eef_at:eef_at + 3]
            target, gripper, fingers = command(i, o, eef)
            delta = self.base_rot[r].T @ (np.asarray(target) - eef) / POS_SCALE
            action[7 * r:7 * r + 3] = np.clip(delta, -1.0, 1.0)
            carrying = r == 1 and self.phase[i, 1] >= self.robot1_carries  # turns the hammer one way, slowly
            rotation = self._rotation(r, o[eef_at + 3:eef_at + 7], fingers,
                                      self.carry_rotation if carrying else self.max_rotation, signed=carrying)
            action[7 * r + 3:7 * r + 6] = np.clip(rotation, -1.0, 1.0)
            action[7 * r + 6] = gripper
        return action

    def act_chunk(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H, obs_dim) histories -> one-action chunks (N, 1, 14) (the expert is deterministic)."""
        return self(obs)

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """(N, obs_dim) -> (N, 14); an (N, H, obs_dim) history -> a one-step chunk (N, 1, 14)."""
        history = obs.dim() == 3
        o = (obs[:, -1] if history else obs).detach().cpu().numpy().astype(np.float64)
        action = torch.as_tensor(np.stack([self._action(i, o[i]) for i in range(len(o))]), dtype=torch.float32)
        return action.unsqueeze(1) if history else action


register(TwoArmTransport(
    env_name="TwoArmTransport", robots=("Panda", "Panda"), object_dim=41, max_episode_steps=800,
    warp_buffers=(256, 1024), expert=TransportExpert, description="two arms hand a hammer over into a bin, trash into another"))
