"""The meanflow head: SplitMeanFlow's interval-splitting identity, one-step sampling of a trained head,
its step in ReinFlow's noisy chain at K = 1, and its graphed-step draws in behaviour cloning."""

from __future__ import annotations

import copy
import math

import torch

from flowrl.agents.bc import draw_flow_matching, draw_interval, flow_matching_loss, interval_consistency_loss
from flowrl.agents.reinflow import ReinFlow
from flowrl.checkpoint import save_checkpoint
from flowrl.config import PolicyConfig, load_stage_config
from flowrl.policy import FlowPolicy, split_interval_target
from flowrl.sampler import gaussian_log_prob


def _linear_flow(a: float, b: float):
    """dx/dt = a x + b: its exact average velocity over [t, t + d] and its velocity."""
    def average(t: torch.Tensor, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        d = d.view(-1, 1, 1)
        end = torch.exp(a * d) * (x + b / a) - b / a
        return torch.where(d > 0, (end - x) / d.clamp_min(1e-300), a * x + b)
    return average


def test_split_identity_holds_for_the_exact_average_velocity_of_a_linear_flow() -> None:
    torch.manual_seed(0)
    average = _linear_flow(-1.3, 0.4)
    x = torch.randn(64, 3, 2, dtype=torch.float64)
    d = torch.rand(64, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * (1 - d)
    split = torch.rand(64, dtype=torch.float64)
    torch.testing.assert_close(split_interval_target(average, x, t, d, split), average(t, x, d), rtol=1e-12, atol=1e-12)
    # a field that is not the average velocity (the instantaneous one) fails the identity
    instantaneous = lambda tt, xx, dd: -1.3 * xx + 0.4  # noqa: E731
    gap = (split_interval_target(instantaneous, x, t, d, split) - average(t, x, d)).abs().max()
    assert float(gap) > 1e-2


def _train_1d(head: str, steps: int, seed: int = 0) -> FlowPolicy:
    """A tiny policy on a 1-D bimodal problem: x1 = +-0.8 with equal probability, whatever the observation
    (behaviour cloning's losses and EMA, written out)."""
    torch.manual_seed(seed)
    cfg = PolicyConfig(head=head, horizon=1, act_steps=1, k=1, hidden_dim=64, depth=1, time_embed_dim=16)
    policy = FlowPolicy(cfg, 1, 1)
    ema = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    n, n_sc = 256, 128
    cond = policy.encode(torch.zeros(n, 1, 1))
    for _ in range(steps):
        x1 = 0.8 * (torch.randint(0, 2, (n, 1, 1), generator=gen) * 2 - 1).float()
        fm = flow_matching_loss(policy, cond[:n - n_sc], x1[:n - n_sc],
                                draws=draw_flow_matching((n - n_sc, 1, 1), gen, torch.device("cpu")))
        loss = fm
        if head == "meanflow":
            loss = fm + interval_consistency_loss(policy, ema, cond[n - n_sc:], cond[n - n_sc:].detach(),
                                                  x1[n - n_sc:], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(policy.parameters()), 0.05)
    return ema.eval()


def _wasserstein_to_modes(samples: torch.Tensor) -> float:
    """W1 distance between the samples and the data distribution (half at -0.8, half at +0.8)."""
    ordered = samples.flatten().sort().values
    quantiles = torch.where(torch.arange(len(ordered)) < len(ordered) // 2, -0.8, 0.8)
    return float((ordered - quantiles).abs().mean())


def test_one_step_meanflow_samples_the_bimodal_data_where_rectified_flow_averages_it() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads only contend
    try:
        meanflow, reflow = _train_1d("meanflow", steps=1000), _train_1d("reflow", steps=400)
    finally:
        torch.set_num_threads(threads)
    obs = torch.zeros(2000, 1, 1)
    noise = torch.randn(2000, 1, 1, generator=torch.Generator().manual_seed(1))
    one_step = meanflow.predict(obs, 1, noise).flatten()
    assert _wasserstein_to_modes(one_step) < 0.1
    assert ((one_step.abs() - 0.8).abs() < 0.2).float().mean() > 0.85  # the mass sits on the modes
    assert abs(float((one_step > 0).float().mean()) - 0.5) < 0.05  # both modes, in proportion
    # a rectified flow's one step is the data's mean given the noise, between the modes
    assert _wasserstein_to_modes(reflow.predict(obs, 1, noise)) > 0.5


def test_reinflow_step_of_a_meanflow_head_at_k1_is_exactly_gaussian(tmp_path) -> None:
    """At K = 1 the chain is x0 -> x1 = x0 + u(x0, 0, 1) + sigma eps: ReinFlow's log-likelihood is the
    Gaussian density of that one step, and the sampled steps are distributed as it says."""
    torch.manual_seed(3)
    cfg = PolicyConfig(head="meanflow", horizon=2, act_steps=2, k=4, hidden_dim=32, depth=1, time_embed_dim=16)
    init = save_checkpoint(tmp_path / "mf", FlowPolicy(cfg, 4, 2), {"task": "PointReach"})
    agent = ReinFlow(load_stage_config("finetune", None, [
        f"init={init}", "device=cpu", "train.k=1", "train.num_envs=8", "train.rollout_steps=2",
        "train.minibatch_size=16", "train.logprob_normalization=sum", "train.sigma_min=0.05", "train.sigma_max=0.2"]))
    try:
        assert agent.K == 1
        obs = agent.history.get()[:1].expand(4000, -1, -1)
        with torch.no_grad():
            chain, _ = agent.act(obs)
            cond = agent.policy.encode(obs)
            zeros, ones = torch.zeros(len(obs)), torch.ones(len(obs))
            mean = chain[:, 0] + agent.policy.velocity(zeros, chain[:, 0], cond, ones)
            std = agent.noise(zeros, cond)
            expected = gaussian_log_prob(chain[:, 1], mean, std).flatten(1).sum(1)
            lp, entropy = agent.log_prob_and_entropy(obs, chain)
        assert chain.shape[1] == 2
        torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(entropy, (std.log() + 0.5 * math.log(2 * math.pi * math.e)).flatten(1).sum(1))
        z = ((chain[:, 1] - mean) / std).flatten()
        assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    finally:
        agent.close()


def test_interval_draws_cover_the_unit_interval() -> None:
    draws = draw_interval((4096, 2, 1), torch.Generator().manual_seed(0), torch.device("cpu"))
    d, t = draws["d"], draws["t"]
    assert float(d.min()) > 0 and float(d.max()) <= 1 and float(d.max()) > 0.99
    assert float(t.min()) >= 0 and float((t + d).max()) <= 1 + 1e-6
    assert 0 <= float(draws["split"].min()) and float(draws["split"].max()) < 1
