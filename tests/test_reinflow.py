"""ReinFlow: exact chain likelihood, GAE, the PPO ratio, exact resume, and a run that must improve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_full_state_resumes, clone_point_reach, ctrl_c_after
from torch.distributions import Normal

from flowrl.agents.bc import BehaviorCloning
from flowrl.agents.ppo import compute_gae
from flowrl.agents.reinflow import ReinFlow, sigma_upper_bound
from flowrl.checkpoint import load_policy
from flowrl.agents.scripted import write_demonstrations
from flowrl.config import load_stage_config
from flowrl.envs import make
from flowrl.errors import Interrupted
from flowrl.evaluation import evaluate
from flowrl.training import Trainer, capture, restore
from flowrl.sampler import chain_log_prob, euler_sample, noisy_euler_chain

def _pretrain_cfg(*overrides: str):
    return load_stage_config("pretrain", None, list(overrides))


def _cfg(*overrides: str):
    return load_stage_config("finetune", None, list(overrides))


def _agent(*overrides: str) -> ReinFlow:
    return ReinFlow(_cfg(*overrides))


def _run(cfg, out, resume: bool = False) -> Trainer:
    return Trainer(ReinFlow(cfg), out, resume=resume, progress=False)


FINETUNE = ["device=cpu", "train.num_envs=128", "train.rollout_steps=15", "train.actor_lr=3e-4",
            "train.actor_lr_min=1e-4", "train.critic_lr=1e-3", "train.critic_lr_min=1e-3", "train.minibatch_size=480",
            "train.clip_coef=0.05", "train.ent_coef=0", "train.gamma=0.9", "train.eval_every=100",
            "train.checkpoint_every=100", "train.critic_warmup_iterations=1", "train.sigma_min=0.05",
            "train.sigma_max=0.2", "eval.episodes=64", "eval.k=[4]"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A behaviour-cloned PointReach policy (the demonstrator moves at 40% speed)."""
    return clone_point_reach(tmp_path_factory.mktemp("pointreach"), steps=600)


def _field(w: torch.Tensor):
    return lambda t, x: torch.tanh(x @ w) + t.view(-1, 1, 1)


def test_chain_log_likelihood_equals_torch_distributions() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=torch.float64)
    velocity = _field(w)
    noise_std = lambda t, x: 0.1 + 0.05 * torch.sigmoid(x) * (1 + t.view(-1, 1, 1))  # noqa: E731
    k = 5
    x0 = torch.randn(7, 4, 3, dtype=torch.float64)
    chain = noisy_euler_chain(velocity, noise_std, x0, k, torch.Generator().manual_seed(1))
    expected = Normal(0.0, 1.0).log_prob(chain[:, 0]).flatten(1).sum(1)
    for i in range(k):
        x, t = chain[:, i], torch.full((7,), i / k, dtype=torch.float64)
        step = Normal(x + velocity(t, x) / k, noise_std(t, x))
        expected = expected + step.log_prob(chain[:, i + 1]).flatten(1).sum(1)
    # the batched evaluation takes flattened (B*K) inputs, conditioning repeated per chain
    torch.testing.assert_close(chain_log_prob(velocity, noise_std, chain, k), expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 4])
def test_chain_with_vanishing_noise_is_the_deterministic_sampler(k) -> None:
    torch.manual_seed(2)
    velocity = _field(torch.randn(3, 3, dtype=torch.float64))
    x0 = torch.randn(5, 4, 3, dtype=torch.float64)
    chain = noisy_euler_chain(velocity, lambda t, x: torch.full_like(x, 1e-12), x0, k, torch.Generator())
    torch.testing.assert_close(chain[:, -1], euler_sample(velocity, x0, k), rtol=0, atol=1e-10)


