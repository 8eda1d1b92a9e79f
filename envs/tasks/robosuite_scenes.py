"""robosuite's manipulation tasks: what they share, on robosuite itself and on shipped scenes of ours.

A :class:`RobosuiteTask` runs in robosuite, one worker process per env (:mod:`flowrl.envs.backends.robosuite`),
with robomimic's low-dimensional observation: its keys concatenated in sorted key order (the order the robomimic
dataset reader uses): ``object`` (the task's object state), then per robot the end effector's position and
quaternion (x, y, z, w) and the gripper's finger joint positions. Its layout and action are derived from the
robots and the object state's size.

A :class:`PandaSceneTask` also runs on our ``cpu`` (mujoco.batch, float64) and ``warp`` (MuJoCo Warp) backends
with no robosuite at run time, on the scene shipped in ``envs/assets/robosuite/<env_name>/`` (robosuite 1.5.2's
compiled model, with ``scene.json`` holding the facts read from robosuite: controller parameters, names,
placement samplers, success thresholds), driven by :class:`flowrl.envs.controllers.PandaOSCController` at
robosuite's timing (20 Hz control, 25 physics substeps of 2 ms). robosuite stays its first backend, so ``auto``
keeps using it on a CPU machine and picks warp on CUDA. Each task's file (``lift.py``, ``pick_place_can.py``,
``nut_assembly_square.py``, ``two_arm_transport.py``) states its object state, success and scripted expert; what
they share, from robosuite's source:

* **Action** (7 per robot, robot 0 first): ``[0:6]`` OSC_POSE deltas in the robot's base frame, ``[6]`` the
  gripper (its sign), bounds [-1, 1]. The goal is set once per env step from the state the step starts in, torques recomputed before every
  substep (robosuite's ``mj_step1`` -> controller -> ``mj_step2``; our backends forward, compute, ``mj_step``).
* **Observation**: robomimic's low-dim keys in sorted order, as the ``robosuite`` backend flattens them:
  ``object`` (robosuite's ``object-state``), then per robot ``robot0_eef_pos`` (grip site), ``robot0_eef_quat``
  (the hand *body*'s quaternion, x y z w, as robosuite <= 1.5 reports it), ``robot0_gripper_qpos``.
  Like robosuite after ``env.step``, positions come from the kinematics computed at the start of the last physics
  substep (MuJoCo's ``mj_step`` leaves them so, as robosuite's ``mj_step2`` does), the gripper's joint positions
  from the final state. robosuite's object-to-hand sensors (:class:`HeldObjectSceneTask`) read the object's pose
  from its observation cache before the object's own sensors refresh it: the relative pose is that of the object
  *one env step earlier* seen from the hand now, and all zeros (position and quaternion) in an episode's first
  observation, whose cache is empty. Ours reproduce both (the backends keep
  :meth:`HeldObjectSceneTask.observation_memory` between steps), so demonstrations made here look like
  robosuite's and robomimic's.
* **Reward**: sparse (``reward_shaping=False``, ``reward_scale=1``): ``reward_scale`` when the task's success
  check holds, else 0. No terminations; the horizon (400 steps) truncates.
* **Reset**: each arm at ``init_qpos + N(0, 0.02)``, the fingers at robosuite's init qpos, objects from robosuite's
  ``UniformRandomSampler``s (x, y uniform in the ranges around the reference position, shrunk by the object's
  horizontal radius where robosuite does, z from the reference, z offset and bottom offset, a rotation about the
  sampler's axis uniform in [0, 2 pi) or in its range, overlapping placements rejected and redrawn; a task may
  then move objects onto others, :meth:`PandaSceneTask.arrange`), the objects robosuite clears (Can's other
  three, Square's round nut) moved to (10, 10, 10). Written once (:meth:`PandaSceneTask.reset`), drawn per env
  from its numpy generator in robosuite's order or for many envs at once on the device
  (:mod:`flowrl.envs.tasks.base`'s draws).

Differences from robosuite, each small and stated here:

* robosuite's controller skips its state update on the first substep of an episode (it uses the mass matrix from
  before the fingers were placed: ~4e-3 N m on that one substep); ours uses the live state.
* Numerics: robosuite builds the relative pose through float32-rounded rotation matrices and an eigen-solve;
  ours is quaternion algebra in float64 (differences ~1e-7).

The scripted experts' shared part (:class:`PickPlaceExpert`: hover, descend, grasp, lift, carry, release) is here
too; they read the flattened observation and act with OSC_POSE deltas.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mujoco
import numpy as np
import torch

from flowrl.envs.controllers import PandaOSCController, State
from flowrl.envs.registry import Task
from flowrl.envs.tasks.base import Draws, MujocoTask
from flowrl.errors import FlowrlError

SCENES = Path(__file__).resolve().parents[1] / "assets" / "robosuite"
FRAME_SKIP = 25
DERIVED_FIELDS = ("xpos", "xquat", "site_xpos", "site_xmat", "xanchor", "xaxis", "qfrc_bias", "M")
"""What the controller (grip-site pose, arm Jacobian from joint anchors and axes, bias forces, CSR mass matrix)
and the observation (body poses) read; all bindable on mujoco.batch and arrays of MuJoCo Warp's Data."""
R_REACH_MAX = 0.6
"""robosuite's Can/Square success asks ``1 - tanh(10 * |grip site - object|) < 0.6`` (the gripper let go)."""
OSC_POSE_ACTIONS = ("dx", "dy", "dz", "dax", "day", "daz", "gripper")
"""One robot's action under OSC_POSE: a position and an axis-angle delta of the end effector, then the gripper."""


