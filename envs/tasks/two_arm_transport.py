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
* **Reset**: the hammer (robosuite rebuilds it at every reset, its head half-size drawn from U(0.015, 0.018):
  :meth:`TwoArmTransport.reset_model`), both arms' noise, then robosuite's samplers (each bin at its table's spot
  within 5 mm, the trash turned about z by up to 0.3 pi, the payload about y by pi/2 +- pi/6 composed with one of
  the hammer's two flips; none reads the hammer's size), then the lid and payload on the start bin and the trash in
  the target bin (:meth:`TwoArmTransport.arrange`). All from the env's generator in robosuite's order, so a per-env
  seed gives robosuite's hammer and initial state.
* **A hammer per world**: at its reset each world's model gets the fields that follow from its head half-size
  (:class:`HammerHead`: the head's geoms and their bounds, the body's mass, centre of mass and inertia, what MuJoCo
  derives from them, the body's bounding volumes): the geoms' sizes, positions and bounding boxes exactly as
  robosuite's compiled model has them, the rest to rounding (within 5e-15 relative; in float32 on warp).
  ``scene.xml`` holds seed 0's hammer, every world's before its first reset.
* **MuJoCo Warp's buffers** (256 contacts, 1024 constraint rows per world): the most measured on C MuJoCo at the
  end of any env step over 60 random-action steps of 4 envs were 93 and 297 (three bins on the tables, the lid on
  its bin, both hands).
* **Scripted expert**: :class:`TransportExpert` (the trash and the lid first, then a handover of the hammer over
  the gap between the tables).
* **Difference from robosuite**: on the cpu backend the solver's tolerance scale (``stat.meaninertia``, the mean
  diagonal of the mass matrix at qpos0), which ``mujoco.batch`` keeps per model rather than per simulation, stays
  seed 0's hammer's: within 1.1e-4 (relative) of the value robosuite compiles for another head.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import mujoco
import numpy as np
import torch

from flowrl.envs.controllers import State
from flowrl.envs.registry import register
from flowrl.envs.tasks.base import Draws, ModelFields, NumpyDraws
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
from flowrl.errors import FlowrlError

CONTACT_CHECKS = ("payload_in_target_bin", "trash_in_trash_bin")
"""robosuite's two contact checks, in observation order; each becomes a contact sensor of that name."""


HAMMER_PARTS = {"head": ((2.0, 1.0, 1.0), 0.0), "neck": ((0.8, 0.2), 2.2), "face": ((1.0, 0.4), 2.8),
                "claw": ((0.7072, 0.95, 0.7072), -2.0)}
"""robosuite's HammerObject (``_get_geom_attrs``): each part of the head as (its geom's size, its x position) in
multiples of the head half-size h. Each part sits at z = handle_length / 2 + h and is a collision geom
``<hammer>_<part>`` with a visual twin ``<hammer>_<part>_vis``."""
_CORNERS = [[(v >> axis & 1) * 2.0 - 1.0 for axis in range(3)] for v in range(8)]


