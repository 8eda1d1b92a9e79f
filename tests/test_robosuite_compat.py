"""robosuite 1.5.2 on MuJoCo 4 through our compatibility layer (needs the robosuite install of the
README; skipped where robosuite is absent)."""

from __future__ import annotations

import os

import numpy as np
import pytest

robosuite = pytest.importorskip("robosuite", reason="robosuite not installed (see README: robosuite)")
os.environ.setdefault("MUJOCO_GL", "disable")


def test_self_check_builds_steps_and_checks() -> None:
    from flowrl.envs.backends.robosuite_compat import self_check

    report = self_check("Lift", steps=3)
    assert report["robosuite"] == "1.5.2" and report["mass_matrix_shape"] == [7, 7]
    assert all(report["replacements"].values())  # MuJoCo 4 needs both


def test_mass_matrix_matches_an_independent_computation() -> None:
    import mujoco

    from flowrl.envs.backends.robosuite_compat import apply

    apply()
    env = robosuite.make("Lift", robots="Panda", has_renderer=False, has_offscreen_renderer=False,
                         use_camera_obs=False)
    env.reset()
    env.step(np.zeros(env.action_dim))
    controller = env.robots[0].part_controllers["right"]
    controller.update(force=True)
    model, data = env.sim.model._model, env.sim.data._data
    columns = []
    for i in range(model.nv):  # M e_i through mj_mulM, which shares no code with mj_fullM
        unit, out = np.zeros(model.nv), np.zeros(model.nv)
        unit[i] = 1.0
        mujoco.mj_mulM(model, data, out, unit)
        columns.append(out)
    full = np.stack(columns, axis=1)
    idx = controller.qvel_index
    np.testing.assert_allclose(controller.mass_matrix, full[np.ix_(idx, idx)], rtol=0, atol=1e-12)
    env.close()


def test_apply_is_idempotent() -> None:
    from robosuite.controllers.parts.controller import Controller
    from robosuite.utils.binding_utils import MjModel

    from flowrl.envs.backends import robosuite_compat

    first = robosuite_compat.apply()
    installed = (MjModel.get_joint_qpos_addr, MjModel.get_joint_qvel_addr, Controller.update)
    assert robosuite_compat.apply() == first
    # ours are in place, and a second call neither wraps nor replaces them again
    assert installed == (robosuite_compat._get_joint_qpos_addr, robosuite_compat._get_joint_qvel_addr,
                         robosuite_compat._controller_update)
    assert (MjModel.get_joint_qpos_addr, MjModel.get_joint_qvel_addr, Controller.update) == installed


@pytest.fixture(scope="module")
def lift():
    from flowrl.envs import make

    env = make("robosuite/Lift", 2, seed=5, horizon=6)
    yield env
    env.close()


def test_lift_seeding_per_env_and_global_rng_untouched(lift) -> None:
    import torch

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a, b, c = lift.reset(), lift.reset(seed=5), lift.reset(seed=6)
    assert lift.obs_dim == 19 and lift.act_dim == 7  # object 10, eef pos 3, eef quat 4, gripper 2
    assert torch.equal(a, b) and torch.equal(a[1], c[0]) and not torch.equal(a[0], a[1])
    assert np.array_equal(np.random.get_state()[1], before)


@pytest.mark.slow  # robosuite worker processes: seconds each; run with -m slow
def test_a_dead_worker_is_a_clear_error() -> None:
    import torch

    from flowrl.envs import make
    from flowrl.errors import FlowrlError

    env = make("robosuite/Lift", 2, seed=0)
    env.reset()
    env._procs[1].kill()
    env._procs[1].join()
    with pytest.raises(FlowrlError, match="worker process 1 exited"):
        env.step(torch.zeros(2, 7))
    env.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads the workers' /proc entries (Linux)")
