"""Extract robosuite 1.5.2's Lift, PickPlaceCan, NutAssemblySquare and TwoArmTransport scenes into MJCF that loads
without robosuite.

Run with robosuite installed (``pip install --no-deps robosuite==1.5.2``, see the README)::

    python envs/assets/make_robosuite_scenes.py            # writes envs/assets/robosuite/
    python envs/assets/make_robosuite_scenes.py --check    # only compares the shipped files with robosuite

For each task it builds the env exactly as flowrl's robosuite worker does (Panda, two for TwoArmTransport,
robosuite's default BASIC composite controller: OSC_POSE arm + GRIP gripper, ``ignore_done=True``,
``reward_shaping=False``, after ``robosuite_compat.apply()``), resets it, and writes

* ``robosuite/<task>/scene.xml``: the MJCF robosuite compiled (its ``edit_model_xml`` output) with every
  mesh and texture path rewritten to ``../assets/<path under robosuite/models/assets>``, the compiler's
  ``meshdir`` removed, and the model edits robosuite makes after compiling baked in (PickPlaceCan moves
  its four visual target objects into the goal bin by writing ``body_pos``/``body_quat`` at every reset;
  those values are deterministic, so the XML gets them);
* ``robosuite/<task>/scene.json``: what a batched re-implementation of the task needs (joint, actuator,
  site names and addresses, the OSC_POSE and gripper parameters, initial posture and its noise, the
  placement samplers, object sizes, success thresholds, the physics options, and the model fields
  robosuite re-draws at every reset: Lift's cube half-sizes, uniform in [0.020, 0.022] per axis; the
  scene.xml holds the draw of seed 0);
* ``robosuite/assets/...``: the meshes and textures, shared by the scenes.

Keeping the assets small (the repository carries them):

* Collision meshes, and every mesh a geom of inertia group 0 or a textured material uses, are copied
  byte for byte, so the physics of the loaded model is robosuite's.
* Visual-only meshes (every geom using them has ``contype=conaffinity=0``, a group outside the
  compiler's ``inertiagrouprange``, and no texture) are rewritten as MuJoCo's binary ``.msh`` with
  duplicate vertex positions merged and without normals or texture coordinates. robosuite's Panda
  visual OBJs repeat each position ~5 times with per-corner normals (38 MB of text for ~190k
  triangles); the welded ``.msh`` holds the same triangles in ~3 MB. MuJoCo recomputes the normals
  (crease-preserving, ``smoothnormal="false"``), so shading differs slightly from robosuite's; shapes
  are identical. ``--keep-visual-meshes`` copies the originals instead.
* PNG textures larger than ``--texture-max-size`` pixels (default 256) are downscaled (Lanczos);
  smaller ones are copied as they are. ``--texture-max-size 0`` keeps every original (+8 MB).

Checks (printed, and ``--check`` runs only them): the scene compiled from the written XML has robosuite's
sizes (nq, nv, nu, nbody, ngeom, ...), options (timestep, solver, cone, iterations, ...) and every
physics-relevant model array bit for bit (only mesh/texture data, the rendering bounds of the rewritten
visual geoms, asset paths, and the inertial frame MuJoCo assigns to PickPlaceCan's massless, joint-less
visual target bodies once their pose is in the XML may differ); ``mj_step`` from robosuite's state after reset and after
random actions gives the same qpos/qvel as robosuite's own model (printed as the max abs difference).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "robosuite"
TASKS = ("Lift", "PickPlaceCan", "NutAssemblySquare", "TwoArmTransport")
ENV_KWARGS = dict(robots="Panda", has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False,
                  ignore_done=True, horizon=400, reward_shaping=False)
TASK_KWARGS = {"TwoArmTransport": dict(robots=["Panda", "Panda"], horizon=800)}


def env_kwargs(task: str) -> dict[str, Any]:
    """robosuite.make's keyword arguments for ``task`` (the worker's)."""
    return {**ENV_KWARGS, **TASK_KWARGS.get(task, {})}


# ----------------------------------------------------------------------------------------------------------
# robosuite


def load_compat() -> Any:
    """flowrl's robosuite compatibility module, loaded from its file (it imports only mujoco and numpy), so
    this script does not depend on the rest of the package importing cleanly."""
    for rel in ("backends/robosuite_compat.py", "robosuite_compat.py"):
        path = HERE.parent / rel
        if path.exists():
            spec = importlib.util.spec_from_file_location("_flowrl_robosuite_compat", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    import flowrl.envs.robosuite_compat as module  # installed, non-editable layout
    return module


def make_env(task: str, seed: int = 0) -> Any:
    """A robosuite env built as flowrl's worker builds it, its generator seeded, after one reset."""
    os.environ["MUJOCO_GL"] = "disable"
    load_compat().apply()
    import robosuite

    env = robosuite.make(task, **env_kwargs(task))
    env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
    env.reset()
    return env


