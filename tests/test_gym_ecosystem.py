"""flowrl's envs in gymnasium's and Stable-Baselines3's ecosystems: the NEXT_STEP autoreset of the
vector adapter (exact semantics, no extra physics step), gymnasium's vector wrappers on it, the
``flowrl/`` registration (``gym.make``, ``gym.make_vec``) and both env checkers without warnings."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers import vector as vector_wrappers

import flowrl.envs
from flowrl.envs import all_tasks, make, warp_available
from flowrl.envs import gym_registration
from flowrl.envs.adapters import GymnasiumVectorEnv
from flowrl.envs.gym_registration import FlowrlEnv, gym_env_ids, register_gym_envs
from flowrl.errors import FlowrlError

HOP = np.array([1.0, -1.0, 1.0], dtype=np.float32)  # Hopper falls over in about 10 steps


def _episode_actions(num_envs: int, length: int = 1000) -> np.ndarray:
    """(length, N, 3) actions indexed by each env's step within its episode, so two autoreset modes
    that shift episodes in time still feed every episode the same actions."""
    k = np.arange(length)[:, None, None]
    phase = np.arange(num_envs)[None, :, None] * 0.7 + np.arange(3)[None, None, :]
    return np.clip(1.2 * np.sin(0.4 * k + phase), -1, 1).astype(np.float32)


def _count_physics(env) -> list[int]:
    """Wrap the backend's per-step primitive to count the env steps it takes per env."""
    counts = [0] * env.num_envs
    inner = env._step

    def counting(action, alive):
        for i in np.flatnonzero(alive.cpu().numpy()):
            counts[i] += 1
        return inner(action, alive)

    env._step = counting
    return counts


def _episodes(venv: GymnasiumVectorEnv, steps: int) -> tuple[list[list[list[np.ndarray]]], list[list[float]]]:
    """Every env's episodes as lists of observations (first to last) and their rewards."""
    n = venv.num_envs
    table = _episode_actions(n)
    obs, _ = venv.reset(seed=5)
    episodes = [[[obs[i]]] for i in range(n)]
    rewards: list[list[float]] = [[] for _ in range(n)]
    k = np.zeros(n, dtype=int)
    next_step = venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    resetting = np.zeros(n, dtype=bool)
    for _ in range(steps):
        obs, reward, term, trunc, info = venv.step(table[k, np.arange(n)])
        done = term | trunc
        for i in range(n):
            if next_step and resetting[i]:  # the step after an end: the new episode's first obs, nothing else
                assert reward[i] == 0.0 and not term[i] and not trunc[i]
                episodes[i].append([obs[i]])
                k[i] = 0
                continue
            rewards[i].append(float(reward[i]))
            k[i] += 1
            if done[i] and not next_step:
                episodes[i][-1].append(info["final_obs"][i])
                episodes[i].append([obs[i]])
                k[i] = 0
            else:
                episodes[i][-1].append(obs[i])
        resetting = done
    return episodes, rewards


def test_next_step_is_the_default_and_named_in_metadata() -> None:
    venv = GymnasiumVectorEnv(make("Hopper", 2, backend="cpu"))
    assert venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    same = GymnasiumVectorEnv(make("Hopper", 2, backend="cpu"), autoreset_mode="SameStep")
    assert same.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    with pytest.raises(FlowrlError, match="autoreset_mode"):
        GymnasiumVectorEnv(make("Hopper", 2, backend="cpu"), autoreset_mode=AutoresetMode.DISABLED)


