"""robosuite's Lift, PickPlaceCan and NutAssemblySquare as MuJoCo tasks of ours: no robosuite at run time.

The ``cpu`` (mujoco.batch, float64) and ``warp`` (MuJoCo Warp) backends run these task objects on the scenes
shipped in ``envs/assets/robosuite/<task>/`` (robosuite 1.5.2's compiled models, with ``scene.json`` holding the
facts read from robosuite: controller parameters, names, placement samplers, success thresholds), driven by the
batched OSC_POSE controller of :mod:`flowrl.envs.controllers` at robosuite's timing (20 Hz control, 25 physics
substeps of 2 ms). What each part reproduces, from robosuite's source:

* **Action** (7,): ``[0:6]`` OSC_POSE deltas in the robot base frame, ``[6]`` the gripper (its sign), bounds
  [-1, 1]. The goal is set once per env step from the state the step starts in, torques recomputed before every
  substep (robosuite's ``mj_step1`` -> controller -> ``mj_step2``; our backends forward, compute, ``mj_step``).
* **Observation**: robomimic's low-dim keys in sorted order, as the ``robosuite`` backend flattens them:
  ``object`` (robosuite's ``object-state``), ``robot0_eef_pos`` (grip site), ``robot0_eef_quat`` (the hand *body*'s
  quaternion, x y z w, as robosuite <= 1.5 reports it), ``robot0_gripper_qpos``. Lift's object state is
  ``cube_pos, cube_quat, gripper_to_cube_pos`` (the last is ``cube_pos - eef_pos`` despite its name); Can's and
  Square's are ``<obj>_to_robot0_eef_pos`` (the object's position in the hand frame centred at the grip site),
  ``<obj>_to_robot0_eef_quat`` (its orientation relative to the hand, w >= 0), ``<obj>_pos``, ``<obj>_quat``.
  robosuite's relative-pose sensors of Can and Square read the object's pose from its observation cache before
  the object's own sensors refresh it: the relative pose is that of the object *one env step earlier* seen from
  the hand now, and all zeros (position and quaternion) in an episode's first observation, whose cache is
  empty. Ours reproduce both (the backends keep :meth:`RobosuiteSceneTask.observation_memory` between steps), so
  demonstrations made here look like robosuite's and robomimic's.
  Like robosuite after ``env.step``, positions come from the kinematics computed at the start of the last physics
  substep (MuJoCo's ``mj_step`` leaves them so, as robosuite's ``mj_step2`` does), the gripper's joint positions
  from the final state.
* **Reward**: sparse (``reward_shaping=False``, ``reward_scale=1``): 1 when the task's success check holds, else 0.
* **Success**: ``_check_success``: Lift: cube above the table by 0.04; Can: the can strictly inside its bin quarter
  (and below 0.1 above the bin floor) with the grip site farther than ``atanh(0.4)/10`` from it; Square: the nut
  within 0.03 (x, y) of its peg, below 0.05 above the table, grip site likewise away. No terminations; the
  horizon (400 steps) truncates.
* **Reset**: the arm at ``init_qpos + N(0, 0.02)``, the fingers at robosuite's init qpos, objects from robosuite's
  ``UniformRandomSampler``s (x, y uniform in the ranges around the reference position, shrunk by the object's
  horizontal radius where robosuite does, z from the reference, z offset and bottom offset, a rotation about z
  uniform in [0, 2 pi), overlapping placements rejected and redrawn), the objects robosuite clears (Can's other
  three, Square's round nut) moved to (10, 10, 10). Per env from its numpy generator (:meth:`reset_state`) or for
  many at once on the device (:meth:`reset_noise_batch`).

Differences from robosuite, each small and stated here:

* Lift's cube half-sizes are drawn by robosuite from U(0.020, 0.022) at every reset; we keep the shipped nominal
  cube (the one in ``scene.xml``) in every world.
* robosuite's controller skips its state update on the first substep of an episode (it uses the mass matrix from
  before the fingers were placed: ~4e-3 N m on that one substep); ours uses the live state.
* Numerics: robosuite builds the relative pose through float32-rounded rotation matrices and an eigen-solve;
  ours is quaternion algebra in float64 (differences ~1e-7).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mujoco
import numpy as np
import torch

from flowrl.envs.controllers import ArmIndices, OSCConfig, OSCPose, PandaGripper
from flowrl.envs.tasks.base import MujocoTask, State
from flowrl.errors import FlowrlError

SCENES = Path(__file__).resolve().parents[1] / "assets" / "robosuite"
TASKS = ("Lift", "PickPlaceCan", "NutAssemblySquare")
FRAME_SKIP = 25
DERIVED_FIELDS = ("xpos", "xquat", "site_xpos", "site_xmat", "xanchor", "xaxis", "qfrc_bias", "M")
"""What the controller (grip-site pose, arm Jacobian from joint anchors and axes, bias forces, CSR mass matrix)
and the observation (body poses) read; all bindable on mujoco.batch and arrays of MuJoCo Warp's Data."""
R_REACH_MAX = 0.6
"""robosuite's Can/Square success asks ``1 - tanh(10 * |grip site - object|) < 0.6`` (the gripper let go)."""