def robosuite_assets_root() -> Path:
    import robosuite

    return Path(os.path.realpath(Path(robosuite.__file__).parent / "models" / "assets"))


# ----------------------------------------------------------------------------------------------------------
# meshes and textures


def read_mesh_triangles(path: Path) -> np.ndarray:
    """(F, 3, 3) float32 triangle corners of an OBJ (polygons fanned) or STL (binary or ASCII) file."""
    if path.suffix.lower() == ".obj":
        verts, faces = [], []
        for line in path.read_text().splitlines():
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "v":
                verts.append([float(x) for x in parts[1:4]])
            elif parts[0] == "f":
                idx = [int(c.split("/")[0]) for c in parts[1:]]
                idx = [i - 1 if i > 0 else len(verts) + i for i in idx]
                faces += [[idx[0], idx[k], idx[k + 1]] for k in range(1, len(idx) - 1)]
        return np.asarray(verts, np.float32)[np.asarray(faces)]
    data = path.read_bytes()
    if len(data) >= 84:
        (n,) = struct.unpack_from("<I", data, 80)
        if len(data) == 84 + 50 * n:
            rec = np.frombuffer(data, np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]), n, 84)
            return rec["v"].astype(np.float32)
    corners = [[float(x) for x in line.split()[1:4]] for line in data.decode().splitlines()
               if line.strip().startswith("vertex")]
    return np.asarray(corners, np.float32).reshape(-1, 3, 3)


def write_msh(triangles: np.ndarray, dst: Path) -> None:
    """MuJoCo's binary mesh format: int32 nvertex, nnormal, ntexcoord, nface, then float32 positions and
    int32 faces. Identical positions are merged; no normals or texture coordinates (MuJoCo computes
    normals)."""
    verts, inverse = np.unique(triangles.reshape(-1, 3), axis=0, return_inverse=True)
    faces = inverse.reshape(-1, 3).astype(np.int32)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as f:
        f.write(struct.pack("<4i", len(verts), 0, 0, len(faces)))
        f.write(verts.astype("<f4").tobytes())
        f.write(faces.astype("<i4").tobytes())


def write_texture(src: Path, dst: Path, max_size: int) -> None:
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as image:
        w, h = image.size
        if max_size <= 0 or max(w, h) <= max_size or src.suffix.lower() != ".png":
            shutil.copyfile(src, dst)
            return
        scale = max_size / max(w, h)
        image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS).save(
            dst, "PNG", optimize=True)


def visual_only_meshes(model: Any, inertia_groups: tuple[int, int]) -> set[str]:
    """Names of meshes that only untextured, non-colliding geoms outside the inertia groups use."""
    import mujoco

    used: dict[int, list[int]] = {}
    for g in range(model.ngeom):
        if model.geom_type[g] == mujoco.mjtGeom.mjGEOM_MESH:
            used.setdefault(int(model.geom_dataid[g]), []).append(g)
    names = set()
    for mesh, geoms in used.items():
        ok = True
        for g in geoms:
            colliding = model.geom_contype[g] != 0 or model.geom_conaffinity[g] != 0
            inertial = inertia_groups[0] <= model.geom_group[g] <= inertia_groups[1]
            mat = int(model.geom_matid[g])
            textured = mat >= 0 and bool((model.mat_texid[mat] >= 0).any())
            ok &= not (colliding or inertial or textured)
        if ok:
            names.add(mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_MESH, mesh))
    return names


# ----------------------------------------------------------------------------------------------------------
# the scene XML