def _solid(geom_type: int, size: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mass (n,), principal moments (n, 3) in the geom's frame) of a solid box or cylinder of sizes (n, 3), with
    the arithmetic of MuJoCo's compiler (``mjCGeom::GetVolume``, ``SetInertia``)."""
    if geom_type == mujoco.mjtGeom.mjGEOM_BOX:
        a, b, c = size.unbind(-1)
        mass = density * (a * b * c * 8)
        aa, bb, cc = a * a, b * b, c * c
        return mass, torch.stack([mass * (bb + cc) / 3, mass * (aa + cc) / 3, mass * (aa + bb) / 3], -1)
    if geom_type == mujoco.mjtGeom.mjGEOM_CYLINDER:
        radius, height = size[:, 0], 2 * size[:, 1]
        mass = density * (math.pi * radius * radius * height)
        side = mass * (3 * radius * radius + height * height) / 12
        return mass, torch.stack([side, side, mass * radius * radius / 2], -1)
    raise FlowrlError(f"the hammer's geoms are boxes and cylinders, not {mujoco.mjtGeom(geom_type).name}")


def _bounds(geom_type: int, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bounding box (n, 6): centre, half-sizes; bounding sphere's radius (n,)) of boxes or cylinders in their
    frames, as MuJoCo's compiler computes them."""
    a, b, c = size.unbind(-1)
    if geom_type == mujoco.mjtGeom.mjGEOM_BOX:
        half, rbound = size, torch.sqrt(a * a + b * b + c * c)
    else:
        half, rbound = torch.stack([a, a, b], -1), torch.sqrt(a * a + b * b)
    return torch.cat([torch.zeros_like(half), half], -1), rbound


def _rotation(quat: np.ndarray) -> np.ndarray:
    mat = np.empty(9)
    mujoco.mju_quat2Mat(mat, quat)
    return mat.reshape(3, 3)


class HammerHead:
    """The model fields of robosuite's hammer that follow from its head half-size h, for many h at once, in
    closed form (robosuite rebuilds the hammer at every reset and MuJoCo compiles it; here nothing is compiled):

    * the head parts' geom sizes and positions, with robosuite's own arithmetic (:data:`HAMMER_PARTS`), and their
      bounding boxes and spheres, with MuJoCo's: the compiled values (a sphere's radius to within the last bit,
      torch's square root being 1 ulp from the correctly rounded one on some CPUs);
    * the body's mass, centre of mass and principal inertia, from the geoms MuJoCo weighs (the compiler's
      ``inertiagrouprange``: the handle and the head's collision geoms, solids at their densities). Every geom lies
      in the body's xz plane and turns only about y, so y is a principal axis; over robosuite's range of h the
      moments in MuJoCo's order (largest first) are y's, then the two of the xz plane, turned about y;
    * what MuJoCo derives from those at qpos0, where the free hammer's frame is the world's: the subtree masses
      (the hammer's, the world's) and the inverse weights of the body and of its joint's dofs;
    * the boxes of the body's bounding-volume hierarchy (C MuJoCo's midphase), in its inertial frame: each node's
      box holds its geoms' boxes (their corners), in the shipped model's tree (the same tree over the range).

    The inertial quantities agree with MuJoCo's compile to rounding (its eigen-solver and factorization).
    """

    FIELDS = ("geom_size", "geom_pos", "geom_aabb", "geom_rbound", "body_mass", "body_ipos", "body_iquat",
              "body_inertia", "body_subtreemass", "body_invweight0", "dof_invweight0", "bvh_aabb")

    def __init__(self, spec: mujoco.MjSpec, model: mujoco.MjModel, hammer: str, body: str) -> None:
        geom = functools.partial(mujoco.mj_name2id, model, mujoco.mjtObj.mjOBJ_GEOM)
        b = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, body)
        self.body = b
        self.dofs = tuple(range(int(model.body_dofadr[b]), int(model.body_dofadr[b] + model.body_dofnum[b])))
        self.parts = {geom(f"{hammer}_{part}{twin}"): part for part in HAMMER_PARTS for twin in ("", "_vis")}
        self.half_length = float(model.geom_size[geom(f"{hammer}_handle"), 2])
        geoms = range(int(model.body_geomadr[b]), int(model.body_geomadr[b] + model.body_geomnum[b]))
        low, high = spec.compiler.inertiagrouprange
        self.weighed = {g: spec.geom(model.geom(g).name).density for g in geoms if low <= model.geom_group[g] <= high}
        self.types = {g: int(model.geom_type[g]) for g in geoms}
        self._shipped = {"size": {g: model.geom_size[g].copy() for g in geoms},
                         "pos": {g: model.geom_pos[g].copy() for g in geoms},
                         "rotation": {g: _rotation(model.geom_quat[g]) for g in geoms}, "corners": _CORNERS}
        self.world_mass = float(model.body_subtreemass[0] - model.body_mass[b])  # all but the hammer
        adr, num = int(model.body_bvhadr[b]), int(model.body_bvhnum[b])
        self.nodes = tuple(range(adr, adr + num))

        def leaves(node: int) -> list[int]:
            children = [int(c) for c in model.bvh_child[adr + node] if c != -1]
            return [g for c in children for g in leaves(c)] if children else [int(model.bvh_nodeid[adr + node])]

        self.node_geoms = [leaves(node) for node in range(num)]

    @functools.cache  # noqa: B019 - a task's hammer lives as long as the task
    def _constants(self, device: torch.device) -> dict[str, Any]:
        """The shipped geoms' sizes, positions and rotation matrices, and a box's corners, as float64 tensors on
        ``device`` (made once per device: no copies to the device at resets)."""
        t = functools.partial(torch.as_tensor, dtype=torch.float64, device=device)
        return {key: {g: t(v) for g, v in value.items()} if isinstance(value, dict) else t(value)
                for key, value in self._shipped.items()}

    def __call__(self, h: torch.Tensor) -> ModelFields:
        """The fields (float64) of hammers with head half-sizes ``h`` (n,)."""
        h = h.to(torch.float64)
        size, pos = self._geometry(h)
        bounds = {g: _bounds(self.types[g], size[g]) for g in self.types}
        mass, com, inertia, turn = self._inertia(size, pos)
        c, s = torch.cos(turn / 2), torch.sin(turn / 2)
        iquat = math.sqrt(0.5) * torch.stack([c, s, s, c], -1)  # a turn about y after a quarter turn about z
        zero = torch.zeros_like(turn)
        frame = torch.stack([torch.stack([zero, -torch.cos(turn), torch.sin(turn)], -1),  # iquat's matrix
                             torch.stack([zero + 1, zero, zero], -1),
                             torch.stack([zero, torch.sin(turn), torch.cos(turn)], -1)], -2)
        # inverse weights at qpos0 (means of diagonals): of the body at its centre of mass (1 / mass, inverse
        # inertia), of the free joint's dofs at the body's origin (its translations also turn the body about the
        # centre of mass: + tr([com]x inverse [com]x^T) = |com|^2 tr(inverse) - com . inverse com)
        rotational = (1 / inertia).sum(-1) / 3
        inverse = frame @ torch.diag_embed(1 / inertia) @ frame.transpose(-1, -2)  # in the body's frame
        lever = (com * com).sum(-1) * inverse.diagonal(dim1=-2, dim2=-1).sum(-1)
        translational = 1 / mass + (lever - torch.einsum("ni,nij,nj->n", com, inverse, com)) / 3

        parts, b = tuple(self.parts), (self.body,)
        return {"geom_size": (parts, torch.stack([size[g] for g in parts], 1)),
                "geom_pos": (parts, torch.stack([pos[g] for g in parts], 1)),
                "geom_aabb": (parts, torch.stack([bounds[g][0] for g in parts], 1)),
                "geom_rbound": (parts, torch.stack([bounds[g][1] for g in parts], 1)),
                "body_mass": (b, mass[:, None]), "body_ipos": (b, com[:, None]), "body_iquat": (b, iquat[:, None]),
                "body_inertia": (b, inertia[:, None]),
                "body_subtreemass": ((0, self.body), torch.stack([self.world_mass + mass, mass], -1)),
                "body_invweight0": (b, torch.stack([1 / mass, rotational], -1)[:, None]),
                "dof_invweight0": (self.dofs, torch.stack([translational] * 3 + [rotational] * 3, -1)),
                "bvh_aabb": (self.nodes, self._bvh(pos, bounds, com, frame))}

    def _geometry(self, h: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Every geom's size and position (n, 3), by geom id: the head's parts as robosuite computes them."""
        shipped = self._constants(h.device)
        n, zero = len(h), torch.zeros_like(h)
        size = {g: v.expand(n, 3) for g, v in shipped["size"].items()}
        pos = {g: v.expand(n, 3) for g, v in shipped["pos"].items()}
        for g, part in self.parts.items():
            scale, x = HAMMER_PARTS[part]
            size[g] = torch.stack([h * k for k in scale] + [zero] * (3 - len(scale)), -1)
            pos[g] = torch.stack([h * x, zero, self.half_length + h], -1)
        return size, pos

    def _inertia(self, size: dict[int, torch.Tensor], pos: dict[int, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(mass (n,), centre of mass (n, 3), principal moments (n, 3) in MuJoCo's order, the angle (n,) about y
        of the principal axes in the xz plane) of the weighed geoms."""
        solids = {g: _solid(self.types[g], size[g], density) for g, density in self.weighed.items()}
        mass = sum(m for m, _ in solids.values())
        com = sum(m[:, None] * pos[g] for g, (m, _) in solids.items()) / mass[:, None]
        rotation = self._constants(com.device)["rotation"]
        eye = torch.eye(3, dtype=com.dtype, device=com.device)
        tensor = 0  # about the centre of mass, in the body's frame
        for g, (m, moments) in solids.items():
            r, d = rotation[g], pos[g] - com
            offset = (d * d).sum(-1)[:, None, None] * eye - d[:, :, None] * d[:, None, :]
            tensor = tensor + r @ torch.diag_embed(moments) @ r.T + m[:, None, None] * offset
        xx, yy, zz, xz = tensor[:, 0, 0], tensor[:, 1, 1], tensor[:, 2, 2], tensor[:, 0, 2]
        mid, gap = (xx + zz) / 2, torch.hypot((xx - zz) / 2, xz)
        return mass, com, torch.stack([yy, mid + gap, mid - gap], -1), 0.5 * torch.atan2(-2 * xz, xx - zz)

    def _bvh(self, pos: dict[int, torch.Tensor], bounds: dict[int, tuple[torch.Tensor, torch.Tensor]],
             com: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        """(n, nodes, 6) the body's bounding-volume boxes (centre, half-sizes) in its inertial frame (``com``,
        ``frame``): each the box around the corners of its geoms' boxes, as MuJoCo's compiler builds them."""
        shipped = self._constants(com.device)
        points = {}
        for g in {g for geoms in self.node_geoms for g in geoms}:
            aabb = bounds[g][0]
            local = aabb[:, None, :3] + shipped["corners"] * aabb[:, None, 3:]
            points[g] = (local @ shipped["rotation"][g].T + (pos[g] - com)[:, None]) @ frame
        nodes = []
        for geoms in self.node_geoms:
            inside = torch.cat([points[g] for g in geoms], 1)
            low, high = inside.amin(1), inside.amax(1)
            nodes.append(torch.cat([(high + low) / 2, (high - low) / 2], -1))
        return torch.stack(nodes, 1)


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
    varied_model_fields = HammerHead.FIELDS

    @functools.cached_property
    def hammer(self) -> HammerHead:
        """The payload's model fields as functions of its head half-size."""
        spec = mujoco.MjSpec.from_file(self.model)
        facts = self.facts["transport"]
        return HammerHead(spec, spec.compile(), facts["arrangement"]["payload"], facts["payload_body"])

    def draw_head_halfsize(self, draws: Draws) -> torch.Tensor:
        """(n,) hammer head half-sizes, drawn as robosuite draws its hammer's when it rebuilds the model at a reset:
        the handle's radius r, length, density and friction (each fixed), then the head's from U(r, 1.2 r)."""
        draws.uniform(0.0, 1.0, (self.hammer_draws - 1,))
        r = self.handle_radius
        return draws.uniform(r, r * 1.2)

    def robosuite_head_halfsize(self, seed: int) -> float:
        """The hammer head's half-size robosuite builds for an episode reset with ``seed``, which a world reset with
        that seed has too."""
        return float(self.draw_head_halfsize(NumpyDraws([np.random.default_rng(seed)]))[0])

    def reset_model(self, draws: Draws) -> ModelFields:
        """Each fresh episode's hammer (:meth:`draw_head_halfsize`) as per-world model fields (:class:`HammerHead`);
        the backends then draw :meth:`reset`'s arms' noise and placements from the same generators, as robosuite
        does after rebuilding the hammer (so a per-env seed gives robosuite's hammer and initial state)."""
        return self.hammer(self.draw_head_halfsize(draws))

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