@functools.lru_cache(maxsize=None)
def scene_facts(scene: str) -> dict[str, Any]:
    """The ``scene.json`` of a shipped scene (``Lift``, ``PickPlaceCan``, ``NutAssemblySquare``)."""
    path = SCENES / scene / "scene.json"
    if not path.exists():
        raise FlowrlError(f"no shipped robosuite scene '{scene}' (known: {', '.join(TASKS)})")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class _Ids:
    """Indices into the shipped model that the task terms need."""

    eef_site: int
    hand_body: int
    object_body: int
    peg_body: int
    arm_qpos: tuple[int, ...]
    gripper_qpos: tuple[int, ...]
    arm_actuators: tuple[int, ...]
    gripper_actuators: tuple[int, ...]
    objects: tuple[dict[str, Any], ...]
    """Objects with a free joint, in robosuite's sampling order: name, qpos_adr, radius, offsets, sampler."""
    qpos0: tuple[float, ...]


@functools.lru_cache(maxsize=None)
def _ids(scene: str) -> _Ids:
    facts = scene_facts(scene)
    model = mujoco.MjModel.from_xml_path(str(SCENES / scene / facts["xml"]))
    body = functools.partial(mujoco.mj_name2id, model, mujoco.mjtObj.mjOBJ_BODY)
    robot = facts["robot"]
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
    peg = body(success["peg_body"]) if "peg_body" in success else -1
    return _Ids(eef_site=int(robot["eef_site"]["id"]), hand_body=body("robot0_right_hand"),
                object_body=body(success["body"]), peg_body=peg,
                arm_qpos=tuple(robot["arm_joints"]["qpos_adr"]), gripper_qpos=tuple(robot["gripper_joints"]["qpos_adr"]),
                arm_actuators=tuple(robot["arm_actuators"]["ids"]),
                gripper_actuators=tuple(robot["gripper_actuators"]["ids"]), objects=tuple(objects),
                qpos0=tuple(float(v) for v in model.qpos0))


def _quat_xyzw(q: torch.Tensor) -> torch.Tensor:
    """MuJoCo's (w, x, y, z) -> robosuite's observation order (x, y, z, w)."""
    return torch.cat([q[..., 1:], q[..., :1]], dim=-1)


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


