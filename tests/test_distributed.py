"""Data-parallel training over torch.distributed (gloo, 2 CPU processes): the averaged update equals the
one-process update on the same total batch, only rank 0 writes, a run saved by 2 ranks resumes on 1, and a
failing rank ends the run on all."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from flowrl import distributed
from flowrl.agents.bc import BehaviorCloning
from flowrl.checkpoint import load_policy
from flowrl.config import PolicyConfig, load_stage_config
from flowrl.errors import FlowrlError
from flowrl.policy import FlowPolicy
from flowrl.training import Trainer

TINY = ["policy.hidden_dim=32", "policy.depth=1", "policy.time_embed_dim=8", "train.batch_size=32",
        "train.steps=6", "train.checkpoint_every=3", "train.eval_every=0", "train.eval_episodes=1",
        "train.log_every=1", "train.warmup_steps=2", "device=cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), FLOWRL_DIST_TIMEOUT_MINUTES="1")
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")


def _batch() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(8, 1, 5, generator=gen)
    x1, x0 = torch.randn(8, 2, 3, generator=gen), torch.randn(8, 2, 3, generator=gen)
    return obs, x1, x0, torch.rand(8, generator=gen)


def _policy() -> FlowPolicy:
    torch.manual_seed(0)
    return FlowPolicy(PolicyConfig(hidden_dim=16, depth=1, time_embed_dim=4, horizon=2), 5, 3)


def _update(policy: FlowPolicy, rows: slice) -> None:
    """One AdamW step on the flow-matching loss of ``rows`` of a fixed batch, gradients averaged over ranks."""
    obs, x1, x0, t = (x[rows] for x in _batch())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * x1
    loss = torch.nn.functional.mse_loss(policy.velocity(t, x_t, policy.encode(obs)), x1 - x0)
    loss.backward()
    distributed.current().average_gradients(policy.parameters())
    opt.step()


def _update_worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    policy = _policy()
    _update(policy, slice(4 * rank, 4 * rank + 4))
    torch.save([p.detach() for p in policy.parameters()], Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


def test_two_rank_update_equals_one_rank_update_on_the_same_batch(tmp_path) -> None:
    mp.spawn(_update_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _policy()
    _update(single, slice(0, 8))
    for rank in (0, 1):
        params = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(params, single.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def _bc_worker(rank: int, world: int, port: int, dataset: str, out: str) -> None:
    _join(rank, world, port)
    cfg = load_stage_config("pretrain", None, ["task=Hopper", f"data.path={dataset}", *TINY, "train.eval_every=6"])
    trainer = Trainer(BehaviorCloning(cfg), Path(out) / "run", progress=False)
    trainer.fit()
    trainer.close()
    torch.save([p.detach() for p in trainer.agent.model.parameters()], Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


def test_bc_on_two_ranks_writes_from_rank_zero_and_resumes_on_one(tmp_path, hopper_dataset) -> None:
    mp.spawn(_bc_worker, args=(2, _free_port(), str(hopper_dataset), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for a, b in zip(*ranks):
        assert torch.equal(a, b)  # the ranks' parameters never diverge
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "6", "best"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one TensorBoard writer: rank 0's
    saved, _ = load_policy(run / "checkpoints" / "6")

    cfg = load_stage_config("pretrain", None, ["task=Hopper", f"data.path={hopper_dataset}", *TINY, "train.eval_every=6",
                                               "train.steps=9"])
    resumed = Trainer(BehaviorCloning(cfg), run, resume=True, progress=False)
    assert resumed.step == 6
    for a, b in zip(resumed.agent.ema.parameters(), saved.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.agent.model.parameters(), ranks[0]):
        assert torch.equal(a, b)
    resumed.fit()
    resumed.close()
    assert resumed.step == 9


def _failing_worker(rank: int, world: int, port: int) -> None:
    _join(rank, world, port)
    if rank == 1:
        raise FlowrlError("rank 1 failed on purpose")
    distributed.current().any(False)  # rank 0 waits for rank 1 in a collective
    distributed.shutdown()


def test_a_failing_rank_ends_the_run_on_all() -> None:
    with pytest.raises(Exception, match="rank 1 failed on purpose"):
        mp.spawn(_failing_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_batch_must_split_evenly_over_ranks(tmp_path, hopper_dataset, monkeypatch) -> None:
    monkeypatch.setattr(distributed, "_current", distributed.Dist(rank=0, world_size=3))
    cfg = load_stage_config("pretrain", None, ["task=Hopper", f"data.path={hopper_dataset}", *TINY])
    with pytest.raises(FlowrlError, match="batch_size 32 is not divisible by the 3 ranks"):
        BehaviorCloning(cfg)


@pytest.mark.slow
def test_pretrain_cli_under_torchrun(tmp_path, hopper_dataset) -> None:
    """`flowrl pretrain` unchanged under torchrun (2 CPU processes, gloo)."""
    out = tmp_path / "run"
    (tmp_path / "bc.yaml").write_text(f"task: Hopper\ndata:\n  path: {hopper_dataset}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "flowrl", "pretrain", str(tmp_path / "bc.yaml"), "--out", str(out), "--quiet",
           "--no-eval", *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 ranks" in done.stderr
    assert (out / "checkpoints" / "6" / "model.safetensors").is_file()
    assert len(list(out.glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["reinflow", "dsrl"])
def test_finetune_cli_under_torchrun(tmp_path, point_reach_policy, algo) -> None:
    """`flowrl finetune` (ReinFlow, DSRL) unchanged under torchrun, then resumed in one process."""
    out = tmp_path / "rf"
    (tmp_path / "rf.yaml").write_text(f"algo: {algo}\n")
    overrides = RF if algo == "reinflow" else [o for o in RF if not o.startswith("train.w2_coef")]
    args = ["finetune", str(tmp_path / "rf.yaml"), "--init", point_reach_policy, "--out", str(out), "--quiet",
            "--no-eval", *overrides,
            "train.env_steps=64", "train.checkpoint_every=1", "train.eval_every=0", "train.eval_episodes=2"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_free_port()), "-m", "flowrl", *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "checkpoints" / "64" / "model.safetensors").is_file()
    resumed = subprocess.run([sys.executable, "-m", "flowrl", *args[:-4], "train.env_steps=96", "--resume"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "start new episodes" in resumed.stderr
    assert (out / "checkpoints" / "96").is_dir()


RF = ["device=cpu", "train.num_envs=8", "train.rollout_steps=2", "train.minibatch_size=16", "train.update_epochs=2",
      "train.critic_warmup_iterations=0", "train.clip_coef=0.05", "train.ent_coef=0.01", "train.w2_coef=0.5",
      "train.actor_lr=1e-3", "train.critic_lr=1e-3"]


@pytest.fixture(scope="module")
def point_reach_policy(tmp_path_factory) -> str:
    from flowrl.agents.scripted import write_demonstrations

    root = tmp_path_factory.mktemp("pointreach")
    write_demonstrations(str(root / "demos.hdf5"), episodes=8, seed=0)
    cfg = load_stage_config("pretrain", None, [
        "task=PointReach", f"data.path={root / 'demos.hdf5'}", "device=cpu", "policy.hidden_dim=16", "policy.depth=1",
        "policy.horizon=2", "policy.act_steps=2", "policy.k=2", "policy.time_embed_dim=8", "train.steps=5",
        "train.batch_size=16", "train.eval_every=0", "train.checkpoint_every=5", "train.eval_episodes=1"])
    Trainer(BehaviorCloning(cfg), root / "bc", progress=False).fit()
    return str(root / "bc" / "checkpoints" / "5")


def _rf_batch(agent) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    p = agent.policy
    n = 16
    return {"obs": torch.randn(n, p.cfg.obs_history, p.obs_dim, generator=gen),
            "sample": torch.randn(n, agent.K + 1, *p.chunk_shape, generator=gen),
            "advantages": torch.randn(n, generator=gen), "returns": torch.randn(n, generator=gen),
            "values": torch.randn(n, generator=gen)}


def _rf_params(agent) -> list[torch.Tensor]:
    return [q.detach().clone() for m in (agent.policy, agent.noise, agent.critic) for q in m.parameters()]


def _rf_worker(rank: int, world: int, port: int, init: str, out: str) -> None:
    from flowrl.agents.reinflow import ReinFlow

    _join(rank, world, port)
    agent = ReinFlow(load_stage_config("finetune", None, [f"init={init}", *RF]))
    batch = {k: v[8 * rank:8 * rank + 8] for k, v in _rf_batch(agent).items()}
    logs = agent.update(batch)
    torch.save({"params": _rf_params(agent), "kl": logs["train/approx_kl"]}, Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


def test_two_rank_reinflow_update_equals_one_rank_update(tmp_path, point_reach_policy) -> None:
    """PPO over the noisy chain on 2 ranks, each with half of a batch (and of each minibatch): advantages
    standardised over both halves, gradients averaged, the same parameters as one process on the whole batch."""
    from flowrl.agents.reinflow import ReinFlow

    mp.spawn(_rf_worker, args=(2, _free_port(), point_reach_policy, str(tmp_path)), nprocs=2, join=True)
    single = ReinFlow(load_stage_config("finetune", None, [f"init={point_reach_policy}", *RF]))
    before = _rf_params(single)
    single.update(_rf_batch(single))
    after = _rf_params(single)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    # Adam's first steps move a weight by up to lr (1e-3) whatever the size of its gradient, so a weight whose
    # gradient is near Adam's eps moves by an amount that float rounding of the averaged gradient changes
    # (seen: one weight in 65536 off by 5e-6 on one CPU); 1e-5 is 1% of a step, and a wrong reduction moves
    # many weights by a whole step.
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(saved["params"], after):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            assert (a - b).abs().gt(1e-6).float().mean() < 1e-3  # all but a rare near-eps weight agree to 1e-6
