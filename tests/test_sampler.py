"""The Euler sampler and the policy's sampling path: exact math."""

from __future__ import annotations

import pytest
import torch

from flowrl.config import PolicyConfig
from flowrl.policy import FlowPolicy
from flowrl.sampler import euler_sample, noisy_euler_chain, step_mean, time_grid


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_constant_velocity_is_exact(k: int) -> None:
    x0 = torch.randn(5, 4, 3, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64)
    x1 = euler_sample(lambda t, x: c.expand_as(x), x0, k)
    torch.testing.assert_close(x1, x0 + c, rtol=0, atol=1e-14)


@pytest.mark.parametrize("k", [1, 3, 4, 7])
def test_time_grid_is_k_over_k(k: int) -> None:
    seen = []
    euler_sample(lambda t, x: (seen.append(t.clone()), torch.zeros_like(x))[1], torch.zeros(2, 1), k)
    expected = torch.tensor([i / k for i in range(k)], dtype=torch.float32)
    assert torch.equal(torch.stack([t[0] for t in seen]), expected)
    assert torch.equal(torch.cat(time_grid(k, 1, torch.device("cpu"))), expected)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_linear_in_time_field_matches_left_riemann_sum(k: int) -> None:
    # dx/dt = t: Euler from t=0 gives sum_k (k/K) (1/K) = (K-1) / (2K), not the ODE's 1/2.
    x1 = euler_sample(lambda t, x: t.view(-1, 1).expand_as(x).double(), torch.zeros(3, 2, dtype=torch.float64), k)
    torch.testing.assert_close(x1, torch.full((3, 2), (k - 1) / (2 * k), dtype=torch.float64))


@pytest.mark.parametrize("head", ["reflow", "shortcut"])
def test_policy_is_deterministic_given_noise_and_returns_env_actions(head: str) -> None:
    torch.manual_seed(0)
    cfg = PolicyConfig(head=head, hidden_dim=32, depth=1, obs_history=2, horizon=3, act_steps=2)
    policy = FlowPolicy(cfg, obs_dim=5, act_dim=2, action_low=[-2.0, 0.0], action_high=[2.0, 1.0])
    obs = torch.randn(7, 2, 5)
    noise = policy.initial_noise(7, torch.Generator().manual_seed(1))
    for k in (1, 3, 8):
        a = policy.predict(obs, k=k, noise=noise)
        b = policy.predict(obs, k=k, noise=noise.clone())
        assert torch.equal(a, b)
        assert a.shape == (7, 3, 2)
        assert (a[..., 0].abs() <= 2).all() and (a[..., 1] >= 0).all() and (a[..., 1] <= 1).all()
    assert not torch.equal(policy.predict(obs, 4, noise=noise), policy.predict(obs, 4, noise=noise + 1))


def test_action_normalisation_round_trip() -> None:
    policy = FlowPolicy(PolicyConfig(hidden_dim=8, depth=1), 3, 2, [-2.0, 0.0], [2.0, 1.0])
    a = torch.tensor([[[-2.0, 0.0], [0.5, 0.25], [2.0, 1.0]]])
    z = policy.normalize_action(a)
    torch.testing.assert_close(z[0, 0], torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(z[0, 2], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(policy.unnormalize_action(z), a)


def test_shortcut_head_uses_step_size_one_over_k() -> None:
    torch.manual_seed(0)
    policy = FlowPolicy(PolicyConfig(head="shortcut", hidden_dim=16, depth=1), 3, 2)
    seen = []
    original = policy.velocity

    def spy(t, a, cond, d=None):
        seen.append(d.clone())
        return original(t, a, cond, d)

    policy.velocity = spy  # type: ignore[method-assign]
    policy.sample(torch.randn(2, 1, 3), k=4)
    assert len(seen) == 4 and all(torch.all(d == 0.25) for d in seen)


def _gaussian_flow(m: float, s: float):
    """The exact rectified-flow velocity from N(0, 1) noise to N(m, s^2) data along x_t = (1-t) x0 + t x1."""

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.view(-1, 1)
        var = (1 - tt) ** 2 + tt ** 2 * s ** 2
        return m + (tt * s ** 2 - (1 - tt)) / var * (x - tt * m)

    return velocity


def test_flow_sde_keeps_the_flows_marginals_where_plain_injection_widens_them() -> None:
    """On a flow with a known velocity, Euler-Maruyama with the score-corrected drift ends at the data
    distribution; the same noise added to the plain Euler mean inflates its variance."""
    m, s, k, sigma = 0.7, 0.3, 100, 0.06  # per-step noise std 0.06: diffusion g = sigma * sqrt(K) = 0.6
    velocity = _gaussian_flow(m, s)
    noise = lambda t, x: torch.full_like(x, sigma)  # noqa: E731
    x0 = torch.randn(40_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    deterministic = euler_sample(velocity, x0, k)
    sde = noisy_euler_chain(velocity, noise, x0, k, torch.Generator().manual_seed(1), score_correction=True)[:, -1]
    plain = noisy_euler_chain(velocity, noise, x0, k, torch.Generator().manual_seed(1))[:, -1]
    assert float(deterministic.mean()) == pytest.approx(m, abs=0.005)
    assert float(deterministic.std()) == pytest.approx(s, abs=0.01)
    assert float(sde.mean()) == pytest.approx(m, abs=0.01)
    assert float(sde.std()) == pytest.approx(s, abs=0.015)
    assert float(plain.std()) > s + 0.1


def test_flow_sde_drift_without_noise_is_the_velocity() -> None:
    velocity = _gaussian_flow(0.2, 0.5)
    x, t = torch.randn(8, 1, dtype=torch.float64), torch.rand(8, dtype=torch.float64) * 0.9
    v = velocity(t, x)
    corrected = step_mean(x, t, v, torch.zeros_like(x), 0.25, score_correction=True)
    torch.testing.assert_close(corrected, x + 0.25 * v, rtol=0, atol=0)