@pytest.mark.slow  # robosuite worker processes: seconds each; run with -m slow
def test_workers_get_one_blas_thread_unless_the_user_chose(monkeypatch) -> None:
    from flowrl.envs import make

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    env = make("robosuite/Lift", 1, seed=0)
    try:
        pid = env._procs[0].pid
        with open(f"/proc/{pid}/environ", "rb") as f:
            child = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        with open(f"/proc/{pid}/status") as f:
            threads = int(f.read().split("Threads:")[1].split()[0])
    finally:
        env.close()
    assert child[b"OMP_NUM_THREADS"] == b"1" and child[b"OPENBLAS_NUM_THREADS"] == b"1"
    assert child[b"MKL_NUM_THREADS"] == b"3"
    assert threads == 1  # no BLAS pool beside the worker's own thread
    assert "OPENBLAS_NUM_THREADS" not in os.environ and os.environ["MKL_NUM_THREADS"] == "3"  # parent as it was


def test_a_chunk_in_one_round_trip_is_the_same_as_its_steps(lift) -> None:
    """Chunks sent to the workers in one message each give the transitions of single steps; the
    horizon (6) falls inside the second chunk, whose remaining actions are never taken."""
    import torch

    actions = torch.rand((2, 8, 7), generator=torch.Generator().manual_seed(0)) * 2 - 1
    lift.reset(seed=5)
    first, second = lift.step_chunk(actions[:, :4]), lift.step_chunk(actions[:, 4:])
    lift.reset(seed=5)
    stepped = [lift.step(actions[:, j]) for j in range(6)]
    rewards = torch.stack([s[1] for s in stepped], dim=1)
    assert torch.equal(torch.cat([first.rewards, second.rewards[:, :2]], dim=1), rewards)
    assert torch.equal(torch.cat([first.success, second.success[:, :2]], dim=1),
                       torch.stack([s[4]["success"] for s in stepped], dim=1))
    assert not first.done.any() and bool(second.truncated.all()) and not second.valid[:, 2:].any()
    assert torch.equal(second.final_obs, stepped[-1][4]["final_obs"])
    assert torch.equal(second.obs, stepped[-1][0])  # the next episode's first observation, untouched
    assert torch.equal(second.episode_length, torch.full((2,), 6))


def test_lift_truncates_at_the_horizon_and_resets(lift) -> None:
    import torch

    first = lift.reset(seed=1)
    for t in range(6):
        obs, reward, terminated, truncated, info = lift.step(torch.zeros(2, 7))
        assert not terminated.any() and bool(truncated.all()) == (t == 5)
        assert info["success"].dtype == torch.bool
    assert info["episode_length"].tolist() == [6, 6]
    assert not torch.equal(info["final_obs"], obs)  # the next episode started in the same step
    assert not torch.equal(obs, first)  # continuing generators: a new placement


@pytest.mark.slow  # the batched cpu task's Lift expert test runs by default (tests/test_manipulation_tasks.py)
@pytest.mark.parametrize("task,horizon", [("Lift", 150), pytest.param("PickPlaceCan", 300, marks=pytest.mark.slow),
                                          pytest.param("NutAssemblySquare", 300, marks=pytest.mark.slow)])
def test_scripted_experts_succeed_on_seeded_episodes(task, horizon) -> None:
    import torch

    from flowrl.envs import make, resolve_task

    env = make(f"robosuite/{task}", 3, seed=200, horizon=horizon)
    try:
        obs, expert = env.reset(), resolve_task(f"robosuite/{task}").expert(3)
        success = torch.zeros(3, dtype=torch.bool)
        for _ in range(horizon):
            obs, _, _, _, info = env.step(expert(obs))
            success |= info["success"]
        assert bool(success.all())
    finally:
        env.close()


@pytest.mark.slow  # robosuite worker processes: seconds each; run with -m slow
def test_terminate_on_success_ends_episodes_as_terminations_at_the_first_success() -> None:
    import torch

    from flowrl.envs import make, resolve_task

    env = make("robosuite/Lift", 2, seed=200, horizon=150, terminate_on_success=True)
    try:
        obs, expert = env.reset(), resolve_task("robosuite/Lift").expert(2)
        ended = torch.zeros(2, dtype=torch.bool)
        for _ in range(150):
            obs, reward, terminated, truncated, info = env.step(expert(obs))
            assert torch.equal(terminated, info["success"]) and not truncated.any()
            assert torch.equal(info["done_mask"], terminated)
            for i in torch.nonzero(terminated & ~ended).flatten().tolist():
                assert reward[i] > 0 and info["episode_length"][i] < 150
                assert not torch.equal(info["final_obs"][i], obs[i])  # the next episode started
            ended |= terminated
            if ended.all():
                break
        assert bool(ended.all())
    finally:
        env.close()


