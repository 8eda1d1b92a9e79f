"""DSRL: the steering head starts at the pretrained policy exactly, the likelihood is the Gaussian's, the
flow stays frozen, the steered policy saves, loads, exports and resumes, and a run must improve."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import clone_point_reach, ctrl_c_after
from torch.distributions import Normal

from flowrl.agents.dsrl import DSRL
from flowrl.agents.reinflow import ReinFlow
from flowrl.checkpoint import load_policy
from flowrl.config import load_stage_config
from flowrl.deploy.export import export
from flowrl.describe import describe_checkpoint, format_description
from flowrl.errors import FlowrlError, Interrupted
from flowrl.evaluation import evaluate
from flowrl.policy import SteeringHead
from flowrl.training import Trainer

FINETUNE = ["algo=dsrl", "device=cpu", "train.num_envs=128", "train.rollout_steps=15", "train.critic_lr=1e-3",
            "train.critic_lr_min=1e-3", "train.minibatch_size=480", "train.gamma=0.9", "train.eval_every=100",
            "train.checkpoint_every=100", "train.critic_warmup_iterations=1", "eval.episodes=64", "eval.k=[4]"]


def _cfg(*overrides: str):
    return load_stage_config("finetune", None, list(overrides))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A behaviour-cloned PointReach policy of a slow (40% speed), widely noisy demonstrator: steering picks
    actions among those the flow can produce, so the demonstrations must hold faster ones."""
    return clone_point_reach(tmp_path_factory.mktemp("pointreach"), steps=400, noise=0.3)


def test_a_new_steering_head_leaves_the_policy_exactly_as_it_was(pretrained) -> None:
    policy, _ = load_policy(pretrained)
    obs = torch.randn(32, 1, policy.obs_dim, generator=torch.Generator().manual_seed(0))
    eps = policy.initial_noise(32, torch.Generator().manual_seed(1))
    before = policy.predict(obs, noise=eps)
    policy.steering = SteeringHead(policy.cond_dim, policy.chunk_shape, 32)
    assert torch.equal(policy.predict(obs, noise=eps), before)
    mean, std = policy.steering.distribution(policy.encode(obs))
    assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(std, torch.ones_like(std))


def test_steering_bounds_the_mean_and_keeps_the_std_between_its_floor_and_one() -> None:
    head = SteeringHead(5, (2, 3), 16, mean_bound=1.5, std_min=0.1)
    with torch.no_grad():
        head.net[-1].bias.fill_(100.0)
        head.log_std[0].fill_(3.0)
        head.log_std[1].fill_(-9.0)
    mean, std = head.distribution(torch.randn(4, 5))
    torch.testing.assert_close(mean, torch.full_like(mean, 1.5))
    torch.testing.assert_close(std[:, 0], torch.ones_like(std[:, 0]))
    torch.testing.assert_close(std[:, 1], torch.full_like(std[:, 1], 0.1))


def test_log_likelihood_is_the_steering_gaussians_and_the_first_ratio_is_one(pretrained) -> None:
    agent = DSRL(_cfg(f"init={pretrained}", *FINETUNE, "seed=3"))
    with torch.no_grad():  # a head that has moved: a state-dependent mean, a narrower std
        agent.steering.net[-1].weight.normal_(0.0, 0.3)
        agent.steering.log_std.fill_(math.log(0.5))
    batch = agent.collect()
    obs, x0 = batch["obs"][:40], batch["sample"][:40]
    assert x0.shape[1:] == agent.policy.chunk_shape
    lp, entropy = agent.log_prob_and_entropy(obs, x0)
    mean, std = agent.steering.distribution(agent.policy.encode(obs))
    dist = Normal(mean, std)
    torch.testing.assert_close(lp, dist.log_prob(x0).flatten(1).sum(1))
    torch.testing.assert_close(entropy, dist.entropy().flatten(1).sum(1))
    agent.iteration = 5  # past the critic warm-up
    logs = agent.update(batch)
    assert logs["train/first_ratio_deviation"] < 1e-6 and logs["train/critic_warmup"] == 0.0