def robot_keys(num_robots: int, object_dim: int) -> tuple[tuple[str, int], ...]:
    """(robomimic key, size) in observation order."""
    sizes = {"object": object_dim}
    for r in range(num_robots):
        sizes.update({f"robot{r}_eef_pos": 3, f"robot{r}_eef_quat": 4, f"robot{r}_gripper_qpos": 2})
    return tuple((k, sizes[k]) for k in sorted(sizes))


def _robosuite_env(task: Task, num_envs: int, device: Any = "cpu", seed: int | None = None, **kwargs: Any):
    from flowrl.envs.backends.robosuite import RobosuiteEnv

    return RobosuiteEnv(task, num_envs, device=device, seed=seed, **kwargs)


@dataclass(frozen=True, kw_only=True, eq=False)
class RobosuiteTask(Task):
    """One of robosuite's tasks with Panda arms under OSC_POSE, run by robosuite (see the module docstring).
    ``obs_layout``, ``act_dim``, ``action_names`` and the ``robosuite`` env builder are derived from the robots
    and ``object_dim``; the name defaults to ``robosuite/<env_name>`` with ``env_name`` as an alias."""

    env_name: str
    """robosuite's name of the environment (``robosuite.make(env_name, ...)``)."""
    object_dim: int
    """Size of robosuite's ``object-state`` observation."""
    robots: tuple[str, ...] = ("Panda",)
    name: str = ""
    obs_layout: tuple[tuple[str, int], ...] = ()
    act_dim: int = 0
    max_episode_steps: int = 400
    backends: tuple[str, ...] = ("robosuite",)
    has_success: bool = True
    config_defaults: Mapping[str, Any] = field(default_factory=lambda: {"eval.end_on_success": True})
    """robomimic's ``terminate_on_success``: the same success rate as full episodes, in fewer steps."""

    def __post_init__(self) -> None:
        n = len(self.robots)
        derived = {"obs_layout": robot_keys(n, self.object_dim), "act_dim": 7 * n,
                   "action_names": tuple(f"robot{r}_{a}" for r in range(n) for a in OSC_POSE_ACTIONS),
                   "envs": {"robosuite": _robosuite_env, **self.envs}}
        if not self.name:
            derived.update(name=f"robosuite/{self.env_name}", aliases=(self.env_name, *self.aliases))
        for key, value in derived.items():
            object.__setattr__(self, key, value)
        super().__post_init__()

    @property
    def robosuite_robots(self) -> str | list[str]:
        """``robots`` as robosuite's ``make`` and robomimic's env args write them (one robot: its name)."""
        return self.robots[0] if len(self.robots) == 1 else list(self.robots)


