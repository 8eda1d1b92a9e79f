"""The warp backend (MuJoCo Warp, float32) against the cpu backend, on Warp's CPU device.

The GPU path (CUDA graph replay) is the same code with one more branch; it is measured by
benchmarks/env_throughput.py on the GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowrl.envs import make
from flowrl.envs import warp_available
from flowrl.errors import FlowrlError

pytestmark = pytest.mark.skipif(not warp_available(), reason="mujoco-warp not installed (pip install 'flowrl[warp]')")


def _sampled_states(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    env = make(task, n, backend="cpu", seed=seed)
    env.reset()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(25):
        env.step(torch.rand(n, env.act_dim, generator=gen) * 2 - 1)
    qpos, qvel = env.get_state()
    return qpos, qvel, torch.rand(n, env.act_dim, generator=gen) * 2 - 1


@pytest.mark.parametrize("task", ["Hopper", "Walker2d", "HalfCheetah", "Humanoid-Newton"])
def test_one_step_parity_on_sampled_states(task) -> None:
    qpos, qvel, action = _sampled_states(task, 16, seed=1)
    warp, cpu = make(task, 16, backend="warp", device="cpu", seed=1), make(task, 16, backend="cpu", seed=1)
    warp.reset()
    cpu.reset()
    torch.testing.assert_close(warp.set_state(qpos, qvel).double(), cpu.set_state(qpos, qvel), rtol=1e-5, atol=1e-5)
    _, r_w, te_w, _, info_w = warp.step(action)
    _, r_c, te_c, _, info_c = cpu.step(action)
    (q_w, v_w), (q_c, v_c) = warp.get_state(), cpu.get_state()
    assert q_w.dtype == torch.float32
    assert (q_w.double() - q_c).abs().max() < 1e-5
    assert ((v_w.double() - v_c).abs() / (v_c.abs() + 1.0)).max() < 1e-3
    assert torch.equal(te_w, te_c)
    torch.testing.assert_close(r_w, r_c, rtol=1e-3, atol=1e-3)


def test_same_seed_same_initial_states_as_cpu() -> None:
    warp, cpu = make("Walker2d", 5, backend="warp", device="cpu", seed=7), make("Walker2d", 5, backend="cpu", seed=7)
    torch.testing.assert_close(warp.reset().double(), cpu.reset(), rtol=0, atol=1e-6)


def _mean_return(task: str, backend: str, n: int, steps: int) -> float:
    env = make(task, n, backend=backend, device="cpu", seed=11)
    env.reset()
    phase = torch.linspace(0, 2 * np.pi, env.act_dim)
    total = torch.zeros(n, dtype=torch.float64)
    alive = torch.ones(n, dtype=torch.bool)
    for t in range(steps):
        action = (0.5 * torch.sin(0.2 * t + phase)).repeat(n, 1)
        _, reward, _, _, info = env.step(action)
        total += torch.where(alive, reward.double().cpu(), 0.0)
        alive &= ~info["done_mask"].cpu()
    return float(total.mean())


@pytest.mark.parametrize("task,steps,n", [pytest.param("Hopper", 100, 16, marks=pytest.mark.slow),
                                          pytest.param("Ant", 60, 24, marks=pytest.mark.slow)])
def test_returns_of_a_fixed_policy_agree_statistically(task, steps, n) -> None:
    # Ant's capsule-floor contacts use another friction frame under the pyramidal cone in MuJoCo
    # Warp, so single steps differ; returns over many envs must still agree.
    warp, cpu = _mean_return(task, "warp", n, steps), _mean_return(task, "cpu", n, steps)
    assert abs(warp - cpu) <= 0.05 * abs(cpu) + 5.0, (warp, cpu)


@pytest.mark.slow  # seconds of Warp CPU kernels; the non-finite reset below covers the same reset path
def test_overflow_resets_and_counts_the_world() -> None:
    env = make("Hopper", 4, backend="warp", device="cpu", seed=3, nconmax=1, njmax=8)
    env.reset()
    seen = 0
    for _ in range(40):
        _, reward, terminated, _, info = env.step(torch.zeros(4, 3))
        if info["bad_state"].any():
            seen += int(info["bad_state"].sum())
            assert terminated[info["bad_state"]].all() and (reward[info["bad_state"]] == 0).all()
            assert (env.elapsed[info["bad_state"]] == 0).all()
    assert seen > 0 and info["bad_state_count"] == seen


def test_non_finite_state_resets_only_that_env() -> None:
    env = make("Hopper", 3, backend="warp", device="cpu", seed=0)
    env.reset()
    env.step(torch.zeros(3, 3))
    qpos, qvel = env.get_state()
    qvel[1, 2] = float("nan")
    env.set_state(qpos, qvel)
    _, reward, terminated, _, info = env.step(torch.zeros(3, 3))
    assert info["bad_state"].tolist() == [False, True, False]
    assert int(env.elapsed[1]) == 0 and int(env.elapsed[0]) == 2 and torch.isfinite(env.get_state()[1]).all()


def test_pgs_humanoid_is_refused_with_a_pointer_to_the_newton_variant() -> None:
    with pytest.raises(FlowrlError, match="Humanoid-Newton"):
        make("Humanoid", 2, backend="warp", device="cpu")


@pytest.mark.slow
def test_batched_autoresets_are_seeded_and_within_the_reset_noise() -> None:
    def run(seed: int) -> list[torch.Tensor]:
        env = make("Hopper", 6, backend="warp", device="cpu", seed=seed)
        env.reset()
        starts = []
        for _ in range(40):
            obs, _, _, _, info = env.step(torch.tensor([[1.0, -1.0, 1.0]]).repeat(6, 1))
            if info["done_mask"].any():
                starts.append(obs[info["done_mask"]])
        return starts

    a, b, c = run(4), run(4), run(5)
    assert len(a) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    first = torch.cat(a)
    # a fresh Hopper episode: qpos0 (z = 1.25) plus uniform noise of scale 5e-3
    assert ((first[:, 0] - 1.25).abs() <= 5e-3 + 1e-6).all() and (first[:, 5:].abs() <= 5e-3 + 1e-6).all()


def test_autoresets_are_masked_on_the_device_and_leave_running_envs_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk's end resets the finished worlds by mask (no indices read back to the host): their next
    observation is a fresh start within the reset noise and their counters restart, while the worlds still
    running keep their observation and counters."""
    env = make("Hopper", 6, backend="warp", device="cpu", seed=2)
    env.reset()
    monkeypatch.setattr(env, "_reset_ids", lambda ids: pytest.fail("an autoreset by indices"))
    actions = torch.tensor([1.0, -1.0, 1.0]).repeat(6, 4, 1)
    actions[:3] = 0.0
    ended = 0
    for _ in range(15):
        before = env.elapsed.clone()
        r = env.step_chunk(actions)
        done = r.done
        ended += int(done.sum())
        fresh = r.obs[done]
        assert ((fresh[:, 0] - 1.25).abs() <= 5e-3 + 1e-6).all() and (fresh[:, 5:].abs() <= 5e-3 + 1e-6).all()
        assert (env.elapsed[done] == 0).all()
        assert torch.equal(r.obs[~done], r.final_obs[~done])
        assert torch.equal(env.elapsed[~done], before[~done] + 4)
    assert ended > 0
