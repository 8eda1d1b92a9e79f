"""Exact chunk boundaries: an episode that ends inside an action chunk takes none of the chunk's
remaining actions; its successor starts from its reset state at the chunk boundary, on every backend
and in the rollouts built on them (evaluation, collection, ReinFlow)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from flowrl.envs import make, warp_available
from flowrl.rollout import run_episodes

HORIZON = 3  # episodes truncated after 3 steps, inside a chunk of 4


def _make(task: str, backend: str, seed: int, **kw):
    if backend == "warp":
        kw["device"] = "cpu"
    env = make(task, 2, backend=backend, seed=seed, **kw)
    env.max_episode_steps = HORIZON
    return env


CASES = [("Hopper", "cpu"), ("Hopper", "gymnasium"), ("PointReach", "torch"),
         pytest.param("Hopper", "warp", marks=pytest.mark.skipif(not warp_available(), reason="warp extra missing"))]


@pytest.mark.parametrize("task,backend", CASES)
def test_a_new_episode_starts_untouched_at_the_chunk_boundary(task, backend) -> None:
    """Two envs with the same seeds: one runs a 4-action chunk over an episode of 3 steps, the other
    exactly 3 actions. Both must hand over the same first observation of the next episode (the
    fourth action never runs); on the old same-step autoreset the fourth action moved the new episode."""
    long_env, short_env = _make(task, backend, 5), _make(task, backend, 5)
    long_env.reset(), short_env.reset()
    gen = torch.Generator().manual_seed(0)
    actions = (torch.rand((2, 4, long_env.act_dim), generator=gen) * 2 - 1) * 0.5
    long_r = long_env.step_chunk(actions)
    short_r = short_env.step_chunk(actions[:, :3])
    assert bool(long_r.truncated.all()) and bool(short_r.truncated.all())
    assert torch.equal(long_r.valid, torch.tensor([[True, True, True, False]] * 2))
    assert torch.equal(long_r.rewards[:, 3], torch.zeros(2, dtype=long_r.rewards.dtype))
    assert torch.equal(long_r.rewards[:, :3], short_r.rewards)
    assert torch.equal(long_r.episode_length, torch.full((2,), HORIZON))
    assert torch.equal(long_r.final_obs, short_r.final_obs)
    assert torch.equal(long_r.obs, short_r.obs)  # the reset state, untouched by the 4th action
    # and the new episodes go on identically
    again = (torch.rand((2, 2, long_env.act_dim), generator=gen) * 2 - 1) * 0.5
    assert torch.equal(long_env.step_chunk(again).obs, short_env.step_chunk(again).obs)
    long_env.close(), short_env.close()


def test_single_steps_keep_gymnasiums_same_step_autoreset() -> None:
    env = make("Hopper", 2, backend="cpu", seed=0)
    env.max_episode_steps = 2
    env.reset()
    zero = torch.zeros(2, 3)
    env.step(zero)
    obs, _, terminated, truncated, info = env.step(zero)
    assert bool(truncated.all()) and not bool(terminated.any())
    assert not torch.equal(obs, info["final_obs"])  # obs is already the next episode's first
    assert torch.equal(info["episode_length"], torch.full((2,), 2))


@pytest.mark.slow  # robosuite worker processes; test_robosuite_compat's chunk test runs by default
@pytest.mark.skipif(importlib.util.find_spec("robosuite") is None, reason="robosuite not installed")
def test_robosuite_workers_stop_the_chunk_at_the_episode_end() -> None:
    """One worker, reseeded in place between the two runs (robosuite's placement follows the seed)."""
    env = make("robosuite/Lift", 1, backend="robosuite", seed=3, horizon=HORIZON)
    try:
        actions = torch.zeros((1, 4, 7))
        actions[:, :, 2] = 0.5
        env.reset(seed=3)
        long_r = env.step_chunk(actions)
        env.reset(seed=3)
        short_r = env.step_chunk(actions[:, :3])
        assert bool(long_r.truncated.all()) and long_r.valid.tolist() == [[True, True, True, False]]
        assert torch.equal(long_r.obs, short_r.obs) and torch.equal(long_r.rewards[:, :3], short_r.rewards)
    finally:
        env.close()


class _Constant:
    """A chunk policy of constant 4-action chunks."""

    obs_history, act_steps = 2, 4

    def act_chunk(self, obs, noise=None):
        assert obs.shape[1] == 2
        return torch.full((obs.shape[0], 4, 3), 0.1)


def test_episodes_in_rollouts_end_at_the_horizon_inside_a_chunk() -> None:
    env = make("Hopper", 3, backend="cpu")
    env.max_episode_steps = 6  # a chunk of 4, then 2 of the next
    stats = run_episodes(env, _Constant(), seed=0)
    assert stats["lengths"].tolist() == [6, 6, 6]
    reference = make("Hopper", 3, backend="cpu")
    reference.reset(seed=0)
    total = np.zeros(3)
    for _ in range(6):
        total += reference.step(torch.full((3, 3), 0.1))[1].numpy()
    np.testing.assert_allclose(stats["returns"], total, rtol=1e-12)  # summed per chunk, then per episode