# -- shipped scenes -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def scene_facts(scene: str) -> dict[str, Any]:
    """The ``scene.json`` of a shipped scene (its robosuite env name: ``Lift``, ``PickPlaceCan``, ...)."""
    path = SCENES / scene / "scene.json"
    if not path.exists():
        known = sorted(p.parent.name for p in SCENES.glob("*/scene.json"))
        raise FlowrlError(f"no shipped robosuite scene '{scene}' (known: {', '.join(known)})")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class RobotIds:
    """Indices of one robot in a shipped model."""

    eef_site: int
    hand_body: int
    arm_qpos: tuple[int, ...]
    gripper_qpos: tuple[int, ...]


@dataclass(frozen=True)
class SceneIds:
    """Indices into a shipped model that the task terms need."""

    robots: tuple[RobotIds, ...]
    object_body: int
    """The body a single-object task's success reads (-1 where the success rule names no single body)."""
    peg_body: int
    objects: tuple[dict[str, Any], ...]
    """Objects with a free joint, in robosuite's sampling order: name, qpos_adr, radius, offsets, sampler."""
    qpos0: tuple[float, ...]

    @property
    def eef_site(self) -> int:
        """Robot 0's grip site (a single-arm task's only robot)."""
        return self.robots[0].eef_site

    @property
    def arm_qpos(self) -> tuple[int, ...]:
        """Robot 0's arm joints' qpos addresses."""
        return self.robots[0].arm_qpos

    @property
    def gripper_qpos(self) -> tuple[int, ...]:
        """Robot 0's finger joints' qpos addresses."""
        return self.robots[0].gripper_qpos


@functools.lru_cache(maxsize=None)
def scene_ids(scene: str) -> SceneIds:
    facts = scene_facts(scene)
    model = mujoco.MjModel.from_xml_path(str(SCENES / scene / facts["xml"]))
    body = functools.partial(mujoco.mj_name2id, model, mujoco.mjtObj.mjOBJ_BODY)
    success = facts["success"]
    by_name = {o["name"]: o for o in facts["objects"]}
    objects = []
    for sampler in facts["placement"]["samplers"]:
        for name in sampler["objects"]:
            obj = by_name[name]
            if obj["visual"]:
                continue  # fixed markers, baked into scene.xml
            objects.append({"name": name, "qpos_adr": int(obj["qpos_adr"]), "radius": float(obj["horizontal_radius"]),
                            "bottom": float(obj["bottom_offset"][2]), "top": float(obj["top_offset"][2]),
                            "sampler": sampler, "cleared": name in facts["cleared_objects"]})
    robots = tuple(RobotIds(eef_site=int(r["eef_site"]["id"]), hand_body=body(r["hand_body"]),
                            arm_qpos=tuple(r["arm_joints"]["qpos_adr"]),
                            gripper_qpos=tuple(r["gripper_joints"]["qpos_adr"])) for r in facts["robots"])
    return SceneIds(robots=robots, object_body=body(success["body"]) if "body" in success else -1,
                    peg_body=body(success["peg_body"]) if "peg_body" in success else -1, objects=tuple(objects),
                    qpos0=tuple(float(v) for v in model.qpos0))


def quat_xyzw(q: torch.Tensor) -> torch.Tensor:
    """MuJoCo's (w, x, y, z) -> robosuite's observation order (x, y, z, w)."""
    return torch.cat([q[..., 1:], q[..., :1]], dim=-1)


