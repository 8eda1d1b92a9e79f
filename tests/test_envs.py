"""The batched env interface over gymnasium: shapes, seeding, same-step autoreset."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl.envs import BatchedEnv, make
from flowrl.errors import FlowrlError


@pytest.mark.parametrize("task,obs_dim,act_dim", [("Hopper", 11, 3), ("walker2d", 17, 6), ("HalfCheetah-v5", 17, 6),
                                                  ("Ant", 105, 8), ("Humanoid", 348, 17)])
@pytest.mark.parametrize("backend", ["gymnasium", "cpu"])
def test_every_locomotion_task_builds_and_steps(task, obs_dim, act_dim, backend) -> None:
    env = make(task, 3, backend=backend, seed=0)
    obs = env.reset()
    assert obs.shape == (3, obs_dim) and obs.dtype == torch.float64
    assert (env.obs_dim, env.act_dim) == (obs_dim, act_dim)
    o, r, te, tr, info = env.step(torch.zeros(3, act_dim))
    assert o.shape == (3, obs_dim) and r.shape == te.shape == tr.shape == (3,)
    assert te.dtype == torch.bool and info["final_obs"].shape == (3, obs_dim)
    env.close()


def test_unknown_task_is_one_clear_error() -> None:
    with pytest.raises(FlowrlError, match="unknown task 'Hoper'; known tasks: Ant, HalfCheetah, Hopper"):
        make("Hoper", 1)


def test_task_names_are_canonical_for_every_family() -> None:
    from flowrl.config import load_stage_config
    from flowrl.envs import canonical_task

    assert canonical_task("hopper-v5") == "Hopper"
    assert canonical_task("robosuite/nutassemblysquare") == "robosuite/NutAssemblySquare"
    with pytest.raises(FlowrlError, match="unknown task 'robosuite/Stack'; known tasks: .*robosuite/Lift"):
        canonical_task("robosuite/Stack")
    # configs accept robosuite tasks (validated without importing robosuite) and name a bad one
    load_stage_config("pretrain", None, ["task=robosuite/Lift", "data.path=x.hdf5"])
    with pytest.raises(FlowrlError, match="task: unknown task 'robosuite/Lifft'"):
        load_stage_config("pretrain", None, ["task=robosuite/Lifft", "data.path=x.hdf5"])


def test_per_env_seeding_matches_gymnasium() -> None:
    env = make("Hopper", 3, backend="gymnasium", seed=5)
    obs = env.reset()
    for i in range(3):
        ref, _ = gym.make("Hopper-v5").reset(seed=5 + i)
        np.testing.assert_array_equal(obs[i].numpy(), ref)
    assert not torch.equal(obs[0], obs[1])
    torch.testing.assert_close(env.reset(seed=5), obs)


def test_same_step_autoreset_returns_final_obs_and_matches_a_single_env() -> None:
    env = make("Hopper", 2, backend="gymnasium", seed=11)
    env.reset()
    ref = gym.make("Hopper-v5")
    ref_obs, _ = ref.reset(seed=11)
    action = np.array([1.0, -1.0, 1.0], dtype=np.float32)  # falls over quickly
    ret = 0.0
    for t in range(1000):
        obs, reward, terminated, truncated, info = env.step(torch.as_tensor(action).repeat(2, 1))
        ref_obs, ref_r, ref_term, ref_trunc, _ = ref.step(action)
        ret += ref_r
        assert bool(terminated[0]) == ref_term and float(reward[0]) == pytest.approx(ref_r, rel=1e-6)
        if ref_term or ref_trunc:
            np.testing.assert_array_equal(info["final_obs"][0].numpy(), ref_obs)
            assert bool(info["done_mask"][0])
            assert info["episode_return"][0].item() == pytest.approx(ret, rel=1e-5)
            assert info["episode_length"][0].item() == t + 1
            fresh, _ = gym.make("Hopper-v5").reset(seed=None)  # obs after autoreset is a new episode start
            assert abs(float(obs[0, 0]) - 1.25) < 0.01 and obs[0].shape == fresh.shape
            break
    else:
        pytest.fail("episode never ended")


class _Zero:
    """A chunk policy of zero actions."""

    def __init__(self, act_steps: int, act_dim: int) -> None:
        self.obs_history, self.act_steps, self.act_dim = 1, act_steps, act_dim

    def act_chunk(self, obs, noise=None):
        return torch.zeros(obs.shape[0], self.act_steps, self.act_dim)


def test_run_episodes_lets_the_caller_end_an_episode() -> None:
    """Collection cuts demonstrations after success through this hook: the env it ends stops
    counting there, the others run to their own end."""
    from flowrl.rollout import run_episodes

    env = make("PointReach", 3, seed=0)
    chunks = [0]

    def end_env_1_after_its_5th_step(obs, chunk, result, active) -> torch.Tensor:
        chunks[0] += 1
        ended = torch.zeros(3, 2, dtype=torch.bool)
        ended[1, 0] = chunks[0] == 3  # the first step of the third chunk: step 5
        return ended

    out = run_episodes(env, _Zero(2, 2), seed=0, on_chunk=end_env_1_after_its_5th_step)
    assert out["lengths"].tolist() == [30, 5, 30]
    env.close()


class _SucceedsAtStep(BatchedEnv):
    """A batched env whose env i first succeeds at its step 3 + i and is truncated at step 10."""

    task = "Fake"
    act_dim = 1
    max_episode_steps = 10

    def __init__(self, num_envs: int) -> None:
        self.num_envs, self.t, self.device = num_envs, 0, torch.device("cpu")

    def reset(self, seed: int | None = None) -> torch.Tensor:
        self.t = 0
        self._clear_counters()
        return torch.zeros(self.num_envs, 2)

    def _step(self, action, alive):
        self.t += 1
        success = self.t >= 3 + torch.arange(self.num_envs)
        return torch.zeros(self.num_envs, 2), torch.ones(self.num_envs), torch.zeros(self.num_envs, dtype=torch.bool), \
            {"success": success}

    def _reset_envs(self, done):
        self.t = 0
        return torch.zeros(self.num_envs, 2)


class _FakeFlow:
    """Enough of a FlowPolicy for the evaluator: zero chunks of ``act_steps``."""

    def __init__(self, act_steps: int) -> None:
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(obs_history=1, act_steps=act_steps)
        self.obs_mean = torch.zeros(2)

    def predict(self, obs, k, noise=None, generator=None, images=None):
        return torch.zeros(obs.shape[0], self.cfg.act_steps, 1)


def test_evaluation_can_end_episodes_at_success(monkeypatch: pytest.MonkeyPatch) -> None:
    """robomimic-style evaluation: the same success rate, episodes (and returns) end at the first success."""
    import flowrl.evaluation as evaluation

    monkeypatch.setattr(evaluation, "make", lambda task, n, **kw: _SucceedsAtStep(n))
    monkeypatch.setattr(evaluation, "is_robosuite", lambda task: False)
    full = evaluation.evaluate(_FakeFlow(2), "Fake", 1, episodes=3)
    cut = evaluation.evaluate(_FakeFlow(2), "Fake", 1, episodes=3, end_on_success=True)
    assert full["success_rate"] == cut["success_rate"] == 1.0
    assert full["length_mean"] == 10 and full["return_mean"] == 10
    assert cut["length_mean"] == 4 and cut["return_mean"] == 4  # envs end at steps 3, 4, 5


def test_evaluation_per_episode_names_the_failed_episodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each episode's return, length and success, in env order over rounds of envs (episode i: seed + i)."""
    import flowrl.evaluation as evaluation

    monkeypatch.setattr(evaluation, "make", lambda task, n, **kw: _SucceedsAtStep(n))
    monkeypatch.setattr(evaluation, "is_robosuite", lambda task: False)
    ev = evaluation.Evaluator("Fake", max_envs=10, end_on_success=True)
    out = ev(_FakeFlow(1), 1, episodes=10, per_episode=True)
    assert out["episode_success"] == [True] * 8 + [False] * 2  # env i succeeds at step 3 + i; truncated at 10
    assert out["episode_lengths"] == [3, 4, 5, 6, 7, 8, 9, 10, 10, 10]
    assert out["episode_returns"] == [float(n) for n in out["episode_lengths"]]
    assert out["success_rate"] == 0.8
    rounds = evaluation.Evaluator("Fake", max_envs=4, end_on_success=True)(_FakeFlow(1), 1, episodes=6,
                                                                          per_episode=True)
    assert rounds["episode_lengths"] == [3, 4, 5, 6, 3, 4]  # two rounds of 4 envs, the second cut to 2
    assert "episode_success" not in ev(_FakeFlow(1), 1, episodes=10)