def test_next_step_semantics_exactly_and_no_extra_physics_step() -> None:
    """The same episodes as SAME_STEP, observation for observation; the step after an end returns
    the reset observation, reward 0, not done; every env takes exactly one physics step per step of
    its episodes (the reset step takes none)."""
    n, steps = 3, 45
    same_env, next_env = make("Hopper", n, backend="cpu"), make("Hopper", n, backend="cpu")
    same_counts, next_counts = _count_physics(same_env), _count_physics(next_env)
    same, same_rewards = _episodes(GymnasiumVectorEnv(same_env, autoreset_mode=AutoresetMode.SAME_STEP), steps)
    nxt, next_rewards = _episodes(GymnasiumVectorEnv(next_env), steps)
    for i in range(n):
        assert len(nxt[i]) >= 3, "expected several Hopper falls"
        for a, b in zip(same[i], nxt[i][:-1]):  # NEXT_STEP's last episode lags SAME_STEP's by its resets
            assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
        taken = sum(len(ep) - 1 for ep in nxt[i])
        assert next_counts[i] == taken == steps - (len(nxt[i]) - 1)  # one physics step per episode step
        assert same_counts[i] == steps
        assert next_rewards[i] == same_rewards[i][:taken]


def test_next_step_resets_only_the_finished_env_and_ignores_its_action() -> None:
    venv = GymnasiumVectorEnv(make("Hopper", 2, backend="cpu"))
    venv.reset(seed=0)
    act = np.stack([HOP, np.zeros(3, np.float32)])
    for _ in range(100):
        obs, reward, term, trunc, _ = venv.step(act)
        if term[0]:
            break
    else:
        raise AssertionError("env 0 never fell")
    assert not term[1]
    before = venv.env.elapsed.clone()
    wild = np.stack([np.full(3, 1.0, np.float32), np.zeros(3, np.float32)])
    obs2, reward2, term2, trunc2, _ = venv.step(wild)
    assert reward2[0] == 0.0 and not term2[0] and not trunc2[0]
    assert abs(obs2[0][0] - 1.25) < 0.01 and not np.array_equal(obs2[0], obs[0])  # Hopper's reset height
    assert int(venv.env.elapsed[0]) == 0 and int(venv.env.elapsed[1]) == int(before[1]) + 1


def test_gymnasium_vector_wrappers_run_on_the_next_step_adapter() -> None:
    n = 4
    venv = GymnasiumVectorEnv(make("Hopper", n, backend="cpu"))
    stats = vector_wrappers.RecordEpisodeStatistics(venv)
    env = vector_wrappers.ClipAction(stats)
    env = vector_wrappers.NormalizeObservation(env)
    env = vector_wrappers.NormalizeReward(env)
    env = vector_wrappers.TransformObservation(env, lambda o: np.clip(o, -5, 5))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (n, 11)
    ended = 0
    for _ in range(30):
        obs, reward, term, trunc, info = env.step(np.tile(2.0 * HOP, (n, 1)))  # ClipAction brings it to [-1, 1]
        assert np.all(np.abs(obs) <= 5) and np.all(np.isfinite(reward))
        if "episode" in info:
            mask = info["_episode"]
            ended += int(mask.sum())
            length = info["episode"]["l"][mask]
            assert np.all(length == venv.env.elapsed.numpy()[mask])
    assert ended >= n  # every env finished an episode and RecordEpisodeStatistics saw it
    assert np.any(env.env.env.obs_rms.var != 1.0)  # NormalizeObservation updated its statistics


def test_record_episode_statistics_returns_match_our_episode_returns() -> None:
    venv = GymnasiumVectorEnv(make("Hopper", 2, backend="cpu"))
    stats = vector_wrappers.RecordEpisodeStatistics(venv)
    stats.reset(seed=1)
    returns = np.zeros(2)
    for _ in range(40):
        _, reward, term, trunc, info = stats.step(np.tile(HOP, (2, 1)))
        returns += reward
        if "episode" in info:
            i = int(np.flatnonzero(info["_episode"])[0])
            assert info["episode"]["r"][i] == pytest.approx(returns[i])
            return
    raise AssertionError("no episode ended")


def _no_warnings(fn) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("env_id,kwargs", [("flowrl/Hopper-v5", {"backend": "cpu"}), ("flowrl/PointReach-v0", {})])
def test_gymnasium_and_sb3_checkers_accept_gym_make_without_warnings(env_id, kwargs) -> None:
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    def check() -> None:
        env = gym.make(env_id, **kwargs)
        check_env(env.unwrapped)  # gymnasium's advice: the checker on the unwrapped env
        sb3_check_env(env)
        env.close()

    _no_warnings(check)


