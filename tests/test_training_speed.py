"""What the fast training paths keep: the same random draws in the same order, seeded CPU runs identical to
themselves, no host read-back inside a gradient step, and evaluations on the backend that is fastest for a few
envs. The CUDA-graph steps run only where a GPU is: their tests are skipped elsewhere (on a GPU machine,
``python -m pytest tests/test_training_speed.py``), and benchmarks/training_speed.py measures them there."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flowrl.agents.bc import BehaviorCloning
from flowrl.config import load_stage_config
from flowrl.cuda_graph import device_learning_rates, keep_device_flags
from flowrl.evaluation import CPU_EVAL_MAX_ENVS, Evaluator
from flowrl.policy import shortcut_target
from flowrl.training import Trainer


def _bc(dataset: Path, *overrides: str) -> BehaviorCloning:
    cfg = load_stage_config("pretrain", None, [
        "task=Hopper", f"data.path={dataset}", "device=cpu", "policy.hidden_dim=32", "policy.depth=1",
        "train.batch_size=32", "train.steps=20", "train.eval_every=0", "train.warmup_steps=2", *overrides])
    return BehaviorCloning(cfg)


def _old_step_loss(agent: BehaviorCloning, gen: torch.Generator) -> torch.Tensor:
    """The loss of one gradient step written the straightforward way, each draw where it is used: index,
    then (flow matching) noise and time, then (shortcut) level, grid position and noise."""
    policy, n, cfg = agent.model, agent.rank_batch, agent.cfg.train
    idx = torch.randint(0, agent.shard_size, (n,), generator=gen)
    obs, actions = agent.data.batch(idx)
    x1, cond = policy.normalize_action(actions), policy.encode(obs)
    n_sc = max(1, int(round(n * cfg.shortcut_fraction))) if policy.is_shortcut else 0
    n_fm = n - n_sc
    x0 = torch.randn(x1[:n_fm].shape, generator=gen)
    t = torch.rand(n_fm, generator=gen)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * x1[:n_fm]
    d = torch.full((n_fm,), 1.0 / policy.cfg.max_shortcut_steps) if policy.is_shortcut else None
    fm = F.mse_loss(policy.velocity(t, x_t, cond[:n_fm], d), x1[:n_fm] - x0)
    if not policy.is_shortcut:
        return fm
    levels = int(math.log2(policy.cfg.max_shortcut_steps))
    j = torch.randint(0, levels, (n_sc,), generator=gen)
    big = torch.pow(2.0, -j.float())
    t = torch.floor(torch.rand(n_sc, generator=gen) * torch.pow(2.0, j.float())) * big
    x0 = torch.randn(x1[n_fm:].shape, generator=gen)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * x1[n_fm:]
    ema_cond = agent.ema.encode(obs[n_fm:])
    with torch.no_grad():
        target = shortcut_target(lambda tt, xx, dd: agent.ema.velocity(tt, xx, ema_cond, dd), x_t, t, big / 2)
    sc = F.mse_loss(policy.velocity(t, x_t, cond[n_fm:], big), target)
    return (fm * n_fm + sc * n_sc) / n


def test_bc_step_draws_as_the_straightforward_loss_does(hopper_dataset) -> None:
    """The step's draws are made up front (so a CUDA graph can replay the rest) from the same generator in the
    same order as a loss that draws where it uses them: the same loss, bit for bit, for both heads."""
    for head in ("reflow", "shortcut"):
        agent = _bc(hopper_dataset, f"policy.head={head}", "seed=3")
        gen = torch.Generator().manual_seed(0)
        gen.set_state(agent.gen.get_state())
        expected = _old_step_loss(agent, gen)
        logs = agent.train_iteration(0)
        assert torch.equal(logs["train/loss"], expected.detach()), head
        assert torch.equal(agent.gen.get_state(), gen.get_state())  # nothing else was drawn


def test_bc_logs_stay_tensors_and_seeded_cpu_runs_are_identical(hopper_dataset, tmp_path) -> None:
    """No host read-back inside a step: the losses come back as tensors, which the loop writes every
    log_every steps; two runs of one seed end with the same weights and the same logged losses."""
    runs = []
    for name in ("a", "b"):
        trainer = Trainer(_bc(hopper_dataset, "seed=5", "train.log_every=5"), tmp_path / name, progress=False)
        losses = []
        step = trainer.agent.train_iteration

        def logged(i: int, step=step, losses=losses) -> dict:
            logs = step(i)
            assert isinstance(logs["train/loss"], torch.Tensor) and isinstance(logs["train/grad_norm"], torch.Tensor)
            losses.append(logs["train/loss"].clone())
            return logs

        trainer.agent.train_iteration = logged  # type: ignore[method-assign]
        trainer.fit()
        trainer.close()
        runs.append((torch.stack(losses), [p.detach().clone() for p in trainer.agent.policy.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert (tmp_path / "a" / "checkpoints" / "20").is_dir()


def test_evaluation_of_a_few_mujoco_envs_runs_on_cpu_threads_whatever_the_device() -> None:
    for device in ("cpu", "cuda"):  # the rule does not look at the policy's device (nothing is built here)
        assert Evaluator("Hopper", backend="auto", device=device).backend_for(10) == "cpu"
    auto = Evaluator("Hopper", backend="auto", device="cpu")
    assert auto.backend_for(CPU_EVAL_MAX_ENVS + 1) == "auto"  # many envs: make's own choice (warp on a GPU)
    assert auto.backend_for(10, images=True) == "auto"  # pixel policies need a backend that renders
    assert Evaluator("Hopper", backend="warp", device="cpu").backend_for(10) == "warp"  # asked for: kept
    assert Evaluator("robosuite/Lift", backend="auto", device="cpu").backend_for(10) == "auto"


def test_device_learning_rates_follow_the_schedule_in_place_and_save_as_floats() -> None:
    """The rate a captured step reads is one tensor for the whole run: the schedule writes into it; the saved
    state holds a float and a loaded one is a tensor again, with the saved value."""
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = torch.optim.AdamW(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    device_learning_rates(opt)
    rate = opt.param_groups[0]["lr"]
    assert isinstance(rate, torch.Tensor)
    for _ in range(3):
        params[0].sum().backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] is rate and rate.item() == pytest.approx(0.1 * 0.5 ** 3)
    state = opt.state_dict()
    assert state["param_groups"][0]["lr"] == pytest.approx(0.0125) and isinstance(state["param_groups"][0]["lr"], float)
    fresh = torch.optim.AdamW(params, lr=0.3)
    device_learning_rates(fresh)
    fresh.load_state_dict(state)
    assert isinstance(fresh.param_groups[0]["lr"], torch.Tensor)
    assert fresh.param_groups[0]["lr"].item() == pytest.approx(0.0125)
    plain = torch.optim.AdamW(params, lr=0.3)
    plain.load_state_dict(state)
    assert plain.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_a_loaded_optimiser_state_keeps_the_loaders_implementation_flags() -> None:
    """A state saved by a GPU run (fused, capturable) loads into a CPU run's optimiser as that optimiser's own
    implementation, and its step goes on from the saved moments."""
    params = [torch.nn.Parameter(torch.ones(3))]
    saved = torch.optim.AdamW(params, lr=0.1)
    params[0].sum().backward()
    saved.step()
    state = saved.state_dict()
    state["param_groups"][0].update(fused=True, capturable=True)
    loader = torch.optim.AdamW(params, lr=0.1)
    keep_device_flags(loader)
    loader.load_state_dict(state)
    group = loader.param_groups[0]
    assert (group["fused"], group["capturable"]) == (None, False)
    assert torch.equal(loader.state[params[0]]["exp_avg"], saved.state[params[0]]["exp_avg"])
    loader.step()


@pytest.mark.slow  # two compilations, about 40 s on two cores
def test_compiled_loss_follows_the_eager_step(hopper_dataset) -> None:
    """``train.compile`` runs the loss through TorchInductor: from the same seed, the same losses and weights
    as the eager step, to float rounding (fused kernels may sum in another order), for both heads."""
    for head in ("reflow", "shortcut"):
        runs = []
        for compiled in (False, True):
            agent = _bc(hopper_dataset, f"policy.head={head}", "seed=4", f"train.compile={compiled}")
            assert (agent._loss != agent._loss_eager) == compiled
            losses = torch.stack([agent.train_iteration(i)["train/loss"] for i in range(6)])
            runs.append((losses, [p.detach().clone() for p in agent.model.parameters()]))
        torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(runs[0][1], runs[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@needs_cuda
@pytest.mark.parametrize("head", ["reflow", "shortcut"])
def test_bc_graph_replays_the_eager_step(hopper_dataset, head) -> None:
    """The captured step (with and without the compiled loss) and the eager one, from the same seed in float32:
    the same losses and weights, to float rounding (cuBLAS may choose other kernels inside a capture)."""
    runs = []
    for graph, compiled in ((False, False), (True, False), (True, True)):
        agent = _bc(hopper_dataset, f"policy.head={head}", "seed=2", "device=cuda", f"train.cuda_graph={graph}",
                    "train.tf32=false", f"train.compile={compiled}")
        assert (agent.graph is not None) == graph
        losses = torch.stack([agent.train_iteration(i)["train/loss"].clone() for i in range(12)])
        runs.append((losses, [p.detach().clone() for p in agent.model.parameters()]))
    for other in runs[1:]:
        torch.testing.assert_close(runs[0][0], other[0], rtol=1e-4, atol=1e-6)
        for a, b in zip(runs[0][1], other[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_reinflow_graphed_update_keeps_the_first_ratio_and_survives_an_eager_step(tmp_path, hopper_dataset) -> None:
    """With the PPO step captured, the first minibatch's ratio is 1 (old log-probabilities from the same
    weights), and an eager update in between (a rollout that is not whole minibatches) leaves the graph's
    gradients in place for the next replay."""
    from flowrl.agents.reinflow import ReinFlow

    bc = Trainer(_bc(hopper_dataset, "seed=1", "device=cuda"), tmp_path / "bc", progress=False)
    bc.fit()
    init = bc.run.checkpoint_dir(bc.step)
    bc.close()
    cfg = load_stage_config("finetune", None, [f"init={init}", "device=cuda", "train.backend=cpu", "train.num_envs=32",
                                               "train.rollout_steps=8", "train.minibatch_size=64",
                                               "train.critic_warmup_iterations=0", "train.update_epochs=2"])
    agent = ReinFlow(cfg)
    for i in range(3):
        agent.iteration = i
        logs = agent.update(agent.collect())
        assert logs["train/first_ratio_deviation"] < 1e-5
    assert agent._ppo_graph is not None and agent._ppo_graph.graph is not None
    batch = agent.collect()
    uneven = {k: v[:200] for k, v in batch.items()}  # 200 is not a whole number of minibatches of 64: eager
    agent.update(uneven)
    before = [p.detach().clone() for p in agent.policy.parameters()]
    agent.update(agent.collect())  # graphed again
    assert any(not torch.equal(a, p) for a, p in zip(before, agent.policy.parameters()))
    assert all(p.grad is g for p, g in agent._ppo_graph.grads)
    agent.close()
