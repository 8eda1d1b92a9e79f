"""The cpu backend (mujoco.batch) against gymnasium v5: same seeds, same actions, same results."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl.envs import make

TASKS = [("Hopper", "Hopper-v5"), ("Walker2d", "Walker2d-v5"), ("HalfCheetah", "HalfCheetah-v5"),
         ("Ant", "Ant-v5"), ("Humanoid", "Humanoid-v5")]
TOL = 1e-9


def _lockstep(task: str, gym_id: str, steps: int, scale: float, seed: int = 3, num_envs: int = 3):
    """Step our env and one gymnasium env per column with identical actions; yield comparisons."""
    env = make(task, num_envs, backend="cpu", seed=seed)
    refs = [gym.make(gym_id) for _ in range(num_envs)]
    obs = env.reset()
    ref_obs = np.stack([r.reset(seed=seed + i)[0] for i, r in enumerate(refs)])
    np.testing.assert_array_equal(obs.numpy(), ref_obs)
    rng = np.random.default_rng(seed)
    ends = 0
    for t in range(steps):
        action = (scale * rng.uniform(-1, 1, size=(num_envs, env.act_dim))).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(torch.as_tensor(action))
        for i, ref in enumerate(refs):
            r_obs, r_rew, r_term, r_trunc, _ = ref.step(action[i])
            np.testing.assert_allclose(info["final_obs"][i].numpy(), r_obs, rtol=0, atol=TOL)
            assert abs(float(reward[i]) - r_rew) <= TOL, (task, t, i)
            assert bool(terminated[i]) == r_term and bool(truncated[i]) == r_trunc, (task, t, i)
            if r_term or r_trunc:
                ends += 1
                np.testing.assert_allclose(obs[i].numpy(), ref.reset()[0], rtol=0, atol=TOL)
            else:
                assert torch.equal(obs[i], info["final_obs"][i])
    return ends


@pytest.mark.parametrize("task,gym_id", TASKS)
def test_matches_gymnasium_across_resets(task, gym_id) -> None:
    scale = {"Hopper": 1.0, "Walker2d": 1.0, "HalfCheetah": 1.0, "Ant": 1.0, "Humanoid": 0.4}[task]
    steps = {"HalfCheetah": 120, "Ant": 120}.get(task, 250)
    ends = _lockstep(task, gym_id, steps, scale)
    if task in ("Hopper", "Walker2d", "Humanoid"):
        assert ends >= 3, "the comparison must cross terminations and resets"


def test_truncation_at_the_time_limit() -> None:
    env = make("HalfCheetah", 2, backend="cpu", seed=0)
    env.reset()
    for t in range(1000):
        obs, reward, terminated, truncated, info = env.step(torch.zeros(2, 6))
        assert bool(truncated.any()) == (t == 999) and not terminated.any()
    assert info["episode_length"].tolist() == [1000, 1000]
    assert not torch.equal(info["final_obs"], obs)


@pytest.mark.parametrize("task,gym_id", TASKS)
def test_set_state_matches_gymnasium_set_state(task, gym_id) -> None:
    env = make(task, 2, backend="cpu", seed=1)
    env.reset()
    ref = gym.make(gym_id)
    ref.reset(seed=0)
    ref.action_space.seed(0)  # the states it visits are the same in every run
    rng = np.random.default_rng(5)
    for _ in range(3):
        ref.step(ref.action_space.sample())
    qpos, qvel = ref.unwrapped.data.qpos.copy(), ref.unwrapped.data.qvel.copy()
    qvel += rng.normal(scale=0.1, size=qvel.shape)
    ref.unwrapped.set_state(qpos, qvel)
    obs = env.set_state(torch.as_tensor(qpos).repeat(2, 1), torch.as_tensor(qvel).repeat(2, 1))
    got_q, got_v = env.get_state()
    assert torch.equal(got_q[1], torch.as_tensor(qpos)) and torch.equal(got_v[0], torch.as_tensor(qvel))
    if task not in ("Ant", "Humanoid"):  # their first observation holds contact forces of the last step
        np.testing.assert_allclose(obs[0].numpy(), ref.unwrapped._get_obs(), rtol=0, atol=TOL)
    action = (0.3 * rng.uniform(-1, 1, size=env.act_dim)).astype(np.float32)
    # set_state keeps the constraint solver's warm start (gymnasium's comes from its steps before): the
    # same warm start makes the next step equal; without it contacts agree only to the solver's tolerance
    env._warmstart()[:] = torch.as_tensor(ref.unwrapped.data.qacc_warmstart)
    o, r, te, tr, info = env.step(torch.as_tensor(action).repeat(2, 1))
    r_o, r_r, r_te, *_ = ref.step(action)
    np.testing.assert_allclose(info["final_obs"][0].numpy(), r_o, rtol=0, atol=TOL)
    assert abs(float(r[0]) - r_r) <= TOL and bool(te[0]) == r_te


def test_seeding_per_env_and_determinism() -> None:
    a = make("Hopper", 4, backend="cpu", seed=10).reset()
    b = make("Hopper", 2, backend="cpu", seed=12).reset()
    assert torch.equal(a[2:], b)  # env i depends on seed + i only
    assert not torch.equal(a[0], a[1])


def test_non_finite_state_resets_only_that_env() -> None:
    env = make("Hopper", 3, backend="cpu", seed=0)
    env.reset()
    env.step(torch.zeros(3, 3))
    qpos, qvel = env.get_state()
    qvel[1, 2] = float("nan")
    env.set_state(qpos, qvel)
    before = env.get_state()
    obs, reward, terminated, truncated, info = env.step(torch.zeros(3, 3))
    assert info["bad_state"].tolist() == [False, True, False]
    assert info["bad_state_count"] == 1
    assert bool(terminated[1]) and float(reward[1]) == 0.0 and torch.isfinite(obs).all()
    assert int(env.elapsed[1]) == 0 and int(env.elapsed[0]) == 2  # env 1 restarted, the others went on
    assert not torch.equal(env.get_state()[0][0], before[0][0])