def gae_loop(rewards, values, next_value, terminated, truncated, final_values, gamma, lam):
    t_len, n = rewards.shape
    adv = torch.zeros(t_len, n, dtype=torch.float64)
    for i in range(n):
        running = 0.0
        for t in reversed(range(t_len)):
            if terminated[t, i]:
                nv, carry = 0.0, 0.0
            elif truncated[t, i]:
                nv, carry = float(final_values[t, i]), 0.0
            else:
                nv = float(next_value[i]) if t == t_len - 1 else float(values[t + 1, i])
                carry = 1.0
            delta = float(rewards[t, i]) + gamma * nv - float(values[t, i])
            running = delta + gamma * lam * carry * running
            adv[t, i] = running
    return adv


def test_gae_matches_a_plain_loop_with_terminations_and_truncations() -> None:
    g = torch.Generator().manual_seed(0)
    t_len, n = 12, 5
    rewards, values = torch.randn(t_len, n, generator=g).double(), torch.randn(t_len, n, generator=g).double()
    terminated = torch.rand(t_len, n, generator=g) < 0.15
    truncated = (torch.rand(t_len, n, generator=g) < 0.15) & ~terminated
    final_values, next_value = torch.randn(t_len, n, generator=g).double(), torch.randn(n, generator=g).double()
    assert terminated.any() and truncated.any()
    adv, ret = compute_gae(rewards, values, next_value, terminated, truncated, final_values, 0.97, 0.9)
    expected = gae_loop(rewards, values, next_value, terminated, truncated, final_values, 0.97, 0.9)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, expected + values)