@contextlib.contextmanager
def _one_torch_thread(device: torch.device) -> Iterator[None]:
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

    The per-substep controller the backends run (:class:`flowrl.envs.tasks.base.Controller`), plus
    :meth:`reset`, which the backends call after they reset envs (robosuite re-creates its controllers at every
    reset: the nullspace target becomes the episode's initial arm posture and the gripper state goes back to 0).
    """

    def __init__(self, scene: str, model: mujoco.MjModel, num_envs: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        facts = scene_facts(scene)
        robot = facts["robot"]
        self.arm = ArmIndices.from_model(model, robot["arm_joints"]["names"], robot["eef_site"]["name"]).to(device)
        # on a GPU the controller runs inside a CUDA graph, which the eigendecomposition behind robosuite's pinv
        # cannot join (it checks its result on the host)
        self.osc = OSCPose(OSCConfig.from_scene(facts), num_envs=num_envs, device=device, dtype=dtype,
                           lambda_inverse="inv" if torch.device(device).type == "cuda" else "pinv")
        self.gripper = PandaGripper.from_scene(facts, num_envs=num_envs, device=device, dtype=dtype)
        ids = _ids(scene)
        self.arm_act = torch.as_tensor(ids.arm_actuators, device=device)
        self.grip_act = torch.as_tensor(ids.gripper_actuators, device=device)
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
        with _one_torch_thread(self.out.device):
            x = self._inputs(state)
            action = action.to(self.out.dtype)
            self.osc.set_goal(action[:, :6], x["eef_pos"], x["eef_rot"])
            self.out[:, self.grip_act] = self.gripper.step(action[:, 6])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        o = self.osc
        return {"goal_pos": o.goal_pos, "goal_rot": o.goal_rot, "initial_joint": o.initial_joint,
                "origin_pos": o.origin_pos, "origin_rot": o.origin_rot, "gripper": self.gripper.state, "ctrl": self.out}

    def ctrl(self, state: State) -> torch.Tensor:
        with _one_torch_thread(self.out.device):
            x = self._inputs(state)
            self.out[:, self.arm_act] = self.osc.torques(x["eef_pos"], x["eef_rot"], x["jac"], x["mass"], x["bias"],
                                                         x["qpos"], x["qvel"])
        return self.out


@dataclass(frozen=True)
class RobosuiteSceneTask(MujocoTask):
    """One of robosuite's single-arm Panda tasks on a shipped scene (see the module docstring)."""

    frame_skip: int = FRAME_SKIP
    derived_fields: tuple[str, ...] = DERIVED_FIELDS
    scene: str = "Lift"
    max_placement_draws: int = 64
    """Candidate placements drawn at once per object and env in :meth:`reset_noise_batch` (robosuite redraws up to
    5000 times; the first valid of 64 is the same distribution unless all 64 overlap, which the shipped samplers
    make vanishingly rare)."""
    _facts: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_facts", scene_facts(self.scene))

    # -- model and control ---------------------------------------------------------------------
    def model_path(self) -> str:
        return str(SCENES / self.scene / self._facts["xml"])

    def controller(self, model: mujoco.MjModel, num_envs: int, device: torch.device,
                   dtype: torch.dtype) -> PandaOSCController:
        return PandaOSCController(self.scene, model, num_envs, device, dtype)

    def action_bounds(self, model: mujoco.MjModel) -> tuple[np.ndarray, np.ndarray]:
        c = self._facts["control"]
        return np.asarray(c["action_low"], dtype=np.float64), np.asarray(c["action_high"], dtype=np.float64)

    # -- reset distribution --------------------------------------------------------------------
    def _robot_qpos(self, qpos: np.ndarray, noise: np.ndarray) -> None:
        robot, ids = self._facts["robot"], _ids(self.scene)
        qpos[list(ids.arm_qpos)] = np.asarray(robot["init_qpos"]) + noise * robot["init_noise"]["magnitude"]
        qpos[list(ids.gripper_qpos)] = robot["gripper_init_qpos"]

    def reset_state(self, rng: np.random.Generator, qpos0: np.ndarray, nv: int) -> tuple[np.ndarray, np.ndarray]:
        """robosuite's reset from one env's generator: the arm's Gaussian noise first, then the placement samplers
        in their order, each object redrawn until it overlaps none placed before it (robosuite's draw order)."""
        ids = _ids(self.scene)
        qpos = np.array(qpos0, dtype=np.float64)
        self._robot_qpos(qpos, rng.standard_normal(len(ids.arm_qpos)))
        placed: list[tuple[float, float, float, dict[str, Any]]] = []
        for obj in ids.objects:
            s = obj["sampler"]
            (x_lo, x_hi), (y_lo, y_hi) = self._ranges(obj)
            ref = s["reference_pos"]
            z = ref[2] + s["z_offset"] - obj["bottom"]
            for _ in range(5000):
                x = rng.uniform(high=x_hi, low=x_lo) + ref[0]
                y = rng.uniform(high=y_hi, low=y_lo) + ref[1]
                if not (s["ensure_valid_placement"] and any(
                        math.hypot(x - px, y - py) <= o["radius"] + obj["radius"] and z - pz <= o["top"] - obj["bottom"]
                        for px, py, pz, o in placed)):
                    break
            else:
                raise FlowrlError(f"{self.scene}: cannot place {obj['name']}")
            angle = self._angle(s, rng.uniform(high=2 * np.pi, low=0) if s["rotation"] is None else None)
            placed.append((x, y, z, obj))
            a = obj["qpos_adr"]
            qpos[a:a + 7] = (x, y, z, math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2))
        self._clear_objects(qpos)
        return qpos, np.zeros(nv)

    @staticmethod
    def _angle(sampler: dict[str, Any], drawn: float | None) -> float:
        rotation = sampler["rotation"]
        if sampler["rotation_axis"] != "z" or isinstance(rotation, list):
            raise FlowrlError(f"placement sampler {sampler['name']}: only None or fixed rotations about z are implemented")
        return drawn if rotation is None else float(rotation)

    @staticmethod
    def _ranges(obj: dict[str, Any]) -> tuple[tuple[float, float], tuple[float, float]]:
        s = obj["sampler"]
        shrink = obj["radius"] if s["ensure_object_boundary_in_range"] else 0.0
        return ((s["x_range"][0] + shrink, s["x_range"][1] - shrink), (s["y_range"][0] + shrink, s["y_range"][1] - shrink))

    def _clear_objects(self, qpos: np.ndarray | torch.Tensor) -> None:
        for obj in _ids(self.scene).objects:
            if obj["cleared"]:
                a = obj["qpos_adr"]
                qpos[..., a:a + 7] = torch.as_tensor(self._facts["cleared_object_qpos"], dtype=qpos.dtype,
                                                     device=qpos.device) if isinstance(qpos, torch.Tensor) \
                    else self._facts["cleared_object_qpos"]

    def reset_noise_batch(self, gen: torch.Generator, n: int, nq: int, nv: int, like: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same distribution as :meth:`reset_state` for n envs at once on ``like``'s device: each object draws
        ``max_placement_draws`` candidates per env and takes the first that overlaps no object placed before it.
        Returns (placed qpos - the model's qpos0, zero qvel)."""
        ids = _ids(self.scene)
        kw: dict[str, Any] = {"generator": gen, "device": like.device, "dtype": like.dtype}
        robot = self._facts["robot"]
        qpos = torch.zeros(n, nq, **{k: kw[k] for k in ("device", "dtype")})
        arm = torch.as_tensor(ids.arm_qpos, device=like.device)
        qpos[:, arm] = torch.as_tensor(robot["init_qpos"], device=like.device, dtype=like.dtype) \
            + torch.randn((n, len(ids.arm_qpos)), **kw) * robot["init_noise"]["magnitude"]
        qpos[:, torch.as_tensor(ids.gripper_qpos, device=like.device)] = torch.as_tensor(
            robot["gripper_init_qpos"], device=like.device, dtype=like.dtype)
        k = self.max_placement_draws
        placed: list[tuple[torch.Tensor, torch.Tensor, float, dict[str, Any]]] = []
        for obj in ids.objects:
            s = obj["sampler"]
            (x_lo, x_hi), (y_lo, y_hi) = self._ranges(obj)
            ref = s["reference_pos"]
            z = ref[2] + s["z_offset"] - obj["bottom"]
            xs = x_lo + (x_hi - x_lo) * torch.rand((n, k), **kw) + ref[0]
            ys = y_lo + (y_hi - y_lo) * torch.rand((n, k), **kw) + ref[1]
            valid = torch.ones((n, k), dtype=torch.bool, device=like.device)
            if s["ensure_valid_placement"]:
                for px, py, pz, o in placed:
                    if z - pz <= o["top"] - obj["bottom"]:
                        valid &= torch.hypot(xs - px[:, None], ys - py[:, None]) > o["radius"] + obj["radius"]
            first = torch.argmax(valid.to(torch.uint8), dim=1, keepdim=True)  # the first valid (0 if none is)
            x, y = xs.gather(1, first)[:, 0], ys.gather(1, first)[:, 0]
            angle = torch.rand(n, **kw) * (2 * math.pi) if s["rotation"] is None else \
                torch.full((n,), self._angle(s, None), device=like.device, dtype=like.dtype)
            placed.append((x, y, z, obj))
            a = obj["qpos_adr"]
            qpos[:, a], qpos[:, a + 1], qpos[:, a + 2] = x, y, z
            qpos[:, a + 3], qpos[:, a + 6] = torch.cos(angle / 2), torch.sin(angle / 2)
            qpos[:, a + 4:a + 6] = 0.0
        self._clear_objects(qpos)
        qpos0 = torch.as_tensor(ids.qpos0, device=like.device, dtype=like.dtype)
        return qpos - qpos0, torch.zeros((n, nv), device=like.device, dtype=like.dtype)

    # -- terms ---------------------------------------------------------------------------------
    @property
    def observation_memory_dim(self) -> int:  # type: ignore[override]
        return 0 if self.scene == "Lift" else 8

    def observation_memory(self, s: State) -> torch.Tensor | None:
        """Can, Square: (N, 8) = 1 (a step was seen), the object's position (3) and quaternion (4, w x y z), which
        the next step's relative pose reads (robosuite's observation cache; see the module docstring)."""
        return None if self.scene == "Lift" else self._object_pose_memory(s)

    def _object_pose_memory(self, s: State) -> torch.Tensor:
        ids = _ids(self.scene)
        pos, quat = s["xpos"][:, ids.object_body], s["xquat"][:, ids.object_body]
        return torch.cat([torch.ones_like(pos[:, :1]), pos, quat], dim=-1)

    def observation(self, s: State, memory: torch.Tensor | None = None) -> torch.Tensor:
        ids = _ids(self.scene)
        xpos, xquat = s["xpos"], s["xquat"]
        eef_pos = s["site_xpos"][:, ids.eef_site]
        hand_quat = xquat[:, ids.hand_body]
        obj_pos, obj_quat = xpos[:, ids.object_body], xquat[:, ids.object_body]
        if self.scene == "Lift":
            obj = [obj_pos, _quat_xyzw(obj_quat), obj_pos - eef_pos]
        else:
            seen = self._object_pose_memory(s) if memory is None else memory
            seen_pos, seen_quat = seen[:, 1:4], seen[:, 4:8]
            rel_quat = _quat_mul(hand_quat * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=hand_quat.dtype,
                                                          device=hand_quat.device), seen_quat)
            rel_quat = torch.where(rel_quat[:, :1] < 0, -rel_quat, rel_quat)
            after_first = seen[:, :1]  # 0 at an episode's first step: robosuite's empty cache gives zeros
            obj = [_quat_rotate_inverse(hand_quat, seen_pos - eef_pos) * after_first,
                   _quat_xyzw(rel_quat) * after_first, obj_pos, _quat_xyzw(obj_quat)]
        gripper = s["qpos"][:, list(ids.gripper_qpos)]
        return torch.cat([*obj, eef_pos, _quat_xyzw(hand_quat), gripper], dim=-1)

    def success(self, s: State) -> torch.Tensor:
        ids = _ids(self.scene)
        rule = self._facts["success"]
        p = s["xpos"][:, ids.object_body]
        if self.scene == "Lift":
            return p[:, 2] > rule["table_offset"][2] + rule["z_above_table"]
        dist = torch.linalg.vector_norm(s["site_xpos"][:, ids.eef_site] - p, dim=-1)
        let_go = 1.0 - torch.tanh(10.0 * dist) < R_REACH_MAX
        if self.scene == "PickPlaceCan":
            inside = torch.ones_like(let_go)
            for axis, key in enumerate(("x_range", "y_range", "z_range")):
                lo, hi = rule[key]
                inside &= (p[:, axis] > lo) & (p[:, axis] < hi)
            return inside & let_go
        peg = s["xpos"][:, ids.peg_body]
        tol = rule["xy_tolerance"]
        on_peg = ((p[:, 0] - peg[:, 0]).abs() < tol) & ((p[:, 1] - peg[:, 1]).abs() < tol) \
            & (p[:, 2] < rule["table_offset"][2] + rule["z_above_table_max"])
        return on_peg & let_go

    def reward_and_termination(self, s: State, before: torch.Tensor, after: torch.Tensor, dt: float,
                               action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """robosuite's sparse reward (Lift: 2.25 scaled by reward_scale / 2.25; Can, Square: objects placed, one
        object, reward_scale 1) and no terminations."""
        done = self.success(s)
        reward = done.to(s["qpos"].dtype)
        if self.scene == "Lift":
            reward = reward * 2.25 * (1.0 / 2.25)
        return reward, torch.zeros_like(done)


def make_task(info: Any) -> RobosuiteSceneTask:
    """The task object of a registered ``robosuite/<scene>`` task (``TaskInfo.task`` builds it through this)."""
    scene = info.extra["env_name"]
    if scene not in TASKS:
        raise FlowrlError(f"{info.name}: no shipped scene (the cpu and warp backends run {', '.join(TASKS)})")
    return RobosuiteSceneTask(info, FRAME_SKIP, scene=scene)
