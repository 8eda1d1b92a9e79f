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
    cfg = load_stage_config("pretrain", None, ["task=Hopper", f"data.path={dataset}", *TINY])
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

    cfg = load_stage_config("pretrain", None, ["task=Hopper", f"data.path={hopper_dataset}", *TINY, "train.steps=9"])
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "flowrl", "pretrain", "--out", str(out), "--quiet", "--no-eval", "task=Hopper",
           f"data.path={hopper_dataset}", *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 ranks" in done.stderr
    assert (out / "checkpoints" / "6" / "model.safetensors").is_file()
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