def test_noise_bound_schedule() -> None:
    vals = [sigma_upper_bound(i, 100, 0.1, 0.24, 0.35, 0.7) for i in range(100)]
    assert vals[0] == vals[34] == 0.24
    assert vals[-1] == pytest.approx(0.3 * 0.1 + 0.7 * 0.24)
    assert all(a >= b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("normalization,exploration", [("mean", "reinflow"), ("sum", "reinflow"),
                                                      ("mean", "flow_sde"), ("mean", "last_step")])
def test_ratio_is_exactly_one_on_the_first_minibatch(tmp_path, pretrained, normalization, exploration) -> None:
    agent = _agent(f"init={pretrained}", *FINETUNE, "train.env_steps=11520", "train.critic_warmup_iterations=0",
                   f"train.logprob_normalization={normalization}", f"train.exploration={exploration}")
    for _ in range(2):
        logs = agent.update(agent.collect())
        agent.iteration += 1
        assert logs["train/first_ratio_deviation"] == 0.0
        assert logs["train/approx_kl"] > 0  # later minibatches did move the policy


@pytest.mark.parametrize("normalize", [True, False])
def test_advantage_standardisation_can_be_turned_off(pretrained, normalize) -> None:
    """One epoch of one minibatch, whose ratio is exactly 1: the clipped surrogate is then minus the mean
    advantage, raw or standardised (mean 0)."""
    agent = _agent(f"init={pretrained}", *FINETUNE, "train.critic_warmup_iterations=0", "train.update_epochs=1",
                   "train.num_envs=16", "train.rollout_steps=4", "train.minibatch_size=64",
                   f"train.normalize_advantages={normalize}")
    batch = agent.collect()
    assert len(batch["advantages"]) == 64
    logs = agent.update(batch)
    expected = 0.0 if normalize else -float(batch["advantages"].mean())
    assert logs["train/policy_gradient_loss"] == pytest.approx(expected, abs=1e-6)
    assert normalize or abs(expected) > 1e-3


def test_normalising_with_the_initial_noise_scales_the_log_likelihood_by_k_over_k_plus_1(pretrained) -> None:
    agents = {n: _agent(f"init={pretrained}", *FINETUNE, f"train.logprob_normalization={n}", "seed=4")
              for n in ("mean", "mean_with_initial")}
    batch = agents["mean"].collect()
    obs, chain = batch["obs"][:32], batch["sample"][:32]
    lp, ent = agents["mean"].log_prob_and_entropy(obs, chain)
    lp0, ent0 = agents["mean_with_initial"].log_prob_and_entropy(obs, chain)
    k = agents["mean"].K
    torch.testing.assert_close(lp0, lp * k / (k + 1))
    torch.testing.assert_close(ent0, ent * k / (k + 1))


def test_flow_sde_chain_likelihood_uses_the_score_corrected_mean(pretrained) -> None:
    """The chain the agent samples with ``exploration=flow_sde`` is scored with the same corrected
    drift: its log-likelihood equals the exact one of flowrl.sampler with that drift."""
    agent = _agent(f"init={pretrained}", *FINETUNE, "train.exploration=flow_sde", "train.logprob_normalization=sum")
    obs = agent.history.get()[:16]
    chain, _ = agent.act(obs)
    velocity, noise_std = agent._chain_fns(agent.policy.encode(obs), repeat=agent.K)
    with torch.no_grad():
        lp, _ = agent.log_prob_and_entropy(obs, chain)
        exact = chain_log_prob(velocity, noise_std, chain, agent.K, include_initial=False, score_correction=True)
        plain = chain_log_prob(velocity, noise_std, chain, agent.K, include_initial=False)
    torch.testing.assert_close(lp, exact)
    assert float((lp - plain).abs().max()) > 1e-3  # the correction is not a no-op


def test_critic_warmup_waits_for_explained_variance_then_never_returns(pretrained) -> None:
    agent = _agent(f"init={pretrained}", *FINETUNE, "train.critic_warmup_iterations=1", "train.critic_warmup_ev=0.999",
                   "train.critic_warmup_max_iterations=3", "train.num_envs=32", "train.rollout_steps=5",
                   "train.minibatch_size=80", "train.env_steps=3200")
    start = [p.detach().clone() for p in agent.policy.parameters()]
    flags = []
    for iteration in range(5):
        agent.iteration = iteration
        logs = agent.update(agent.collect())
        flags.append(logs["train/critic_warmup"])
        if iteration < 3:
            assert all(torch.equal(a, b) for a, b in zip(start, agent.policy.parameters()))
            assert "train/approx_kl" not in logs
    assert flags == [1.0, 1.0, 1.0, 0.0, 0.0]  # never reaches 0.999: ends at the iteration cap
    assert agent.critic_warmup.ready and "critic_warmup" in agent.state_components()
    reached = _agent(f"init={pretrained}", *FINETUNE, "train.critic_warmup_iterations=0", "train.critic_warmup_ev=0.01")
    reached.critic_warmup.ready = False
    assert not reached._critic_warmup(0.5) and reached.critic_warmup.ready
    assert reached._critic_warmup(-1.0) is False  # once over, a worse critic does not restart it


def test_actor_learning_rate_ramps_up_after_the_critic_warmup(pretrained) -> None:
    agent = _agent(f"init={pretrained}", *FINETUNE, "train.critic_warmup_iterations=1",
                   "train.actor_lr_ramp_iterations=3", "train.num_envs=32", "train.rollout_steps=5",
                   "train.minibatch_size=80", "train.env_steps=800")
    applied = []
    for iteration in range(5):
        logs = agent.train_iteration(iteration)
        applied.append(logs["train/actor_lr_applied"] / logs["train/learning_rate"])
    assert applied == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    state = capture(agent.state_components())
    assert state["critic_warmup"] == {"ready": False, "actor_iterations": 4}
    del state["critic_warmup"]["actor_iterations"]  # a checkpoint from before the ramp existed
    fresh = _agent(f"init={pretrained}", *FINETUNE)
    restore({"critic_warmup": fresh.critic_warmup}, {"critic_warmup": state["critic_warmup"]})
    assert fresh.critic_warmup.actor_iterations == 0


def test_last_step_noise_is_gaussian_around_the_deployed_chunk_and_scored_exactly(pretrained) -> None:
    """``exploration=last_step``: the sample holds the initial noise and the chunk; the chunk minus the
    deterministic flow's chunk from that noise is the last step's noise (its std the noise head's at
    t = (K-1)/K), and the log-likelihood is that Gaussian's, recomputed through the current parameters."""
    agent = _agent(f"init={pretrained}", *FINETUNE, "train.exploration=last_step", "train.logprob_normalization=sum",
                   "train.sigma_min=0.1", "train.sigma_max=0.1")
    obs = agent.history.get().repeat(8, 1, 1)
    sample, actions = agent.act(obs)
    assert sample.shape == (len(obs), 2, *agent.policy.chunk_shape)
    cond = agent.policy.encode(obs)
    with torch.no_grad():
        deployed = agent._deterministic_actions(agent.policy, cond, sample[:, 0])
        noise = sample[:, 1] - deployed
        assert float(noise.std()) == pytest.approx(0.1, rel=0.05)
        assert float(noise.mean().abs()) < 0.01
        torch.testing.assert_close(agent.policy.unnormalize_action(sample[:, 1]), actions)
        lp, entropy = agent.log_prob_and_entropy(obs, sample)
    expected = Normal(deployed, 0.1).log_prob(sample[:, 1]).flatten(1).sum(dim=1)
    torch.testing.assert_close(lp, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(entropy, Normal(deployed, 0.1).entropy().flatten(1).sum(dim=1), rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # the earlier steps follow the parameters: moving them moves the scored mean
        for p in agent.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
        moved, _ = agent.log_prob_and_entropy(obs, sample)
    assert float((moved - lp).abs().max()) > 1e-3


def test_reinflow_improves_a_behaviour_cloned_policy(tmp_path, pretrained) -> None:
    """PointReach: BC learns the 40%-speed demonstrator; ReinFlow must speed it up (< 30 s on CPU)."""
    policy, _ = load_policy(pretrained)
    before = evaluate(policy, "PointReach", 4, episodes=64, seed=5)["return_mean"]
    _run(_cfg(f"init={pretrained}", *FINETUNE, "train.env_steps=61440"), tmp_path / "ft").fit()
    after_policy, config = load_policy(tmp_path / "ft" / "checkpoints" / "61440")
    after = evaluate(after_policy, "PointReach", 4, episodes=64, seed=5)["return_mean"]
    assert config["stage"] == "finetune" and config["task"] == "PointReach"
    assert after > before + 5.0, (before, after)  # measured: about -15 -> -6 (92k env steps), -7 at 46k


def test_resumed_finetuning_equals_uninterrupted(tmp_path, pretrained) -> None:
    cfg = _cfg(f"init={pretrained}", *FINETUNE, "train.env_steps=15360", "train.checkpoint_every=1")
    full = _run(cfg, tmp_path / "full")
    full.fit()

    part = _run(cfg, tmp_path / "part")
    ctrl_c_after(part.agent, 1)
    with pytest.raises(Interrupted, match="interrupted at iteration 2"):
        part.fit()
    resumed = _run(cfg, tmp_path / "part", resume=True)
    assert resumed.state.iteration == 2
    resumed.fit()
    for module in ("policy", "noise", "critic"):
        for a, b in zip(getattr(full.agent, module).state_dict().values(),
                        getattr(resumed.agent, module).state_dict().values()):
            assert torch.equal(a, b), module


def test_time_limit_stops_with_an_evaluation_and_a_checkpoint_and_resume_continues(tmp_path, pretrained,
                                                                                  capsys) -> None:
    # 960 env steps per iteration, 4 iterations; a limit of ~0 minutes stops after the first
    cfg = _cfg(f"init={pretrained}", *FINETUNE, "train.env_steps=3840", "train.num_envs=32",
               "train.minibatch_size=240", "train.max_minutes=1e-6")
    run = _run(cfg, tmp_path / "run")
    run.fit()
    assert run.state.iteration == 1 and run.step == 960
    assert [e["iteration"] for e in run.state.eval_history] == [0, 1]
    assert (tmp_path / "run" / "checkpoints" / "960" / "model.safetensors").is_file()
    assert "stopped at the time limit (train.max_minutes=1e-06) after iteration 1 of 4" in capsys.readouterr().out
    run.close()
    more = _cfg(f"init={pretrained}", *FINETUNE, "train.env_steps=3840", "train.num_envs=32",
                "train.minibatch_size=240", "train.max_minutes=0")
    resumed = _run(more, tmp_path / "run", resume=True)
    resumed.fit()
    assert resumed.state.iteration == 4 and resumed.step == 3840
    resumed.close()


def test_eval_every_zero_evaluates_neither_the_start_nor_any_iteration(tmp_path, pretrained) -> None:
    cfg = _cfg(f"init={pretrained}", *FINETUNE, "train.env_steps=960", "train.num_envs=32",
               "train.minibatch_size=240", "train.eval_every=0")
    run = _run(cfg, tmp_path / "run")
    run.fit()
    assert run.state.iteration == 1 and run.state.eval_history == []
    assert not (tmp_path / "run" / "checkpoints" / "best").exists()
    run.close()


def test_stop_at_score_ends_the_run_at_the_first_evaluation_that_reaches_it(tmp_path, pretrained, capsys) -> None:
    # the starting policy's evaluation already reaches a score of -1e9: nothing is trained
    cfg = _cfg(f"init={pretrained}", *FINETUNE, "train.env_steps=3840", "train.num_envs=32",
               "train.minibatch_size=240", "train.stop_at_score=-1e9")
    run = _run(cfg, tmp_path / "run")
    run.fit()
    assert run.state.iteration == 0 and [e["iteration"] for e in run.state.eval_history] == [0]
    assert "stopped at iteration 0: the evaluation reached train.stop_at_score=-1e+09" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoints" / "0" / "model.safetensors").is_file()
    run.close()


def test_cpu_backend_full_state_round_trip() -> None:
    env = make("Hopper", 4, backend="cpu", seed=0)
    env.reset()
    gen = torch.Generator().manual_seed(0)
    actions = [torch.rand(4, 3, generator=gen) * 2 - 1 for _ in range(60)]
    first = assert_full_state_resumes(env, actions, 20)
    assert any(bool(x[2].any()) for x in first)  # resets happened in between, with restored RNGs


def test_shortcut_head_at_another_k(tmp_path) -> None:
    """A shortcut policy fine-tuned at K=2 (pretrained for K=4): the chain uses d = 1/2."""
    write_demonstrations(str(tmp_path / "demos.hdf5"), episodes=16, seed=1)
    cfg = _pretrain_cfg(*[
        "task=PointReach", f"data.path={tmp_path / 'demos.hdf5'}", "device=cpu", "policy.head=shortcut",
        "policy.hidden_dim=32", "policy.depth=1", "policy.horizon=2", "policy.act_steps=2", "policy.time_embed_dim=8",
        "policy.max_shortcut_steps=8", "train.steps=40", "train.batch_size=64", "train.eval_every=0",
        "train.checkpoint_every=40", "train.warmup_steps=5"])
    Trainer(BehaviorCloning(cfg), tmp_path / "bc", progress=False).fit()
    ft = _cfg(f"init={tmp_path / 'bc' / 'checkpoints' / '40'}", *FINETUNE, "train.k=2", "train.num_envs=32",
              "train.minibatch_size=120", "train.env_steps=3840", "train.critic_warmup_iterations=0")
    run = _run(ft, tmp_path / "ft")
    agent = run.agent
    batch = agent.collect()
    assert batch["sample"].shape[1:] == (3, 2, 2)  # K+1 states of a (horizon, act_dim) chunk
    assert agent.update(batch)["train/first_ratio_deviation"] == 0.0
    run.state.iteration += 1
    folder = run.save()
    policy, config = load_policy(folder)
    assert policy.is_shortcut and config["policy"]["k"] == 2 and config["stage"] == "finetune"


def test_finetune_cli_end_to_end_and_bad_input(tmp_path, pretrained, capsys) -> None:
    from flowrl.cli import main

    preset = tmp_path / "ft.yaml"
    preset.write_text("device: cpu\ntrain:\n  num_envs: 32\n  rollout_steps: 15\n  minibatch_size: 240\n"
                      "  eval_every: 1\n  eval_episodes: 4\n  checkpoint_every: 1\n  critic_warmup_iterations: 1\neval:\n  episodes: 4\n  steps: [2, 4]\n")
    out = tmp_path / "run"
    assert main(["finetune", str(preset), "--init", pretrained, "--env-steps", "1920", "--out", str(out), "--quiet"]) == 0
    assert "return mean" in capsys.readouterr().out
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1920", "960", "best"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(out)).Reload().Tags()["scalars"])
    assert {"rollout/ep_rew_mean", "train/approx_kl", "train/clip_fraction", "train/entropy_loss",
            "train/value_loss", "train/explained_variance", "train/noise_std", "time/fps",
            "eval/mean_reward"} <= tags
    assert main(["eval", str(out / "checkpoints" / "1920"), "--episodes", "2", "--k", "4"]) == 0
    assert main(["finetune", str(preset), "--out", str(tmp_path / "x")]) == 2
    assert main(["finetune", str(preset), "--init", pretrained, "train.clip_coef=-1", "--out", str(tmp_path / "y")]) == 2
    assert main(["finetune", str(preset), "--init", pretrained, "train.terminate_on_success=true",
                 "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "init: the pretrained checkpoint is required" in err and "train.clip_coef: must be > 0" in err
    assert "train.terminate_on_success: task PointReach reports no success" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_w2_regulariser_is_zero_before_the_first_step_and_logged(tmp_path, pretrained) -> None:
    agent = _agent(f"init={pretrained}", *FINETUNE, "train.env_steps=3840", "train.critic_warmup_iterations=0",
                   "train.w2_coef=0.1", "train.update_epochs=1", "train.minibatch_size=960")
    batch = agent.collect()
    obs, x0 = batch["obs"][:64], batch["sample"][:64, 0]
    same = (agent._deterministic_actions(agent.policy, agent.policy.encode(obs), x0)
            - agent._deterministic_actions(agent.reference, agent.reference.encode(obs), x0))
    assert torch.equal(same, torch.zeros_like(same))  # the policy starts as the frozen reference
    logs = agent.update(batch)
    assert logs["train/w2_loss"] > 0  # the second minibatch already sees a moved policy
    assert all(not p.requires_grad for p in agent.reference.parameters())


def test_w2_anchor_keeps_the_deployed_actions_near_the_pretrained_ones(tmp_path, pretrained) -> None:
    """The manipulation presets rely on it: on the same batch and minibatches, the anchor moves the
    deterministic actions less than the same update without it."""

    def drift(w2_coef: float) -> float:
        agent = _agent(f"init={pretrained}", *FINETUNE, "train.env_steps=3840", "train.critic_warmup_iterations=0",
                       f"train.w2_coef={w2_coef}", "train.update_epochs=4", "seed=3")
        batch = agent.collect()
        agent.update(batch)
        obs, x0 = batch["obs"], batch["sample"][:, 0]
        with torch.no_grad():
            moved = (agent._deterministic_actions(agent.policy, agent.policy.encode(obs), x0)
                     - agent._deterministic_actions(agent.reference, agent.reference.encode(obs), x0))
        agent.close()
        return float(moved.square().mean())

    free, anchored = drift(0.0), drift(100.0)
    assert free > 0 and anchored < 0.1 * free  # measured: 5.6e-3 free, 4.3e-5 anchored


def test_tracking_regulariser_is_the_deterministic_chunks_distance_to_the_sampled_ends(tmp_path, pretrained) -> None:
    agent = _agent(f"init={pretrained}", *FINETUNE, "train.env_steps=3840", "train.critic_warmup_iterations=0",
                   "train.tracking_coef=0.5")
    batch = agent.collect()
    obs, chain = batch["obs"][:64], batch["sample"][:64]
    cond = agent.policy.encode(obs)
    loss, values = agent._regulariser(obs, None, cond, chain)
    by_hand = (agent._deterministic_actions(agent.policy, cond, chain[:, 0]) - chain[:, -1]).square().mean()
    assert by_hand > 0  # the injected noise moves the sampled ends off the deterministic chunks
    torch.testing.assert_close(values, torch.stack([torch.zeros(()), by_hand]))
    torch.testing.assert_close(loss, 0.5 * by_hand)
    logs = agent.update(batch)
    assert logs["train/tracking_loss"] > 0 and "train/w2_loss" not in logs
    agent.close()


def test_tracking_moves_the_deterministic_chunks_toward_the_sampled_ones(tmp_path, pretrained) -> None:
    """On the same batch and minibatches, the update with the tracking term leaves the deterministic chunks nearer
    the sampled chains' ends than the same update without it."""

    def distance(tracking_coef: float) -> float:
        agent = _agent(f"init={pretrained}", *FINETUNE, "train.env_steps=3840", "train.critic_warmup_iterations=0",
                       f"train.tracking_coef={tracking_coef}", "train.update_epochs=4", "seed=3")
        batch = agent.collect()
        agent.update(batch)
        obs, chain = batch["obs"], batch["sample"]
        with torch.no_grad():
            gap = agent._deterministic_actions(agent.policy, agent.policy.encode(obs), chain[:, 0]) - chain[:, -1]
        agent.close()
        return float(gap.square().mean())

    free, tracked = distance(0.0), distance(100.0)
    assert tracked < 0.9 * free


def test_final_evaluation_releases_the_rollout_envs_first(tmp_path, pretrained, monkeypatch) -> None:
    run = _run(_cfg(f"init={pretrained}", *FINETUNE, "train.env_steps=1920", "eval.episodes=8", "eval.k=[2]"),
               tmp_path / "final")
    run.fit()
    events: list[str] = []
    monkeypatch.setattr(run.agent.env, "close", lambda: events.append("rollout envs closed"))
    real_make = run.evaluator._envs
    monkeypatch.setattr(run.evaluator, "_envs", lambda *a, **k: (events.append("evaluation envs"), real_make(*a, **k))[1])
    rows = run.final_evaluation()
    run.close()
    assert events[:2] == ["rollout envs closed", "evaluation envs"] and rows[0]["episodes"] == 8
    assert (tmp_path / "final" / "eval.json").is_file()


def test_action_drift_is_zero_until_the_actor_trains_then_grows(pretrained) -> None:
    """train/action_drift: the deployed policy's distance from the pretrained one on the visited states."""
    agent = _agent(f"init={pretrained}", *FINETUNE, "train.critic_warmup_iterations=1", "train.num_envs=32",
                   "train.rollout_steps=5", "train.minibatch_size=80", "train.env_steps=960")
    drift = [agent.train_iteration(i)["train/action_drift"] for i in range(3)]
    assert drift[0] == 0.0  # the critic warm-up leaves the policy as pretrained
    assert 0 < drift[1] < drift[2]


def test_advantage_sign_flips_between_epochs(pretrained) -> None:
    """Standardised per minibatch, an advantage's sign depends on its minibatch: none flips when the
    minibatch is the whole rollout, some do with small minibatches; one epoch logs nothing."""
    common = [f"init={pretrained}", *FINETUNE, "train.critic_warmup_iterations=0", "train.num_envs=32",
              "train.rollout_steps=5"]
    whole = _agent(*common, "train.minibatch_size=160", "train.update_epochs=3")
    assert whole.update(whole.collect())["train/advantage_sign_flips"] == 0.0
    small = _agent(*common, "train.minibatch_size=8", "train.update_epochs=3")
    assert 0 < small.update(small.collect())["train/advantage_sign_flips"] < 0.5
    single = _agent(*common, "train.minibatch_size=8", "train.update_epochs=1")
    assert "train/advantage_sign_flips" not in single.update(single.collect())


def test_init_from_a_run_folder_records_its_checkpoint_so_distill_finds_the_demonstrations(tmp_path,
                                                                                           pretrained) -> None:
    """``init=RUN`` is resolved to the checkpoint the run stands for, and the fine-tuning's checkpoints record
    that one: the chain back to the behaviour cloning's demonstrations (what distill and --grid read) holds."""
    from flowrl.checkpoint import recorded_dataset, resolve_checkpoint, save_checkpoint

    run = Path(pretrained).parent.parent
    agent = _agent(*FINETUNE, f"init={run}", "train.num_envs=16", "train.minibatch_size=60")
    assert agent.init_info["path"] == str(resolve_checkpoint(run))
    finetuned = save_checkpoint(tmp_path / "ft", agent.policy, {"task": agent.task, **agent.checkpoint_info()})
    assert recorded_dataset(finetuned) == recorded_dataset(pretrained) is not None