def test_gym_make_gives_one_numpy_env_with_consistent_dtypes() -> None:
    env = gym.make("flowrl/Hopper-v5", backend="cpu", seed=4)
    assert isinstance(env.unwrapped, FlowrlEnv) and env.spec.max_episode_steps == 1000
    obs, info = env.reset()
    assert obs.dtype == env.observation_space.dtype == np.float64 and env.action_space.dtype == np.float32
    assert np.array_equal(obs, make("Hopper", 1, backend="cpu", seed=4).reset()[0].numpy())  # seed passes through
    obs2, _ = env.reset()
    assert not np.array_equal(obs, obs2)  # reset() continues: a new start, not the seeded one again
    obs3, _ = env.reset(seed=4)
    assert np.array_equal(obs3, obs)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert type(reward) is float and type(terminated) is bool and type(truncated) is bool


def test_gym_make_time_limit_owns_the_horizon() -> None:
    env = gym.make("flowrl/PointReach-v0", max_episode_steps=7)
    env.reset(seed=0)
    for t in range(7):
        *_, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
        assert truncated == (t == 6)
    longer = gym.make("flowrl/PointReach-v0", max_episode_steps=40)  # beyond the task's 30: TimeLimit decides
    longer.reset(seed=0)
    assert not any(longer.step(np.zeros(2, np.float32))[3] for _ in range(39))
    assert longer.step(np.zeros(2, np.float32))[3]


def test_every_task_is_registered_under_the_flowrl_namespace() -> None:
    ids = gym_env_ids()
    assert set(ids) == set(all_tasks())
    assert ids["Hopper"] == "flowrl/Hopper-v5" and ids["Humanoid-Newton"] == "flowrl/Humanoid-Newton-v5"
    assert ids["robosuite/Lift"] == "flowrl/Lift-v0" and ids["robosuite/PickPlaceCan"] == "flowrl/PickPlaceCan-v0"
    assert ids["PointReach"] == "flowrl/PointReach-v0"
    for task, env_id in ids.items():
        spec = gym.spec(env_id)
        assert spec.kwargs == {"task": task} and spec.max_episode_steps == all_tasks()[task].max_episode_steps
        assert spec.vector_entry_point == gym_registration.VECTOR_ENTRY_POINT


def test_registering_again_is_silent_and_changes_nothing() -> None:
    import importlib

    before = {k: v for k, v in gym.registry.items() if k.startswith("flowrl/")}
    _no_warnings(lambda: register_gym_envs(flowrl.envs.make))
    _no_warnings(lambda: importlib.reload(gym_registration).register_gym_envs(flowrl.envs.make))
    assert {k: v for k, v in gym.registry.items() if k.startswith("flowrl/")} == before