def scene_xml(env: Any, out: Path, texture_max_size: int, keep_visual_meshes: bool,
              write_assets: bool = True) -> str:
    """robosuite's compiled MJCF with repository-relative asset paths; copies/converts the assets."""
    model = env.sim.model._model
    root = ET.fromstring(env.edit_model_xml(env.model.get_xml()))
    compiler = root.find("compiler")
    inertia_groups = (0, 5)
    if compiler is not None:
        if "inertiagrouprange" in compiler.attrib:
            lo, hi = compiler.get("inertiagrouprange").split()
            inertia_groups = (int(lo), int(hi))
        for key in ("meshdir", "texturedir", "assetdir"):
            compiler.attrib.pop(key, None)
    visual = set() if keep_visual_meshes else visual_only_meshes(model, inertia_groups)
    # a body without an <inertial> element may take its inertia from its geoms' shapes: keep its meshes exact
    for body in root.iter("body"):
        if body.find("inertial") is None:
            visual -= {g.get("mesh") for g in body.findall("geom") if g.get("mesh")}
    assets_root = robosuite_assets_root()
    files: dict[str, list[ET.Element]] = {}
    for elem in root.iter():
        if elem.tag in ("mesh", "texture", "hfield", "skin") and elem.get("file"):
            files.setdefault(elem.get("file"), []).append(elem)
    for src, elems in files.items():
        real = Path(os.path.realpath(src))
        rel = real.relative_to(assets_root).as_posix()
        convert = (all(e.tag == "mesh" and e.get("name") in visual for e in elems)
                   and real.suffix.lower() in (".obj", ".stl"))
        if convert:
            rel = str(Path(rel).with_suffix(".msh"))
        dst = out / "assets" / rel
        if write_assets:
            if convert:
                write_msh(read_mesh_triangles(real), dst)
            elif elems[0].tag == "texture":
                write_texture(real, dst, texture_max_size)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(real, dst)
        for e in elems:
            e.set("file", f"../assets/{rel}")
    return _bake_runtime_edits(root, model)


def _fmt(values: np.ndarray) -> str:
    return " ".join(repr(float(v)) for v in values)


def _bake_runtime_edits(root: ET.Element, runtime: Any) -> str:
    """Write what robosuite sets on the compiled model after compiling into the XML: body poses (PickPlace's
    visual target objects) and site colours (its reset hides the visualisation sites with alpha 0)."""
    import mujoco

    xml = ET.tostring(root, encoding="unicode")
    compiled = _compile_string(xml, root)
    bodies = {b.get("name"): b for b in root.iter("body") if b.get("name")}
    changed = False
    for i in range(runtime.nbody):
        name = mujoco.mj_id2name(runtime, mujoco.mjtObj.mjOBJ_BODY, i)
        if (np.array_equal(compiled.body_pos[i], runtime.body_pos[i])
                and np.array_equal(compiled.body_quat[i], runtime.body_quat[i])):
            continue
        elem = bodies[name]
        elem.set("pos", _fmt(runtime.body_pos[i]))
        for key in ("euler", "axisangle", "xyaxes", "zaxis"):
            elem.attrib.pop(key, None)
        elem.set("quat", _fmt(runtime.body_quat[i]))
        changed = True
    sites = {s.get("name"): s for s in root.iter("site") if s.get("name")}
    for i in range(runtime.nsite):
        if not np.array_equal(compiled.site_rgba[i], runtime.site_rgba[i]):
            sites[mujoco.mj_id2name(runtime, mujoco.mjtObj.mjOBJ_SITE, i)].set(
                "rgba", " ".join(repr(float(np.float32(v))) for v in runtime.site_rgba[i]))
            changed = True
    if changed:
        xml = ET.tostring(root, encoding="unicode")
    tree = ET.ElementTree(ET.fromstring(xml))
    ET.indent(tree, space="  ")
    return ET.tostring(tree.getroot(), encoding="unicode") + "\n"


def _compile_string(xml: str, root: ET.Element) -> Any:
    """Compile XML whose asset paths are relative to OUT/<task>/ (written there temporarily)."""
    import mujoco

    tmp = OUT / "_tmp_compile" / "scene.xml"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_text(xml)
        return mujoco.MjModel.from_xml_path(str(tmp))
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# facts for the batched task


def _name(model: Any, kind: Any, i: int) -> str:
    import mujoco

    return mujoco.mj_id2name(model, kind, int(i))


def _list(x: Any) -> Any:
    if x is None:
        return None
    if isinstance(x, (str, bool)):
        return x
    if isinstance(x, (int, float, np.integer, np.floating)):
        return float(x) if isinstance(x, (float, np.floating)) else int(x)
    return [_list(v) for v in x]


def sampler_facts(sampler: Any) -> list[dict[str, Any]]:
    """The placement samplers in the order robosuite runs them (each draws from env.rng)."""
    from robosuite.utils.placement_samplers import SequentialCompositeSampler

    if isinstance(sampler, SequentialCompositeSampler):
        out = []
        for name, sub in sampler.samplers.items():
            for entry in sampler_facts(sub):
                entry["sample_args"] = sampler.sample_args.get(name)
                out.append(entry)
        return out
    return [{
        "name": sampler.name, "type": type(sampler).__name__,
        "objects": [o.name for o in sampler.mujoco_objects],
        "x_range": _list(sampler.x_range), "y_range": _list(sampler.y_range),
        "rotation": _list(sampler.rotation), "rotation_axis": sampler.rotation_axis,
        "reference_pos": _list(sampler.reference_pos), "z_offset": _list(sampler.z_offset),
        "ensure_object_boundary_in_range": bool(sampler.ensure_object_boundary_in_range),
        "ensure_valid_placement": bool(sampler.ensure_valid_placement),
    }]