def test_the_flow_stays_frozen_and_only_the_steering_head_trains(pretrained) -> None:
    agent = DSRL(_cfg(f"init={pretrained}", *FINETUNE, "seed=4"))
    flow = {k: v.clone() for k, v in agent.policy.state_dict().items() if not k.startswith("steering.")}
    steering = {k: v.clone() for k, v in agent.steering.state_dict().items()}
    agent.iteration = 5
    agent.update(agent.collect())
    for k, v in agent.policy.state_dict().items():
        if k in flow:
            assert torch.equal(v, flow[k]), k
    assert any(not torch.equal(v, steering[k]) for k, v in agent.steering.state_dict().items())
    assert {id(p) for p in agent.actor_params} == {id(p) for p in agent.steering.parameters()}


def test_action_drift_is_zero_until_the_steering_trains(pretrained) -> None:
    agent = DSRL(_cfg(f"init={pretrained}", *FINETUNE, "train.critic_warmup_iterations=1", "seed=5"))
    assert agent.train_iteration(0)["train/action_drift"] == 0.0
    assert agent.train_iteration(1)["train/action_drift"] > 0.0


def test_dsrl_improves_a_behaviour_cloned_policy_and_its_checkpoint_evaluates_and_exports(tmp_path,
                                                                                         pretrained) -> None:
    """PointReach: BC learns the slow, noisy demonstrator; steering its noise must raise the return, and the
    saved policy (steering inside) must load, evaluate and export like any other (< 30 s on CPU)."""
    policy, _ = load_policy(pretrained)
    before = evaluate(policy, "PointReach", 4, episodes=64, seed=5)["return_mean"]
    Trainer(DSRL(_cfg(f"init={pretrained}", *FINETUNE, "train.env_steps=46080")), tmp_path / "ft",
            progress=False).fit()
    steered, config = load_policy(tmp_path / "ft" / "checkpoints" / "46080")
    assert steered.steering is not None and config["policy"]["steering_hidden_dim"] == 256
    after = evaluate(steered, "PointReach", 4, episodes=64, seed=5)["return_mean"]
    assert after > before + 4.0, (before, after)  # measured: -15.3 -> -8.3
    export(tmp_path / "ft" / "checkpoints" / "46080", tmp_path / "policy.pt2", fmt="torch-export")  # checked against eager predict
    assert "a steering head that chooses its initial noise" in format_description(describe_checkpoint(tmp_path / "ft"))


def test_resumed_dsrl_equals_uninterrupted(tmp_path, pretrained) -> None:
    cfg = _cfg(f"init={pretrained}", *FINETUNE, "train.env_steps=11520", "train.checkpoint_every=1")
    full = Trainer(DSRL(cfg), tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(DSRL(cfg), tmp_path / "part", progress=False)
    ctrl_c_after(part.agent, 1)
    with pytest.raises(Interrupted, match="interrupted at iteration 2"):
        part.fit()
    resumed = Trainer(DSRL(cfg), tmp_path / "part", resume=True, progress=False)
    assert resumed.state.iteration == 2
    resumed.fit()
    for module in ("policy", "critic"):
        for a, b in zip(getattr(full.agent, module).state_dict().values(),
                        getattr(resumed.agent, module).state_dict().values()):
            assert torch.equal(a, b), module


def test_stages_that_would_drop_the_steering_head_refuse_it(tmp_path, pretrained) -> None:
    Trainer(DSRL(_cfg(f"init={pretrained}", *FINETUNE, "train.env_steps=7680", "train.checkpoint_every=1")),
            tmp_path / "ft", progress=False).fit()
    steered = str(tmp_path / "ft" / "checkpoints" / "7680")
    with pytest.raises(FlowrlError, match="steering head"):
        ReinFlow(_cfg(f"init={steered}", "device=cpu", "train.num_envs=8"))
    trained = load_policy(steered)[0].steering.state_dict()
    assert any(v.abs().sum() > 0 for k, v in trained.items() if k.startswith("net.4"))  # the head has moved
    again = DSRL(_cfg(f"init={steered}", *FINETUNE))  # a second DSRL run continues the head it has
    for k, v in again.steering.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with pytest.raises(FlowrlError, match="std_min"):
        _cfg(f"init={pretrained}", *FINETUNE, "train.std_min=1.0")