def test_import_registers_without_loading_heavy_backends() -> None:
    code = ("import sys, gymnasium as gym, flowrl.envs\n"
            "assert 'flowrl/Hopper-v5' in gym.registry\n"
            "heavy = [m for m in ('warp', 'mujoco_warp', 'robosuite', 'stable_baselines3', 'flowrl.envs.backends.warp',"
            " 'flowrl.envs.backends.robosuite') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_make_vec_round_trip_on_the_cpu_backend() -> None:
    venv = gym.make_vec("flowrl/Hopper-v5", num_envs=3, vectorization_mode="vector_entry_point", backend="cpu", seed=2)
    assert isinstance(venv, GymnasiumVectorEnv) and venv.num_envs == 3 and venv.spec.id == "flowrl/Hopper-v5"
    assert type(venv.env).__name__ == "MujocoBatchEnv" and venv.env.max_episode_steps == 1000
    assert venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, _ = venv.reset()
    assert np.array_equal(obs, make("Hopper", 3, backend="cpu", seed=2).reset().numpy())
    obs, reward, term, trunc, _ = venv.step(np.zeros((3, 3), np.float32))
    assert obs.shape == (3, 11) and reward.shape == term.shape == trunc.shape == (3,)
    venv.close()
    same = gym.make_vec("flowrl/Hopper-v5", num_envs=2, backend="cpu", autoreset_mode=AutoresetMode.SAME_STEP,
                        max_episode_steps=5)
    assert same.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    same.reset(seed=0)
    truncs = [same.step(np.zeros((2, 3), np.float32))[3] for _ in range(5)]
    assert not any(t.any() for t in truncs[:4]) and truncs[4].all()
    sync = gym.make_vec("flowrl/PointReach-v0", num_envs=2, vectorization_mode="sync")
    assert sync.reset(seed=0)[0].shape == (2, 4)


@pytest.mark.skipif(not warp_available(), reason="mujoco-warp not installed")
def test_make_vec_round_trip_on_warp_cpu_device() -> None:
    venv = gym.make_vec("flowrl/Hopper-v5", num_envs=3, vectorization_mode="vector_entry_point", backend="warp",
                        device="cpu", seed=0)
    assert isinstance(venv, GymnasiumVectorEnv) and type(venv.env).__name__ == "MujocoWarpEnv"
    obs, _ = venv.reset()
    assert obs.shape == (3, 11) and obs.dtype == venv.single_observation_space.dtype
    for _ in range(15):
        obs, reward, term, trunc, _ = venv.step(np.tile(HOP, (3, 1)))
        if term.any():
            break
    else:
        raise AssertionError("no Hopper fell on warp")
    done = term | trunc
    obs2, reward2, term2, trunc2, _ = venv.step(np.tile(HOP, (3, 1)))
    assert np.all(reward2[done] == 0.0) and not (term2 | trunc2)[done].any()
    assert np.all(np.abs(obs2[done, 0] - 1.25) < 0.01)  # reset height
    venv.close()


def test_keywords_pass_through_to_make(monkeypatch) -> None:
    seen: dict = {}

    def recording_make(task, num_envs, **kwargs):
        seen.update(task=task, num_envs=num_envs, **kwargs)
        return make("PointReach", num_envs)

    monkeypatch.setattr(gym_registration, "_make", recording_make)
    gym.make("flowrl/Lift-v0", backend="robosuite", device="cpu", seed=3, terminate_on_success=True)
    assert seen == {"task": "robosuite/Lift", "num_envs": 1, "backend": "robosuite", "device": "cpu", "seed": 3,
                    "terminate_on_success": True}
    seen.clear()
    gym.make_vec("flowrl/Lift-v0", num_envs=8, backend="warp", device="cuda", terminate_on_success=True)
    assert seen == {"task": "robosuite/Lift", "num_envs": 8, "backend": "warp", "device": "cuda", "seed": None,
                    "terminate_on_success": True}


def test_bad_input_is_a_one_line_flowrl_error() -> None:
    with pytest.raises(FlowrlError, match="task Hopper reports no success"):
        gym.make("flowrl/Hopper-v5", backend="cpu", terminate_on_success=True)
    with pytest.raises(FlowrlError, match="render"):
        FlowrlEnv("Hopper", backend="cpu", render_mode="rgb_array")
    env = gym.make("flowrl/Hopper-v5", backend="cpu")
    env.reset(seed=0)
    with pytest.raises(FlowrlError, match="action of shape"):
        env.step(np.zeros(4, np.float32))
    venv = GymnasiumVectorEnv(make("Hopper", 2, backend="cpu"))
    with pytest.raises(FlowrlError, match="consecutive"):
        venv.reset(seed=[3, 7])
    assert venv.reset(seed=[3, 4])[0].shape == (2, 11)
    with pytest.raises(FlowrlError, match="options"):
        venv.reset(options={"reset_mask": np.ones(2, bool)})
    with pytest.raises(FlowrlError, match="reset_mask"):
        venv.env.step_or_reset(torch.zeros(2, 3), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(FlowrlError, match="unknown task"):
        FlowrlEnv("Nope")