def robot_facts(env: Any, robot: Any) -> dict[str, Any]:
    """One robot's joints, actuators, sites, initial posture and noise (its controller's parameters are in
    :func:`controller_facts`)."""
    import mujoco

    m = env.sim.model._model
    d = env.sim.data._data
    J, A, S, B = (mujoco.mjtObj.mjOBJ_JOINT, mujoco.mjtObj.mjOBJ_ACTUATOR, mujoco.mjtObj.mjOBJ_SITE,
                  mujoco.mjtObj.mjOBJ_BODY)
    arm = robot.part_controllers["right"]
    gripper = robot.gripper["right"]
    center = f"{arm.naming_prefix}{arm.part_name}_center"

    def joints(names: list[str]) -> dict[str, Any]:
        ids = [mujoco.mj_name2id(m, J, n) for n in names]
        return {"names": names, "ids": ids, "qpos_adr": [int(m.jnt_qposadr[i]) for i in ids],
                "dof_adr": [int(m.jnt_dofadr[i]) for i in ids], "range": _list(m.jnt_range[ids])}

    def actuators(ids: list[int]) -> dict[str, Any]:
        return {"names": [_name(m, A, i) for i in ids], "ids": ids, "ctrlrange": _list(m.actuator_ctrlrange[ids])}

    noise = dict(robot.initialization_noise)
    return {
        "name": robot.name, "root_body": robot.robot_model.root_body,
        "base_pos": _list(d.xpos[mujoco.mj_name2id(m, B, robot.robot_model.root_body)]),
        "arm_joints": joints(list(robot.robot_joints)), "gripper_joints": joints(list(robot.gripper_joints["right"])),
        "arm_actuators": actuators([int(i) for i in robot._ref_actuators_indexes_dict["right"]]),
        "gripper_actuators": actuators([int(i) for i in robot._ref_actuators_indexes_dict["right_gripper"]]),
        "eef_site": {"name": arm.ref_name, "id": mujoco.mj_name2id(m, S, arm.ref_name),
                     "body": _name(m, B, m.site_bodyid[mujoco.mj_name2id(m, S, arm.ref_name)])},
        "hand_body": f"{robot.robot_model.naming_prefix}right_hand",
        "controller_origin_site": {"name": center, "id": mujoco.mj_name2id(m, S, center),
                                   "pos": _list(d.site_xpos[mujoco.mj_name2id(m, S, center)]),
                                   "mat": _list(d.site_xmat[mujoco.mj_name2id(m, S, center)].reshape(3, 3))},
        "init_qpos": _list(robot.init_qpos),
        "init_noise": {"type": noise["type"], "magnitude": float(noise["magnitude"]),
                       "applies_to": "arm joints; drawn from env.rng (robot 0, then robot 1) before object placement",
                       "nullspace_target": "the noisy initial arm qpos of the episode"},
        "gripper_init_qpos": _list(gripper.init_qpos),
    }


def controller_facts(robot: Any) -> dict[str, Any]:
    """The OSC_POSE and gripper controller parameters of one robot."""
    arm = robot.part_controllers["right"]
    grip = robot.part_controllers["right_gripper"]
    gripper = robot.gripper["right"]
    cfg = robot.part_controller_config["right"]
    return {
        "osc": {
            "type": arm.name, "composite": robot.composite_controller.name,
            "kp": _list(arm.kp), "damping_ratio": float(cfg["damping_ratio"]), "kd": _list(arm.kd),
            "input_max": _list(arm.input_max), "input_min": _list(arm.input_min),
            "output_max": _list(arm.output_max), "output_min": _list(arm.output_min),
            "uncouple_pos_ori": bool(arm.uncoupling), "impedance_mode": arm.impedance_mode,
            "input_type": arm.input_type, "input_ref_frame": arm.input_ref_frame,
            "goal_update_mode": arm._goal_update_mode, "interpolation": cfg.get("interpolation"),
            "position_limits": _list(arm.position_limits), "orientation_limits": _list(arm.orientation_limits),
            "nullspace_joint_kp": 10.0, "nullspace_joint_kv": 2 * math.sqrt(10.0),
            "torque_min": _list(arm.actuator_min), "torque_max": _list(arm.actuator_max),
            "control_freq": float(arm.control_freq), "model_timestep": float(arm.model_timestep),
        },
        "gripper": {
            "type": type(gripper).__name__, "controller": grip.name, "dof": int(gripper.dof),
            "speed": float(gripper.speed),
            "rule": "state += [-1, 1] * speed * sign(action) clipped to [-1, 1], once per control step (state zero at"
                    " reset); ctrl = mid(ctrlrange) + half_width(ctrlrange) * state, clipped to ctrlrange",
            "input_max": _list(grip.input_max), "input_min": _list(grip.input_min),
            "output_max": _list(grip.output_max), "output_min": _list(grip.output_min),
            "ctrlrange": _list(np.stack([grip.actuator_min, grip.actuator_max], -1)),
        },
    }