def rotation_matrix(q_xyzw: np.ndarray) -> np.ndarray:
    """The rotation matrix of a robosuite-order (x, y, z, w) quaternion (normalised first); for the scripted
    experts, which read observations in numpy."""
    x, y, z, w = np.asarray(q_xyzw, dtype=np.float64) / np.linalg.norm(q_xyzw)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def rotation_vector(m: np.ndarray) -> np.ndarray:
    """The axis times the angle (in [0, pi]) of a rotation matrix: the rotation an OSC_POSE action asks for."""
    angle = math.acos(float(np.clip((np.trace(m) - 1) / 2, -1.0, 1.0)))
    skew = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])  # 2 sin(angle) axis
    if angle < 1e-6:
        return skew / 2
    if math.pi - angle > 1e-6:
        return skew * angle / (2 * math.sin(angle))
    # near a half turn sin(angle) vanishes: the axis is the largest column of (m + I) / 2 = axis axis^T
    half = (m + np.eye(3)) / 2
    j = int(np.argmax(np.diag(half)))
    axis = half[:, j] / math.sqrt(half[j, j])
    return (-axis if skew @ axis < 0 else axis) * angle


def _quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of (w, x, y, z) quaternions."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], dim=-1)


def _quat_rotate_inverse(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """R(q)^T v for unit (w, x, y, z) quaternions."""
    w, u = q[..., :1], -q[..., 1:]
    t = 2.0 * torch.linalg.cross(u, v, dim=-1)
    return v + w * t + torch.linalg.cross(u, t, dim=-1)


@dataclass(frozen=True, kw_only=True, eq=False)
class PandaSceneTask(RobosuiteTask, MujocoTask):
    """One of robosuite's Panda tasks, also on its shipped scene (see the module docstring). A subclass
    gives the object state (:meth:`object_state`) and :meth:`success`; the model, controller, action bounds,
    reset distribution, observation and reward are the scene's."""

    model: str = ""
    frame_skip: int = FRAME_SKIP
    derived_fields: tuple[str, ...] = DERIVED_FIELDS
    backends: tuple[str, ...] = ("robosuite", "cpu", "warp")
    cameras: tuple[str, ...] = ("agentview", "robot0_eye_in_hand")
    hidden_geom_groups: tuple[int, ...] = (0,)
    _facts: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    reward_scale = 1.0
    """The reward of a successful step (robosuite's sparse reward at ``reward_scale=1``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_facts", scene_facts(self.env_name))
        object.__setattr__(self, "model", str(SCENES / self.env_name / self._facts["xml"]))
        super().__post_init__()

    @property
    def ids(self) -> SceneIds:
        return scene_ids(self.env_name)

    @property
    def facts(self) -> dict[str, Any]:
        """The scene's ``scene.json``."""
        return self._facts

    # -- model and control ---------------------------------------------------------------------
    def controller(self, model: mujoco.MjModel, num_envs: int, device: torch.device,
                   dtype: torch.dtype) -> PandaOSCController:
        return PandaOSCController(self._facts, model, num_envs, device, dtype)

    def action_bounds(self, model: mujoco.MjModel) -> tuple[np.ndarray, np.ndarray]:
        c = self._facts["control"]
        return np.asarray(c["action_low"], dtype=np.float64), np.asarray(c["action_high"], dtype=np.float64)

    # -- reset distribution --------------------------------------------------------------------
    def reset(self, draws: Draws, qpos0: torch.Tensor, nv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """robosuite's reset: each arm's Gaussian noise (robot 0 first), then the placement samplers in their order,
        each object redrawn until it overlaps none placed before it, then its rotation (robosuite's draw order);
        then :meth:`arrange`."""
        ids, n = self.ids, draws.n
        qpos = qpos0.expand(n, -1).clone()
        for robot, facts in zip(ids.robots, self._facts["robots"]):
            arm = list(robot.arm_qpos)
            qpos[:, arm] = draws.tensor(facts["init_qpos"]) + draws.normal((len(arm),)) * facts["init_noise"]["magnitude"]
            qpos[:, list(robot.gripper_qpos)] = draws.tensor(facts["gripper_init_qpos"])
        placed: list[tuple[torch.Tensor, torch.Tensor, float, dict[str, Any]]] = []
        for obj in ids.objects:
            s = obj["sampler"]
            (x_lo, x_hi), (y_lo, y_hi) = self.placement_ranges(obj)
            ref = s["reference_pos"]
            z = ref[2] + s["z_offset"] - obj["bottom"]

            def propose(d: Draws) -> tuple[torch.Tensor, torch.Tensor]:
                return d.uniform(x_lo, x_hi) + ref[0], d.uniform(y_lo, y_hi) + ref[1]

            def accept(xy: tuple[torch.Tensor, ...], rows: torch.Tensor, obj=obj, z=z, s=s) -> torch.Tensor:
                ok = torch.ones_like(xy[0], dtype=torch.bool)
                for px, py, pz, o in placed if s["ensure_valid_placement"] else ():
                    if z - pz <= o["top"] - obj["bottom"]:
                        ok &= torch.hypot(xy[0] - px[rows], xy[1] - py[rows]) > o["radius"] + obj["radius"]
                return ok

            x, y = draws.first_accepted(propose, accept, f"{self.name}'s {obj['name']}")
            placed.append((x, y, z, obj))
            a = obj["qpos_adr"]
            qpos[:, a], qpos[:, a + 1], qpos[:, a + 2] = x, y, z
            qpos[:, a + 3:a + 7] = self.placement_quat(obj, draws)
        self.arrange(qpos)
        for obj in ids.objects:
            if obj["cleared"]:
                qpos[:, obj["qpos_adr"]:obj["qpos_adr"] + 7] = draws.tensor(self._facts["cleared_object_qpos"])
        return qpos, torch.zeros((n, nv), dtype=qpos.dtype, device=qpos.device)

    def placement_quat(self, obj: dict[str, Any], draws: Draws) -> torch.Tensor:
        """(n, 4) w x y z: robosuite's sampled rotation of ``obj`` about its sampler's axis (``rotation`` None:
        uniform in [0, 2 pi); a pair: uniform between them; a number: fixed)."""
        s = obj["sampler"]
        rotation = s["rotation"]
        if rotation is None:
            angle = draws.uniform(0.0, 2 * math.pi)
        elif isinstance(rotation, list):
            angle = draws.uniform(min(rotation), max(rotation))
        else:
            angle = draws.tensor(float(rotation)).expand(draws.n)
        quat = torch.zeros((draws.n, 4), dtype=angle.dtype, device=angle.device)
        quat[:, 0], quat[:, 1 + "xyz".index(s["rotation_axis"])] = torch.cos(angle / 2), torch.sin(angle / 2)
        return quat

    def arrange(self, qpos: torch.Tensor) -> None:
        """Move placed objects where the task's reset puts them after sampling (in place; none by default)."""

    @staticmethod
    def placement_ranges(obj: dict[str, Any]) -> tuple[tuple[float, float], tuple[float, float]]:
        """The (x, y) ranges around the sampler's reference position an object is placed in."""
        s = obj["sampler"]
        shrink = obj["radius"] if s["ensure_object_boundary_in_range"] else 0.0
        return ((s["x_range"][0] + shrink, s["x_range"][1] - shrink), (s["y_range"][0] + shrink, s["y_range"][1] - shrink))

    # -- terms ---------------------------------------------------------------------------------
    def object_state(self, s: State, memory: torch.Tensor | None, eef_pos: torch.Tensor,
                     hand_quat: torch.Tensor) -> list[torch.Tensor]:
        """The parts of robosuite's ``object-state``, in order (their sizes add up to ``object_dim``).
        ``eef_pos`` (N, R, 3) and ``hand_quat`` (N, R, 4, w x y z) are the R robots' grip sites and hands."""
        raise NotImplementedError

    def observation(self, s: State, memory: torch.Tensor | None = None) -> torch.Tensor:
        robots = self.ids.robots
        eef_pos = torch.stack([s["site_xpos"][:, r.eef_site] for r in robots], dim=1)
        hand_quat = torch.stack([s["xquat"][:, r.hand_body] for r in robots], dim=1)
        per_robot = [torch.cat([eef_pos[:, i], quat_xyzw(hand_quat[:, i]), s["qpos"][:, list(r.gripper_qpos)]], dim=-1)
                     for i, r in enumerate(robots)]
        return torch.cat([*self.object_state(s, memory, eef_pos, hand_quat), *per_robot], dim=-1)

    def success(self, s: State) -> torch.Tensor:
        raise NotImplementedError

    def reward_and_termination(self, s: State, before: torch.Tensor, after: torch.Tensor, dt: float,
                               action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """robosuite's sparse reward and no terminations."""
        done = self.success(s)
        return done.to(s["qpos"].dtype) * self.reward_scale, torch.zeros_like(done)


@dataclass(frozen=True, kw_only=True, eq=False)
class HeldObjectSceneTask(PandaSceneTask):
    """A scene whose object state is robosuite's object-to-hand pose (one env step late, see the module
    docstring) then the object's own pose, and whose success needs the gripper to have let go."""

    observation_memory_dim = 8

    def observation_memory(self, s: State) -> torch.Tensor:
        """(N, 8) = 1 (a step was seen), the object's position (3) and quaternion (4, w x y z), which the next
        step's relative pose reads (robosuite's observation cache)."""
        pos, quat = s["xpos"][:, self.ids.object_body], s["xquat"][:, self.ids.object_body]
        return torch.cat([torch.ones_like(pos[:, :1]), pos, quat], dim=-1)

    def object_state(self, s, memory, eef_pos, hand_quat):
        """``<obj>_to_robot0_eef_pos`` (the object's position in the hand frame centred at the grip site),
        ``<obj>_to_robot0_eef_quat`` (its orientation relative to the hand, w >= 0), ``<obj>_pos``, ``<obj>_quat``."""
        body = self.ids.object_body
        eef_pos, hand_quat = eef_pos[:, 0], hand_quat[:, 0]
        seen = self.observation_memory(s) if memory is None else memory
        seen_pos, seen_quat = seen[:, 1:4], seen[:, 4:8]
        conjugate = torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=hand_quat.dtype, device=hand_quat.device)
        rel_quat = _quat_mul(hand_quat * conjugate, seen_quat)
        rel_quat = torch.where(rel_quat[:, :1] < 0, -rel_quat, rel_quat)
        after_first = seen[:, :1]  # 0 at an episode's first step: robosuite's empty cache gives zeros
        return [_quat_rotate_inverse(hand_quat, seen_pos - eef_pos) * after_first, quat_xyzw(rel_quat) * after_first,
                s["xpos"][:, body], quat_xyzw(s["xquat"][:, body])]

    def let_go(self, s: State) -> torch.Tensor:
        """(N,) the grip site is far enough from the object for robosuite's success to count."""
        dist = torch.linalg.vector_norm(s["site_xpos"][:, self.ids.eef_site] - s["xpos"][:, self.ids.object_body],
                                        dim=-1)
        return 1.0 - torch.tanh(10.0 * dist) < R_REACH_MAX


# -- scripted experts -----------------------------------------------------------------------------------------
OPEN, CLOSED = -1.0, 1.0
POS_SCALE = 0.05  # metres per unit of OSC_POSE position action (robosuite's default output_max)
ROT_SCALE = 0.5  # radians per unit of OSC_POSE rotation action (axis-angle in the base frame)
NO_ROTATION = np.zeros(3)


class PickPlaceExpert:
    """Pick an object and, where the task has a goal, carry it there and let go: a scripted expert of one Panda.

    Phases per env: hover above the object, descend around it, close the gripper, lift, then
    (pick-and-place tasks) move above the goal at lifting height, lower, and open. It keeps a phase per
    env; the caller resets it (``reset()``) before each batch of episodes. A
    :class:`flowrl.rollout.ChunkPolicy` of one-action chunks.
    """

    object_slice = slice(0, 3)  # the object's position in the observation
    obs_history = 1
    act_steps = 1
    eef_index = 10  # where robot0_eef_pos starts (after the ``object`` block)
    goal: np.ndarray | None = None
    lift_height = 0.25
    grasp_offset = np.array([0.0, 0.0, -0.005])

    def __init__(self, num_envs: int, gain: float = 1.0) -> None:
        self.phase = np.zeros(num_envs, dtype=np.int64)
        self.timer = np.zeros(num_envs, dtype=np.int64)
        self.lift_z = np.zeros(num_envs)
        self.gain = gain

    def reset(self, mask: np.ndarray | None = None) -> None:
        mask = np.ones_like(self.phase, dtype=bool) if mask is None else mask
        self.phase[mask], self.timer[mask] = 0, 0

    def _target(self, i: int, obj: np.ndarray, eef: np.ndarray) -> tuple[np.ndarray, float]:
        phase = self.phase[i]
        if phase == 0:  # hover above the object
            target = obj + np.array([0.0, 0.0, 0.08])
            if np.linalg.norm(eef - target) < 0.01:
                self.phase[i] = 1
            return target, OPEN
        if phase == 1:  # descend around it (contact may stop it short: then grasp where it is)
            target = obj + self.grasp_offset
            self.timer[i] += 1
            if np.linalg.norm(eef - target) < 0.008 or self.timer[i] > 40:
                self.phase[i], self.timer[i] = 2, 0
            return target, OPEN
        if phase == 2:  # close the gripper
            self.timer[i] += 1
            if self.timer[i] >= 12:
                self.phase[i], self.lift_z[i] = 3, obj[2] + self.lift_height
            return eef, CLOSED
        target = np.array([eef[0], eef[1], self.lift_z[i]])
        if phase == 3:  # lift
            if self.goal is not None and eef[2] > self.lift_z[i] - 0.02:
                self.phase[i] = 4
            return target, CLOSED
        goal_above = np.array([self.goal[0], self.goal[1], self.lift_z[i]])
        if phase == 4:  # carry above the goal
            if np.linalg.norm(eef[:2] - goal_above[:2]) < 0.01:
                self.phase[i] = 5
            return goal_above, CLOSED
        if phase == 5:  # lower into the goal
            lowered = np.array([self.goal[0], self.goal[1], self.goal[2] + 0.15])
            if eef[2] < lowered[2] + 0.01:
                self.phase[i] = 6
            return lowered, CLOSED
        return eef, OPEN  # let go

    def _command(self, i: int, o: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """One env's (eef position target, gripper, rotation action (3,)) from its observation."""
        target, gripper = self._target(i, o[self.object_slice], o[self.eef_index:self.eef_index + 3])
        return target, gripper, NO_ROTATION

    def act_chunk(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H, obs_dim) histories -> one-action chunks (N, 1, act_dim) (the expert is deterministic)."""
        return self(obs)

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """(N, obs_dim) -> (N, act_dim); an (N, H, obs_dim) history -> a one-step chunk (N, 1, act_dim)."""
        history = obs.dim() == 3
        o = (obs[:, -1] if history else obs).detach().cpu().numpy()
        eef = o[:, self.eef_index:self.eef_index + 3]
        targets, grippers, rotations = zip(*(self._command(i, o[i]) for i in range(len(o))))
        delta = np.clip(self.gain * (np.stack(targets) - eef) / POS_SCALE, -1.0, 1.0)
        rotation = np.clip(np.stack(rotations), -1.0, 1.0)
        action = np.concatenate([delta, rotation, np.array(grippers)[:, None]], axis=1)
        action = torch.as_tensor(action, dtype=torch.float32)
        return action.unsqueeze(1) if history else action