def test_collected_demonstrations_round_trip_in_the_robomimic_layout(tmp_path) -> None:
    import json

    import h5py

    from flowrl.agents.collect import collect
    from flowrl.datasets import read_dataset

    path = tmp_path / "lift.hdf5"
    # the batched cpu Lift (robosuite's observation keys, no worker processes): the layout is the writer's
    written = collect("scripted", path, episodes=2, task="robosuite/Lift", num_envs=2, seed=3, fmt="robomimic",
                      backend="cpu", progress=False)
    with h5py.File(path) as f:
        assert sorted(f["data"].keys()) == ["demo_0", "demo_1"]
        assert sorted(f["data/demo_0/obs"].keys()) == ["object", "robot0_eef_pos", "robot0_eef_quat",
                                                       "robot0_gripper_qpos"]
        assert json.loads(f["data"].attrs["env_args"])["env_name"] == "Lift"
    # cut 10 steps after the first success, as robomimic's demonstrations end
    assert (written.episode_lengths < 150).all() and written.info()["episodes"] == 2
    ends = np.cumsum(written.episode_lengths) - 1
    assert written.truncated[ends].all() and written.truncated.sum() == 2 and not written.terminated.any()
    back = read_dataset(path)
    assert back.format == "robomimic"
    np.testing.assert_array_equal(back.observations, written.observations)
    np.testing.assert_array_equal(back.actions, written.actions)
    assert back.episode_lengths.tolist() == written.episode_lengths.tolist()


@pytest.mark.parametrize("task,obs_dim,act_dim", [pytest.param("PickPlaceCan", 23, 7, marks=pytest.mark.slow),
                                                  pytest.param("NutAssemblySquare", 23, 7, marks=pytest.mark.slow),
                                                  pytest.param("TwoArmTransport", 59, 14, marks=pytest.mark.slow)])
def test_every_task_builds_steps_and_truncates(task, obs_dim, act_dim) -> None:
    import torch

    from flowrl.envs import make

    env = make(f"robosuite/{task}", 1, seed=0, horizon=2)
    try:
        assert (env.obs_dim, env.act_dim) == (obs_dim, act_dim)
        first = env.reset()
        assert torch.equal(first, env.reset(seed=0))
        _, _, terminated, truncated, _ = env.step(torch.zeros(1, act_dim))
        assert not truncated.any() and not terminated.any()
        _, _, terminated, truncated, _ = env.step(torch.zeros(1, act_dim))
        assert bool(truncated.all()) and not terminated.any()
    finally:
        env.close()


@pytest.mark.slow
def test_collect_drops_failed_episodes_and_says_so_when_none_succeed(tmp_path, monkeypatch) -> None:
    import torch

    import dataclasses

    from flowrl.agents.collect import collect
    from flowrl.envs import registry, resolve_task
    from flowrl.errors import FlowrlError

    class Idle:  # never grasps: every episode fails
        obs_history, act_steps = 1, 1

        def __init__(self, n: int) -> None:
            self.n = n

        def act_chunk(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
            return torch.zeros(obs.shape[0], 1, 7)

    monkeypatch.setitem(registry._TASKS, "robosuite/Lift", dataclasses.replace(resolve_task("Lift"), expert=Idle))
    with pytest.raises(FlowrlError, match="only 0 of 3 episodes of robosuite/Lift succeeded"):
        collect("scripted", tmp_path / "none.hdf5", episodes=1, task="robosuite/Lift", num_envs=1, progress=False)
    assert not (tmp_path / "none.hdf5").exists()  # nothing half-written
    kept = collect("scripted", tmp_path / "kept.hdf5", episodes=1, task="robosuite/Lift", num_envs=1,
                   progress=False, keep_failures=True)
    assert kept.episode_lengths.tolist() == [400] and kept.truncated[-1]