HAMMER_INIT_QUATS_XYZW = ([0.5, -0.5, 0.5, -0.5], [-0.5, -0.5, -0.5, -0.5])
"""robosuite's ``HammerObject.init_quat``: the first where ``rng.random() >= 0.5``, else the second."""


def transport_facts(env: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """TwoArmTransport's success rule (contacts between geom groups), then the rest its batched task needs:
    what its observation reads, how its reset puts the lid, payload and trash on their bins, the payload's
    initial orientations."""
    import mujoco

    m = env.sim.model._model
    tr = env.transport
    bodies = {g: _name(m, mujoco.mjtObj.mjOBJ_BODY, m.geom_bodyid[g]) for g in tr.payload_geom_ids + tr.trash_geom_ids}
    for group, body in ((tr.payload_geom_ids, tr.payload.root_body), (tr.trash_geom_ids, tr.trash.root_body)):
        colliding = {g for g in range(m.ngeom) if _name(m, mujoco.mjtObj.mjOBJ_BODY, m.geom_bodyid[g]) == body
                     and (m.geom_contype[g] or m.geom_conaffinity[g])}
        if colliding != set(group) or {bodies[g] for g in group} != {body}:
            raise RuntimeError(f"TwoArmTransport: {body}'s contact geoms are not its body's colliding geoms")
    success = {
        "rule": "payload_in_target_bin and trash_in_trash_bin; each is robosuite's check_contact: some contact"
                " (any distance) between a geom of `geoms` and one of `body` (its colliding geoms are the object's"
                " contact geoms)",
        "payload_in_target_bin": {"geoms": list(tr.target_bin.base_geoms), "body": tr.payload.root_body},
        "trash_in_trash_bin": {"geoms": list(tr.trash_bin.base_geoms), "body": tr.trash.root_body}}
    return success, {
        "payload_body": tr.payload.root_body, "trash_body": tr.trash.root_body,
        "lid_handle_geom": tr.lid.handle_geoms[0],
        "target_bin_base_geom": tr.target_bin.base_geoms[0], "trash_bin_base_geom": tr.trash_bin.base_geoms[0],
        "arrangement": {
            "rule": "after sampling: the lid at the start bin's (x, y), z + bin height; the payload at the start bin's"
                    " (x, y), z + its wall thickness; the trash at the target bin's (x, y), z + its wall thickness",
            "start_bin": tr.start_bin.name, "target_bin": tr.target_bin.name, "lid": tr.lid.name,
            "payload": tr.payload.name, "trash": tr.trash.name, "bin_height": float(tr.bin_size[2]),
            "start_bin_wall_thickness": float(tr.start_bin.wall_thickness),
            "target_bin_wall_thickness": float(tr.target_bin.wall_thickness)},
        "payload_init_quat": {"choices_xyzw": [list(q) for q in HAMMER_INIT_QUATS_XYZW],
                              "draw": "the sampler evaluates init_quat twice (hasattr, then use), each a"
                                      " rng.random() after the rotation's draw: the second picks the first choice"
                                      " when >= 0.5", "combine": "quat_multiply(sampled wxyz read as xyzw,"
                                      " init_quat xyzw), used as wxyz"},
    }


def scene_facts(task: str, env: Any) -> dict[str, Any]:
    import mujoco
    import robosuite

    m = env.sim.model._model
    d = env.sim.data._data
    J, B = mujoco.mjtObj.mjOBJ_JOINT, mujoco.mjtObj.mjOBJ_BODY
    controllers = [controller_facts(r) for r in env.robots]
    if any(c != controllers[0] for c in controllers):
        raise RuntimeError(f"{task}: the robots' controllers differ; scene.json holds one set of parameters")

    objects = []
    for obj in env.model.mujoco_objects:
        entry = {"name": obj.name, "root_body": obj.root_body, "joints": list(obj.joints),
                 "horizontal_radius": float(obj.horizontal_radius), "bottom_offset": _list(obj.bottom_offset),
                 "top_offset": _list(obj.top_offset),
                 "visual": not obj.joints}
        if obj.joints:
            j = mujoco.mj_name2id(m, J, obj.joints[0])
            entry["qpos_adr"] = int(m.jnt_qposadr[j])
            entry["dof_adr"] = int(m.jnt_dofadr[j])
        objects.append(entry)

    active, cleared, extra = None, [], {}
    if hasattr(env, "single_object_mode") and env.single_object_mode == 2:
        active = env.obj_to_use
        cleared = sorted(o["name"] for o in objects if not o["visual"] and o["name"] != active)
    reach = math.atanh(0.4) / 10.0  # r_reach = 1 - tanh(10 d) < 0.6  <=>  d > atanh(0.4) / 10
    if task == "Lift":
        success = {"rule": "body cube_main z > table_offset_z + 0.04", "body": env.cube.root_body,
                   "table_offset": _list(env.table_offset), "z_above_table": 0.04}
    elif task == "PickPlaceCan":
        i = env.object_id
        lo = np.array(env.bin2_pos[:2], dtype=float)
        if i in (0, 2):
            lo[0] -= env.bin_size[0] / 2
        if i < 2:
            lo[1] -= env.bin_size[1] / 2
        hi = lo + np.array(env.bin_size[:2]) / 2
        success = {"rule": "object body strictly inside its target bin quarter (x, y) with bin2_z < z < bin2_z + 0.1,"
                           " and the grip site farther than eef_min_distance from it",
                   "body": env.objects[i].root_body, "x_range": _list([lo[0], hi[0]]), "y_range": _list([lo[1], hi[1]]),
                   "z_range": _list([env.bin2_pos[2], env.bin2_pos[2] + 0.1]), "eef_min_distance": reach,
                   "bin1_pos": _list(env.bin1_pos), "bin2_pos": _list(env.bin2_pos), "bin_size": _list(env.bin_size)}
    elif task == "NutAssemblySquare":
        peg = _name(m, B, env.peg1_body_id if env.nut_id == 0 else env.peg2_body_id)
        success = {"rule": "|nut_x - peg_x| < 0.03 and |nut_y - peg_y| < 0.03 and nut_z < table_offset_z + 0.05,"
                           " and the grip site farther than eef_min_distance from the nut",
                   "body": env.nuts[env.nut_id].root_body, "peg_body": peg,
                   "peg_pos": _list(d.xpos[mujoco.mj_name2id(m, B, peg)]), "xy_tolerance": 0.03,
                   "table_offset": _list(env.table_offset), "z_above_table_max": 0.05, "eef_min_distance": reach}
    elif task == "TwoArmTransport":
        success, extra["transport"] = transport_facts(env)
    else:
        raise RuntimeError(f"{task}: no success rule known")

    low, high = env.action_spec
    return {
        "task": task, "robosuite_version": robosuite.__version__, "mujoco_version_at_extraction": mujoco.__version__,
        "xml": "scene.xml", "env_kwargs": env_kwargs(task),
        "model": {"nq": m.nq, "nv": m.nv, "nu": m.nu, "nbody": m.nbody, "njnt": m.njnt, "ngeom": m.ngeom,
                  "nsite": m.nsite, "nmesh": m.nmesh},
        "physics": {"timestep": float(m.opt.timestep), "solver": mujoco.mjtSolver(m.opt.solver).name,
                    "cone": mujoco.mjtCone(m.opt.cone).name, "integrator": mujoco.mjtIntegrator(m.opt.integrator).name,
                    "jacobian": mujoco.mjtJacobian(m.opt.jacobian).name, "iterations": int(m.opt.iterations),
                    "ls_iterations": int(m.opt.ls_iterations), "tolerance": float(m.opt.tolerance),
                    "impratio": float(m.opt.impratio), "gravity": _list(m.opt.gravity)},
        "control": {"control_freq": float(env.control_freq), "control_timestep": float(env.control_timestep),
                    "model_timestep": float(env.model_timestep),
                    "substeps": int(round(env.control_timestep / env.model_timestep)), "horizon": env.horizon,
                    "lite_physics": bool(env.lite_physics),
                    "action_low": _list(low), "action_high": _list(high),
                    "action_layout": "per robot, in order: [0:6] OSC_POSE delta (x, y, z, ax, ay, az) in the robot base"
                                     " frame, [6] gripper"},
        "robots": [robot_facts(env, r) for r in env.robots],
        **controllers[0],
        "objects": objects, "active_object": active, "cleared_objects": cleared,
        "cleared_object_qpos": [10.0, 10.0, 10.0, 1.0, 0.0, 0.0, 0.0] if cleared else None,
        "placement": {
            "samplers": sampler_facts(env.placement_initializer),
            "applied_as": "free-joint qpos = (pos, quat wxyz) for objects with a joint; model body_pos/body_quat for"
                          " visual objects (baked into scene.xml); cleared objects then moved to cleared_object_qpos",
            "rejection": "UniformRandomSampler: up to 5000 draws per object; with ensure_valid_placement an object is"
                         " rejected if its xy distance to an already placed one is <= the sum of their"
                         " horizontal radii and z - z_other <= top_offset_other - bottom_offset_self",
            "z": "z = reference_pos_z + z_offset - bottom_offset_z (on_top=True); x, y = reference_pos +"
                 " uniform(range), ranges shrunk by horizontal_radius with ensure_object_boundary_in_range",
            "rotation": "None: uniform(0, 2 pi); (a, b): uniform(min, max); a number: fixed; quat wxyz about"
                        " rotation_axis",
        },
        "success": success, **extra,
    }


# ----------------------------------------------------------------------------------------------------------
# checks


_ASSET_FIELDS = ("mesh_", "tex_", "bvh_", "oct_", "paths", "names", "name_", "nmeshvert", "nmeshface",
                 "nmeshnormal", "nmeshtexcoord", "nmeshgraph", "nmeshpoly", "nmeshpolyvert", "nmeshpolymap",
                 "ntexdata", "npaths", "nnames", "nbuffer", "nbvh", "noct", "nbvhstatic", "nbvhdynamic", "nnames_map",
                 "names_map", "tex_data")


def compare_models(ref: Any, new: Any, visual_geoms: set[int]) -> list[str]:
    """Fields that differ outside what asset rewriting may change (empty when the physics model is robosuite's)."""
    problems = []
    static_massless = {b for b in range(ref.nbody) if ref.body_mass[b] == 0 and ref.body_jntnum[b] == 0
                       and ref.body_parentid[b] == 0}
    for name in dir(ref):
        if name.startswith("_") or name.startswith(_ASSET_FIELDS):
            continue
        a, b = getattr(ref, name), getattr(new, name, None)
        if isinstance(a, (int, np.integer)) and not isinstance(a, bool):
            if a != b:
                problems.append(f"{name}: {a} != {b}")
            continue
        if not isinstance(a, np.ndarray):
            continue
        if a.shape != b.shape:
            problems.append(f"{name}: shape {a.shape} != {b.shape}")
            continue
        diff = ~((a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else (a == b))
        rows = set(np.nonzero(diff.reshape(len(a), -1).any(-1))[0].tolist()) if diff.ndim and a.size else set()
        if name in ("geom_aabb", "geom_rbound", "geom_pos", "geom_quat") and rows <= visual_geoms:
            continue
        if name in ("body_ipos", "body_iquat", "body_sameframe", "body_simple") and rows <= static_massless:
            continue  # the compiler's inertial frame of a massless body welded to the world: no physics
        if diff.any():
            problems.append(f"{name}: {int(diff.sum())} entries differ")
    for name in ("timestep", "solver", "cone", "integrator", "jacobian", "iterations", "ls_iterations", "tolerance",
                 "ls_tolerance", "impratio", "noslip_iterations", "ccd_iterations", "disableflags", "enableflags"):
        if getattr(ref.opt, name) != getattr(new.opt, name):
            problems.append(f"opt.{name}: {getattr(ref.opt, name)} != {getattr(new.opt, name)}")
    for name in ("gravity", "wind", "magnetic", "o_margin", "o_solref", "o_solimp", "o_friction"):
        if not np.array_equal(getattr(ref.opt, name), getattr(new.opt, name)):
            problems.append(f"opt.{name} differs")
    if ref.stat.meaninertia != new.stat.meaninertia:
        problems.append("stat.meaninertia differs")
    return problems


def step_difference(env: Any, new: Any, nsteps: int = 25) -> float:
    """Max |qpos, qvel, qacc difference| over nsteps of mj_step of robosuite's model and ours, from robosuite's
    current full integration state (controls included)."""
    import mujoco

    ref = env.sim.model._model
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(ref, spec))
    mujoco.mj_getState(ref, env.sim.data._data, state, spec)
    d_ref, d_new = mujoco.MjData(ref), mujoco.MjData(new)
    mujoco.mj_setState(ref, d_ref, state, spec)
    mujoco.mj_setState(new, d_new, state, spec)
    worst = 0.0
    for _ in range(nsteps):
        mujoco.mj_step(ref, d_ref)
        mujoco.mj_step(new, d_new)
        for f in ("qpos", "qvel", "qacc"):
            worst = max(worst, float(np.abs(getattr(d_ref, f) - getattr(d_new, f)).max()))
    return worst


def check(task: str, env: Any, verbose: bool = True) -> dict[str, Any]:
    import mujoco

    new = mujoco.MjModel.from_xml_path(str(OUT / task / "scene.xml"))
    ref = env.sim.model._model
    visual = visual_only_meshes(ref, (0, 0))
    visual_geoms = {g for g in range(ref.ngeom) if ref.geom_type[g] == mujoco.mjtGeom.mjGEOM_MESH
                    and _name(ref, mujoco.mjtObj.mjOBJ_MESH, ref.geom_dataid[g]) in visual}
    problems = compare_models(ref, new, visual_geoms)
    rng = np.random.default_rng(1)
    diffs = [step_difference(env, new)]
    for _ in range(3):
        for _ in range(10):
            env.step(rng.uniform(-1, 1, env.action_dim))
        diffs.append(step_difference(env, new))
    result = {"task": task, "problems": problems, "max_step_diff": max(diffs),
              "dims": {k: (getattr(ref, k), getattr(new, k)) for k in ("nq", "nv", "nu", "nbody", "ngeom")}}
    if verbose:
        print(f"{task}: dims {result['dims']}, timestep {new.opt.timestep}, solver "
              f"{mujoco.mjtSolver(new.opt.solver).name}; model differences: {problems or 'none'}; "
              f"max |qpos/qvel/qacc| difference over 4 x 25 mj_steps: {result['max_step_diff']:.3g}")
    return result


def reset_randomization(task: str, env: Any) -> list[dict[str, Any]]:
    """The model fields robosuite re-draws at every reset (it rebuilds the model: ``hard_reset=True``), found by
    resetting again and comparing, with the rule read from robosuite's source. scene.xml holds one draw."""
    import copy

    import mujoco

    before = copy.copy(env.sim.model._model)
    env.reset()
    after = env.sim.model._model
    changed = sorted(n for n in dir(before) if not n.startswith("_") and isinstance(getattr(before, n), np.ndarray)
                     and getattr(before, n).shape == getattr(after, n).shape
                     and not np.array_equal(getattr(before, n), getattr(after, n)))
    if not changed:
        return []
    geoms = [_name(after, mujoco.mjtObj.mjOBJ_GEOM, g) for g in range(after.ngeom)
             if not np.array_equal(before.geom_size[g], after.geom_size[g])]
    if task == "TwoArmTransport":
        payload = env.transport.payload
        return [{"what": "the payload hammer's head half-size (robosuite's HammerObject head_halfsize)", "geoms": geoms,
                 "body": payload.root_body, "low": float(payload.handle_radius),
                 "high": float(1.2 * payload.handle_radius),
                 "draw": "when the model is rebuilt at reset, before the robots' init noise: four env.rng.uniform(a, a)"
                         " for the handle's fixed radius, length, density and friction, then"
                         " env.rng.uniform(low, high)", "fields_that_follow": changed}]
    if task != "Lift":
        raise RuntimeError(f"{task}: model fields {changed} change between resets and no rule is known for them")
    return [{"what": "cube half-sizes (robosuite's BoxObject size_min/size_max)", "geoms": geoms,
             "body": env.cube.root_body, "low": [0.020, 0.020, 0.020], "high": [0.022, 0.022, 0.022],
             "density": 1000.0, "draw": "env.rng.uniform(low_i, high_i) for x, y, z, when the model is rebuilt at"
             " reset: before the robot's init noise and the placement (which uses the new size)",
             "fields_that_follow": changed}]


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    parser.add_argument("--texture-max-size", type=int, default=256,
                        help="downscale PNG textures larger than this (pixels, longest side); 0 keeps them all")
    parser.add_argument("--keep-visual-meshes", action="store_true",
                        help="copy visual meshes as they are instead of welded .msh (+35 MB)")
    parser.add_argument("--check", action="store_true", help="only compare the shipped scenes with robosuite")
    args = parser.parse_args(argv)

    if not args.check and set(args.tasks) == set(TASKS) and (OUT / "assets").exists():
        shutil.rmtree(OUT / "assets")  # no stale assets from an earlier run
    failed = False
    for task in args.tasks:
        env = make_env(task)
        try:
            if not args.check:
                xml = scene_xml(env, OUT, args.texture_max_size, args.keep_visual_meshes)
                (OUT / task).mkdir(parents=True, exist_ok=True)
                (OUT / task / "scene.xml").write_text(xml)
                facts = scene_facts(task, env)
            result = check(task, env)
            if not args.check:
                facts["reset_randomization"] = reset_randomization(task, env)
                (OUT / task / "scene.json").write_text(json.dumps(facts, indent=1) + "\n")
            failed |= bool(result["problems"]) or result["max_step_diff"] > 1e-12
        finally:
            env.close()
    print(f"{OUT.relative_to(HERE.parent.parent)}: {tree_size(OUT) / 1e6:.2f} MB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
