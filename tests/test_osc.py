"""Our batched OSC_POSE and gripper mapping (flowrl.envs.controllers) against robosuite 1.5.2's own controllers,
and the robosuite scenes shipped in envs/assets/robosuite against robosuite's compiled models.

How robosuite's torques are read: robosuite runs every physics substep as ``mj_step1`` ->
``robot.control(action, policy_step)`` -> ``mj_step2``. ``robot.control`` updates the controller's origin,
calls ``set_goal`` on the first substep of a control step, runs the arm controller (whose return value,
``controller.torques``, is the unclipped OSC output) and the gripper controller, clips both to the actuators'
ctrlrange and writes ``data.ctrl``. The tests replace ``robot.control`` on the robot instance by a wrapper that
calls the original and then copies the MjData fields the state is made of (qpos, qvel, site poses, joint
anchors/axes, qfrc_bias, the CSR mass matrix ``M``), robosuite's unclipped arm torques and the ``ctrl`` it
wrote. Between ``mj_step1`` and ``mj_step2`` nothing changes the state (robosuite's ``lite_physics``), so each
record is exactly the state robosuite computed its torques from. Ours are then computed from the recorded
fields alone, with our own Jacobian and mass-matrix helpers.

Skipped where robosuite is not installed; the shipped-scene tests that need only MuJoCo always run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mujoco
import numpy as np
import pytest
import torch

from flowrl.envs.controllers import (
    ArmIndices,
    OSCConfig,
    OSCPose,
    PandaGripper,
    delta_rotation,
    gather_mass_matrix,
    mass_matrix_index,
    orientation_error,
    site_jacobian,
)

# mujoco.batch binds its outputs read-only; torch warns when it wraps them (we only read them)
pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

SCENES = Path(__file__).resolve().parents[1] / "envs" / "assets" / "robosuite"
TASKS = ("Lift", "PickPlaceCan", "NutAssemblySquare")
ENV_KWARGS = dict(robots="Panda", has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False,
                  ignore_done=True, horizon=400, reward_shaping=False)
RECORDED = ("qpos", "qvel", "site_xpos", "site_xmat", "xanchor", "xaxis", "qfrc_bias", "M", "ctrl")


def facts(task: str) -> dict[str, Any]:
    return json.loads((SCENES / task / "scene.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# shipped scenes, MuJoCo only


@pytest.mark.parametrize("task", TASKS)
def test_shipped_scene_loads_without_robosuite(task: str) -> None:
    f = facts(task)
    model = mujoco.MjModel.from_xml_path(str(SCENES / task / "scene.xml"))
    for key, value in f["model"].items():
        assert getattr(model, key) == value, key
    assert model.opt.timestep == f["physics"]["timestep"] == 0.002
    assert mujoco.mjtSolver(model.opt.solver).name == f["physics"]["solver"] == "mjSOL_NEWTON"
    assert f["control"]["substeps"] == 25 and f["control"]["control_freq"] == 20.0
    names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_ACTUATOR, i) for i in f["robots"][0]["arm_actuators"]["ids"]]
    assert names == f["robots"][0]["arm_actuators"]["names"]
    site = f["robots"][0]["eef_site"]
    assert mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, site["name"]) == site["id"]
    np.testing.assert_array_equal(model.actuator_ctrlrange[f["robots"][0]["arm_actuators"]["ids"]],
                                  np.stack([f["osc"]["torque_min"], f["osc"]["torque_max"]], -1))
    data = mujoco.MjData(model)
    mujoco.mj_step(model, data)  # it simulates
    assert np.isfinite(data.qpos).all()


def test_shipped_assets_stay_small() -> None:
    size = sum(p.stat().st_size for p in SCENES.rglob("*") if p.is_file())
    assert size < 8e6, f"{size / 1e6:.1f} MB"


def _lift_state(model: mujoco.MjModel, seed: int = 0) -> mujoco.MjData:
    """A moving, non-trivial arm state of the shipped Lift scene (no robosuite needed)."""
    f = facts("Lift")
    data = mujoco.MjData(model)
    rng = np.random.default_rng(seed)
    arm = f["robots"][0]["arm_joints"]
    data.qpos[arm["qpos_adr"]] = np.asarray(f["robots"][0]["init_qpos"]) + rng.normal(0, 0.3, 7)
    data.qvel[arm["dof_adr"]] = rng.normal(0, 1.0, 7)
    mujoco.mj_forward(model, data)
    return data


def test_site_jacobian_and_mass_matrix_helpers_match_mujoco() -> None:
    """Torch Jacobian from xanchor/xaxis equals mj_jacSite; the CSR gather of M equals mj_fullM's arm block,
    also through mujoco.batch's bind("M")."""
    f = facts("Lift")
    model = mujoco.MjModel.from_xml_path(str(SCENES / "Lift" / "scene.xml"))
    idx = ArmIndices.from_model(model, f["robots"][0]["arm_joints"]["names"], f["robots"][0]["eef_site"]["name"])
    dofs = idx.dof_adr.numpy()
    worst_jac = worst_mass = 0.0
    for seed in range(5):
        data = _lift_state(model, seed)
        jacp, jacr = np.zeros((3, model.nv)), np.zeros((3, model.nv))
        mujoco.mj_jacSite(model, data, jacp, jacr, idx.site_id)
        ours = site_jacobian(torch.as_tensor(data.xanchor[None, idx.joint_ids.numpy()]),
                             torch.as_tensor(data.xaxis[None, idx.joint_ids.numpy()]),
                             torch.as_tensor(data.site_xpos[None, idx.site_id]))[0].numpy()
        worst_jac = max(worst_jac, np.abs(ours - np.vstack([jacp, jacr])[:, dofs]).max())
        full = np.zeros((model.nv, model.nv))
        mujoco.mj_fullM(model, data, full)
        mass = gather_mass_matrix(torch.as_tensor(data.M[None]), idx.mass_index)[0].numpy()
        worst_mass = max(worst_mass, np.abs(mass - full[np.ix_(dofs, dofs)]).max())
    assert worst_jac < 1e-14 and worst_mass == 0.0, (worst_jac, worst_mass)
    assert (mass_matrix_index(model, dofs) >= 0).all()  # a serial arm: no structural zeros

    from mujoco.batch import Batch

    datas = [_lift_state(model, seed) for seed in range(3)]
    batch = Batch(model, nsim=3, nthread=1, persistent=True)
    batch.qpos[:] = np.stack([d.qpos for d in datas])
    batch.qvel[:] = np.stack([d.qvel for d in datas])
    batch.forward(stage=mujoco.mjtStage.mjSTAGE_VEL)
    state = idx.state(*(torch.as_tensor(batch.bind(n)) for n in
                        ("qpos", "qvel", "xanchor", "xaxis", "site_xpos", "site_xmat", "qfrc_bias", "M")))
    for i, d in enumerate(datas):
        full = np.zeros((model.nv, model.nv))
        mujoco.mj_fullM(model, d, full)
        np.testing.assert_array_equal(state["mass"][i].numpy(), full[np.ix_(dofs, dofs)])
        np.testing.assert_array_equal(state["bias"][i].numpy(), d.qfrc_bias[dofs])
        np.testing.assert_array_equal(state["eef_pos"][i].numpy(), d.site_xpos[idx.site_id])


