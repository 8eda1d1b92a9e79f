"""The shortcut self-consistency target and the BC losses."""

from __future__ import annotations

import torch

from flowrl.agents.bc import flow_matching_loss, shortcut_consistency_loss
from flowrl.config import PolicyConfig
from flowrl.policy import FlowPolicy, shortcut_target


def test_target_matches_two_half_steps() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=torch.float64)

    def field(t, x, d):  # any nonlinear field of (t, x, d)
        return torch.tanh(x @ w) * (1 + t.view(-1, 1, 1)) + d.view(-1, 1, 1) * x ** 2

    x_t = torch.randn(6, 4, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 0.5, 0.75, 0.0], dtype=torch.float64)
    d = torch.tensor([0.125, 0.125, 0.25, 0.0625, 0.125, 0.5], dtype=torch.float64)
    x_mid = x_t + d.view(-1, 1, 1) * field(t, x_t, d)
    x_end = x_mid + d.view(-1, 1, 1) * field(t + d, x_mid, d)
    torch.testing.assert_close(shortcut_target(field, x_t, t, d), (x_end - x_t) / (2 * d.view(-1, 1, 1)))


def test_one_shortcut_step_of_target_lands_on_two_small_steps() -> None:
    torch.manual_seed(1)
    policy = FlowPolicy(PolicyConfig(head="shortcut", hidden_dim=16, depth=1), 4, 2).double()
    cond = policy.encode(torch.randn(5, 1, 4, dtype=torch.float64))
    x_t = torch.randn(5, 4, 2, dtype=torch.float64)
    t = torch.full((5,), 0.5, dtype=torch.float64)
    d = torch.full((5,), 0.25, dtype=torch.float64)
    v = lambda tt, xx, dd: policy.velocity(tt, xx, cond, dd)  # noqa: E731
    two = x_t + 0.25 * v(t, x_t, d)
    two = two + 0.25 * v(t + 0.25, two, d)
    torch.testing.assert_close(x_t + 0.5 * shortcut_target(v, x_t, t, d), two)


def test_losses_are_finite_and_differentiable() -> None:
    torch.manual_seed(2)
    policy = FlowPolicy(PolicyConfig(head="shortcut", hidden_dim=16, depth=1, max_shortcut_steps=8), 4, 2)
    obs = torch.randn(16, 1, 4)
    x1 = torch.rand(16, 4, 2) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    loss = flow_matching_loss(policy, policy.encode(obs), x1, gen) + shortcut_consistency_loss(
        policy, policy, policy.encode(obs), policy.encode(obs), x1, gen)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in policy.velocity_net.parameters())


def test_flow_matching_loss_is_zero_for_the_true_field() -> None:
    # A "network" that returns x1 - x0 exactly has zero rectified-flow loss: x_t = x0 + t (x1 - x0).
    class Oracle(FlowPolicy):
        def velocity(self, t, a, cond, step_size=None):
            return (self.target_x1 - a) / (1 - t.view(-1, 1, 1))

    policy = Oracle(PolicyConfig(hidden_dim=8, depth=1), 2, 1)
    policy.target_x1 = torch.rand(32, 4, 1)
    gen = torch.Generator().manual_seed(0)
    loss = flow_matching_loss(policy, torch.zeros(32, 2), policy.target_x1, gen)
    assert loss.item() < 1e-10