def test_evaluator_keeps_its_envs_between_evaluations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Periodic evaluations reuse the envs (robosuite workers take seconds to start), with the same results."""

    import flowrl.evaluation as evaluation

    made: list[_SucceedsAtStep] = []
    closed: list[_SucceedsAtStep] = []

    class Tracked(_SucceedsAtStep):
        def close(self) -> None:
            closed.append(self)

    def fake_make(task: str, n: int, **kw) -> _SucceedsAtStep:
        made.append(Tracked(n))
        return made[-1]

    monkeypatch.setattr(evaluation, "make", fake_make)
    monkeypatch.setattr(evaluation, "is_robosuite", lambda task: False)
    policy = _FakeFlow(1)
    ev = evaluation.Evaluator("Fake", max_envs=4, end_on_success=True)
    first, second = ev(policy, 1, episodes=8), ev(policy, 1, episodes=8)
    assert first == {**second, "wall_clock_s": first["wall_clock_s"]}
    assert len(made) == 1 and not closed
    ev(policy, 1, episodes=2)  # a different number of envs: new ones, the old ones closed
    assert len(made) == 2 and closed == [made[0]]
    ev.close()
    assert closed == made


def test_env_device_names_the_cuda_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """An env's device carries its index: a tensor made on ``cuda`` reports ``cuda:0``, and an env whose
    device said only ``cuda`` would compare unequal to its own tensors (the episode counters were then made
    anew at every chunk, so no episode was ever cut at its horizon)."""
    from flowrl.envs.base import env_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert env_device("cuda") == torch.device("cuda", 0)
    assert env_device(torch.device("cuda")) == torch.device("cuda", 0)
    assert env_device("cuda:1") == torch.device("cuda", 1)
    assert env_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("task,backend", [("Hopper", "cpu"), ("Hopper", "gymnasium"), ("PointReach", "auto")])
def test_episode_counters_last_across_chunks(task, backend) -> None:
    env = make(task, 2, backend=backend, seed=0)
    try:
        env.reset(seed=0)
        counters = env._counters()
        steps = 3
        env.step_chunk(torch.zeros((2, steps, env.act_dim)))
        assert env._counters()[1] is counters[1]
        alive = ~env.step_chunk(torch.zeros((2, steps, env.act_dim))).done
        assert torch.equal(env.elapsed[alive], torch.full_like(env.elapsed[alive], 2 * steps))
    finally:
        env.close()