def test_delta_rotation_and_orientation_error() -> None:
    """Without robosuite's float32 rounding the delta rotation is exp(hat(v)); the orientation error of a small
    rotation about a base-frame axis is that axis-angle."""
    rng = np.random.default_rng(0)
    v = torch.as_tensor(rng.uniform(-0.5, 0.5, (64, 3)))
    r = delta_rotation(v, robosuite_rounding=False)
    hat = torch.zeros(64, 3, 3, dtype=torch.float64)
    hat[:, 0, 1], hat[:, 0, 2], hat[:, 1, 2] = -v[:, 2], v[:, 1], -v[:, 0]
    hat = hat - hat.transpose(1, 2)
    torch.testing.assert_close(r, torch.linalg.matrix_exp(hat), rtol=0, atol=1e-14)
    assert (delta_rotation(v) - r).abs().max() < 1e-6  # robosuite's float32 path differs at float32 precision
    torch.testing.assert_close(delta_rotation(torch.zeros(1, 3)), torch.eye(3, dtype=torch.float32)[None])
    small = v * 1e-3
    current = delta_rotation(v[:1].expand(64, 3), robosuite_rounding=False)
    err = orientation_error(delta_rotation(small, robosuite_rounding=False) @ current, current)
    torch.testing.assert_close(err, small, rtol=1e-5, atol=1e-9)


def test_gripper_mapping() -> None:
    g = PandaGripper(num_envs=2)
    out = [g.step(torch.tensor([1.0, -0.3])) for _ in range(6)]
    torch.testing.assert_close(out[0], torch.tensor([[0.016, -0.016], [0.024, -0.024]], dtype=torch.float64))
    torch.testing.assert_close(out[-1], torch.tensor([[0.0, 0.0], [0.04, -0.04]], dtype=torch.float64))
    g.step(torch.tensor([0.0, 0.0]))  # sign(0) = 0 holds
    torch.testing.assert_close(g.state, torch.tensor([[-1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    g.reset(torch.tensor([1]))
    torch.testing.assert_close(g.state[1], torch.zeros(2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------
# against robosuite


def _robosuite() -> Any:
    robosuite = pytest.importorskip("robosuite", reason="robosuite not installed (see README: robosuite)")
    try:
        from flowrl.envs.backends.robosuite_compat import apply
    except ImportError:
        from flowrl.envs.robosuite_compat import apply  # layout before the backends/ package
    apply()
    return robosuite


def _make(task: str, seed: int) -> Any:
    env = _robosuite().make(task, **ENV_KWARGS)
    env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
    env.reset()
    return env


def _hook(env: Any) -> list[dict[str, Any]]:
    """Record robosuite's state, unclipped arm torques and written ctrl at every substep (see the module docstring)."""
    robot = env.robots[0]
    data = env.sim.data._data
    records: list[dict[str, Any]] = []
    original = robot.control

    def control(action: np.ndarray, policy_step: bool = False) -> None:
        arm = robot.part_controllers["right"]
        stale = not arm.new_update  # a controller created at reset has not run yet: it keeps its creation state
        gripper_before = np.array(robot.gripper["right"].current_action)
        original(action, policy_step=policy_step)
        rec = {name: np.array(getattr(data, name)) for name in RECORDED}
        rec.update(torques=np.array(arm.torques), mass_used=np.array(arm.mass_matrix), stale=stale,
                   initial_joint=np.array(arm.initial_joint), gripper_before=gripper_before,
                   action=np.array(action), policy_step=policy_step)
        records.append(rec)

    robot.control = control
    return records


def _replay(env: Any, records: list[dict[str, Any]], dtype: torch.dtype = torch.float64,
            lambda_inverse: str = "pinv") -> dict[str, float]:
    """Our controller on the recorded states: max differences from robosuite's torques and ctrl."""
    f = facts(type(env).__name__)
    model = env.sim.model._model
    idx = ArmIndices.from_model(model, f["robots"][0]["arm_joints"]["names"], f["robots"][0]["eef_site"]["name"])
    arm_act = f["robots"][0]["arm_actuators"]["ids"]
    grip_act = f["robots"][0]["gripper_actuators"]["ids"]
    osc = OSCPose(OSCConfig.from_scene(f), num_envs=1, dtype=dtype, lambda_inverse=lambda_inverse)
    grip = PandaGripper.from_scene(f, num_envs=1, dtype=dtype)
    eye = torch.eye(3, dtype=dtype)[None]
    osc.reset(torch.as_tensor(records[0]["initial_joint"])[None], torch.zeros(1, 3), eye)
    grip.state.copy_(torch.as_tensor(records[0]["gripper_before"], dtype=dtype)[None])
    worst = {"torque": 0.0, "ctrl": 0.0, "gripper": 0.0, "stale_first_substep": 0.0}
    gripper_ctrl = None
    for rec in records:
        t = {k: torch.as_tensor(rec[k])[None] for k in RECORDED}
        s = idx.state(t["qpos"], t["qvel"], t["xanchor"], t["xaxis"], t["site_xpos"], t["site_xmat"],
                      t["qfrc_bias"], t["M"])
        if rec["policy_step"]:
            osc.set_goal(torch.as_tensor(rec["action"][None, :6]), s["eef_pos"], s["eef_rot"])
            gripper_ctrl = grip.step(torch.as_tensor(rec["action"][None, 6:]))
        if rec["stale"]:
            # robosuite's first substep after a reset uses the mass matrix from when its controller was created,
            # before the reset set the finger joints (see flowrl.envs.controllers.osc); ours, from the live state,
            # differs there by this much. With robosuite's matrix the rest of the computation matches.
            live = osc.torques(s["eef_pos"], s["eef_rot"], s["jac"], s["mass"], s["bias"], s["qpos"], s["qvel"],
                               clip=False)
            worst["stale_first_substep"] = float((live[0].double() - torch.as_tensor(rec["torques"])).abs().max())
            s["mass"] = torch.as_tensor(rec["mass_used"], dtype=dtype)[None]
        tau = osc.torques(s["eef_pos"], s["eef_rot"], s["jac"], s["mass"], s["bias"], s["qpos"], s["qvel"], clip=False)
        clipped = torch.clamp(tau, osc.torque_min, osc.torque_max)
        worst["torque"] = max(worst["torque"], float((tau[0].double() - torch.as_tensor(rec["torques"])).abs().max()))
        arm_ctrl = torch.as_tensor(rec["ctrl"][arm_act])
        worst["ctrl"] = max(worst["ctrl"], float((clipped[0].double() - arm_ctrl).abs().max()))
        worst["gripper"] = max(worst["gripper"],
                               float((gripper_ctrl[0].double() - torch.as_tensor(rec["ctrl"][grip_act])).abs().max()))
    return worst


@pytest.mark.parametrize("task", ["Lift", "NutAssemblySquare"])
def test_one_control_step_matches_robosuite(task: str) -> None:
    env = _make(task, seed=3)
    rng = np.random.default_rng(0)
    for _ in range(5):  # not recorded: a state with some motion and a non-trivial gripper state
        env.step(rng.uniform(-1, 1, env.action_dim))
    records = _hook(env)
    env.step(rng.uniform(-1, 1, env.action_dim))
    assert len(records) == 25 and records[0]["policy_step"] and not records[1]["policy_step"]
    worst = _replay(env, records)
    env.close()
    assert worst["torque"] < 1e-6 and worst["ctrl"] < 1e-6 and worst["gripper"] == 0.0, worst


def test_fifty_control_steps_match_robosuite() -> None:
    """Random actions (with saturated ones, so that the torque clip and the gripper limits are exercised) over 50
    control steps of PickPlaceCan, compared at all 1250 substeps; also with the LU inverse of the task-space
    matrices that the controller uses inside CUDA graphs."""
    env = _make("PickPlaceCan", seed=5)
    records = _hook(env)
    rng = np.random.default_rng(1)
    for _ in range(50):
        env.step(np.clip(rng.uniform(-1.5, 1.5, env.action_dim), -1, 1))
    assert len(records) == 50 * 25
    worst = _replay(env, records)
    worst_lu = _replay(env, records, lambda_inverse="inv")
    clipped = sum(bool((np.abs(r["torques"]) > np.abs(r["ctrl"][:7]) + 1e-12).any()) for r in records)
    env.close()
    assert worst["torque"] < 1e-6 and worst["ctrl"] < 1e-6 and worst["gripper"] == 0.0, worst
    assert worst_lu["torque"] < 1e-6 and worst_lu["ctrl"] < 1e-6, worst_lu
    assert clipped > 0  # the clip was exercised


def test_float32_controller_is_close() -> None:
    env = _make("Lift", seed=2)
    records = _hook(env)
    rng = np.random.default_rng(2)
    for _ in range(4):
        env.step(rng.uniform(-1, 1, env.action_dim))
    worst = _replay(env, records, dtype=torch.float32)
    env.close()
    assert worst["ctrl"] < 1e-2, worst  # float32: for MuJoCo Warp


def test_shipped_scene_matches_robosuite_model_and_step() -> None:
    """The shipped Lift XML compiles to robosuite's model (sizes, options, physics arrays) and mj_step from
    robosuite's state gives robosuite's next state."""
    env = _make("Lift", seed=0)  # seed 0: the cube size drawn when scene.xml was written
    rng = np.random.default_rng(0)
    for _ in range(3):
        env.step(rng.uniform(-1, 1, env.action_dim))
    ref = env.sim.model._model
    new = mujoco.MjModel.from_xml_path(str(SCENES / "Lift" / "scene.xml"))
    for key in ("nq", "nv", "nu", "nbody", "njnt", "ngeom", "nsite", "nmesh", "nC"):
        assert getattr(ref, key) == getattr(new, key), key
    for key in ("timestep", "solver", "cone", "integrator", "iterations", "tolerance", "impratio"):
        assert getattr(ref.opt, key) == getattr(new.opt, key), key
    for key in ("body_mass", "body_inertia", "body_pos", "body_quat", "jnt_range", "dof_damping", "dof_armature",
                "geom_size", "geom_friction", "geom_solref", "geom_solimp", "actuator_gainprm", "actuator_biasprm"):
        np.testing.assert_array_equal(getattr(ref, key), getattr(new, key), err_msg=key)
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(ref, spec))
    mujoco.mj_getState(ref, env.sim.data._data, state, spec)
    d_ref, d_new = mujoco.MjData(ref), mujoco.MjData(new)
    for m, d in ((ref, d_ref), (new, d_new)):
        mujoco.mj_setState(m, d, state, spec)
        for _ in range(10):
            mujoco.mj_step(m, d)
    env.close()
    np.testing.assert_allclose(d_new.qpos, d_ref.qpos, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d_new.qvel, d_ref.qvel, rtol=0, atol=1e-12)


def test_batched_controller_on_shipped_scene_follows_robosuite() -> None:
    """End to end without robosuite at run time: mujoco.batch on the shipped Lift XML, our OSC and gripper in a
    per-substep loop (ctrl written between steps, stage VEL), from robosuite's state after reset and driven by
    the actions robosuite got, tracks robosuite's trajectory over 20 control steps."""
    from mujoco.batch import Batch

    env = _make("Lift", seed=0)
    f = facts("Lift")
    model = mujoco.MjModel.from_xml_path(str(SCENES / "Lift" / "scene.xml"))
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    start = np.empty(mujoco.mj_stateSize(model, spec))
    mujoco.mj_getState(env.sim.model._model, env.sim.data._data, start, spec)
    initial_joint = torch.as_tensor(env.robots[0].part_controllers["right"].initial_joint)
    rng = np.random.default_rng(4)
    actions = rng.uniform(-1, 1, (20, env.action_dim))
    ref_qpos = []
    for a in actions:
        env.step(a)
        ref_qpos.append(np.array(env.sim.data.qpos))
    env.close()

    n = 2
    batch = Batch(model, nsim=n, nthread=1, persistent=True)
    batch.state[:] = start
    batch.forward(stage=mujoco.mjtStage.mjSTAGE_VEL)
    idx = ArmIndices.from_model(model, f["robots"][0]["arm_joints"]["names"], f["robots"][0]["eef_site"]["name"])
    osc = OSCPose(OSCConfig.from_scene(f), num_envs=n)
    grip = PandaGripper.from_scene(f, num_envs=n)
    binds = [torch.as_tensor(batch.bind(k)) for k in
             ("qpos", "qvel", "xanchor", "xaxis", "site_xpos", "site_xmat", "qfrc_bias", "M")]
    s = idx.state(*binds)
    osc.reset(initial_joint.expand(n, 7), s["eef_pos"], s["eef_rot"])
    ctrl = batch.bind("ctrl")
    arm_act, grip_act = f["robots"][0]["arm_actuators"]["ids"], f["robots"][0]["gripper_actuators"]["ids"]
    # sim 1 reproduces robosuite's first-substep quirk (the arm mass matrix with the fingers at 0, see
    # flowrl.envs.controllers.osc); sim 0 uses the live one
    d = mujoco.MjData(model)
    mujoco.mj_setState(model, d, start, spec)
    d.qpos[f["robots"][0]["gripper_joints"]["qpos_adr"]] = 0.0
    mujoco.mj_forward(model, d)
    full = np.zeros((model.nv, model.nv))
    mujoco.mj_fullM(model, d, full)
    stale_mass = torch.as_tensor(full[np.ix_(idx.dof_adr.numpy(), idx.dof_adr.numpy())])
    worst = np.zeros(n)
    for k, a in enumerate(actions):
        action = torch.as_tensor(a).expand(n, 7)
        for sub in range(25):
            s = idx.state(*binds)
            if sub == 0:
                osc.set_goal(action[:, :6], s["eef_pos"], s["eef_rot"])
                ctrl[:, grip_act] = grip.step(action[:, 6]).numpy()
            if k == 0 and sub == 0:
                s["mass"] = torch.stack([s["mass"][0], stale_mass])
            ctrl[:, arm_act] = osc.torques(**s).numpy()
            batch.step(stage=mujoco.mjtStage.mjSTAGE_VEL)
        worst = np.maximum(worst, np.abs(batch.qpos - ref_qpos[k]).max(-1))
    assert worst[0] < 1e-6 and worst[1] < 1e-9, worst


@pytest.mark.slow
def test_mujoco_warp_state_gives_jacobian_and_mass_matrix() -> None:
    """MuJoCo Warp (float32, Warp's CPU device; ~15 s of kernel compilation the first time): d.M has C MuJoCo's
    CSR layout, so ArmIndices built from the C model reads the arm's mass matrix from it, and site_jacobian on
    d.xanchor/d.xaxis/d.site_xpos agrees with mj_jacSite and with mujoco_warp.jac."""
    wp = pytest.importorskip("warp")
    mjw = pytest.importorskip("mujoco_warp")
    f = facts("Lift")
    model = mujoco.MjModel.from_xml_path(str(SCENES / "Lift" / "scene.xml"))
    data = _lift_state(model)
    idx = ArmIndices.from_model(model, f["robots"][0]["arm_joints"]["names"], f["robots"][0]["eef_site"]["name"])
    dofs = idx.dof_adr.numpy()
    with wp.ScopedDevice("cpu"):
        m, d = mjw.put_model(model), mjw.put_data(model, data, nworld=2, nconmax=64, njmax=512)
        mjw.kinematics(m, d)
        mjw.com_pos(m, d)
        mjw.crb(m, d)
        t = {k: wp.to_torch(getattr(d, k)) for k in
             ("qpos", "qvel", "xanchor", "xaxis", "site_xpos", "site_xmat", "qfrc_bias", "M")}
        s = idx.state(**{k: t[k] for k in ("qpos", "qvel", "xanchor", "xaxis", "site_xpos", "site_xmat")},
                      qfrc_bias=t["qfrc_bias"], m_csr=t["M"])
        jacp, jacr = wp.zeros((2, 3, model.nv), dtype=float), wp.zeros((2, 3, model.nv), dtype=float)
        point = wp.array(np.repeat(data.site_xpos[idx.site_id][None], 2, 0).astype(np.float32), dtype=wp.vec3)
        body = wp.array(np.full(2, model.site_bodyid[idx.site_id], np.int32), dtype=int)
        mjw.jac(m, d, jacp, jacr, point, body)
        warp_jac = np.concatenate([jacp.numpy()[1], jacr.numpy()[1]])[:, dofs]
    full = np.zeros((model.nv, model.nv))
    mujoco.mj_fullM(model, data, full)
    ref_mass = full[np.ix_(dofs, dofs)]
    ref_jacp, ref_jacr = np.zeros((3, model.nv)), np.zeros((3, model.nv))
    mujoco.mj_jacSite(model, data, ref_jacp, ref_jacr, idx.site_id)
    ref_jac = np.vstack([ref_jacp, ref_jacr])[:, dofs]
    assert s["mass"].dtype == torch.float32
    assert np.abs(s["mass"][1].double().numpy() - ref_mass).max() < 1e-5 * np.abs(ref_mass).max()
    assert np.abs(s["jac"][1].double().numpy() - ref_jac).max() < 1e-5
    assert np.abs(warp_jac - ref_jac).max() < 1e-5
