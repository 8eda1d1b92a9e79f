"""Behaviour cloning: seeded determinism, exact resume, and a small run that must learn."""

from __future__ import annotations


import pytest
import torch
from conftest import ctrl_c_after

from flowrl.agents.bc import BehaviorCloning
from flowrl.checkpoint import load_policy, load_train_state
from flowrl.config import load_stage_config
from flowrl.errors import Interrupted
from flowrl.evaluation import evaluate
from flowrl.training import Trainer

TINY = ["policy.hidden_dim=32", "policy.depth=1", "policy.time_embed_dim=8", "train.batch_size=32",
        "train.steps=20", "train.checkpoint_every=10", "train.eval_every=0", "train.log_every=5",
        "train.warmup_steps=3", "device=cpu"]


def _cfg(dataset, *extra: str):
    return load_stage_config("pretrain", None, ["task=Hopper", f"data.path={dataset}", *TINY, *extra])


def _run(cfg, out, resume: bool = False) -> Trainer:
    return Trainer(BehaviorCloning(cfg), out, resume=resume, progress=False)


def _params(trainer: Trainer) -> list[torch.Tensor]:
    bc = trainer.agent
    return [p.detach().clone() for p in (*bc.model.parameters(), *bc.ema.parameters())]


@pytest.mark.parametrize("head", ["reflow", "shortcut", "meanflow"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, hopper_dataset, head) -> None:
    cfg = _cfg(hopper_dataset, f"policy.head={head}", "policy.max_shortcut_steps=8")
    full = _run(cfg, tmp_path / "full")
    full.fit()

    part = _run(cfg, tmp_path / "part")
    ctrl_c_after(part.agent, 6)  # the 7th step is running: a real SIGINT arrives mid-step
    with pytest.raises(Interrupted, match="interrupted at iteration 7"):
        part.fit()
    assert load_train_state(tmp_path / "part" / "checkpoints" / "7")["components"]["loop"]["iteration"] == 7

    resumed = _run(cfg, tmp_path / "part", resume=True)
    assert resumed.step == 7
    resumed.fit()
    assert resumed.step == full.step == 20
    assert full.state.eval_history == [] and not (tmp_path / "full" / "checkpoints" / "best").exists()  # eval_every=0
    for a, b in zip(_params(full), _params(resumed)):
        assert torch.equal(a, b)
    final_full, _ = load_policy(tmp_path / "full" / "checkpoints" / "20")
    final_resumed, _ = load_policy(tmp_path / "part" / "checkpoints" / "20")
    for a, b in zip(final_full.state_dict().values(), final_resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_seeded_runs_are_identical_and_seeds_differ(tmp_path, hopper_dataset) -> None:
    runs = [_run(_cfg(hopper_dataset, f"seed={s}", "train.steps=8"), tmp_path / f"r{i}") for i, s in enumerate((1, 1, 2))]
    for r in runs:
        r.fit()
    a, b, c = (_params(r) for r in runs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))


def test_evaluation_is_seeded(tmp_path, hopper_dataset) -> None:
    bc = _run(_cfg(hopper_dataset, "train.steps=5"), tmp_path / "r")
    bc.fit()
    first = evaluate(bc.agent.policy, "Hopper", 2, episodes=3, seed=7)
    again = evaluate(bc.agent.policy, "Hopper", 2, episodes=3, seed=7)
    assert first["return_mean"] == again["return_mean"] and first["length_mean"] == again["length_mean"]


def test_bc_on_the_shipped_medium_data_learns(tmp_path, shipped_medium) -> None:
    """800 steps on the shipped demonstrations (data: 1643) must beat an untrained policy (~7) by far.

    Measured on the 2-core dev machine: ~1200 after 25 s."""
    cfg = load_stage_config("pretrain", None, [
        "task=Hopper", f"data.path={shipped_medium}", "policy.hidden_dim=256", "policy.depth=2",
        "train.steps=800", "train.batch_size=128", "train.eval_every=0", "train.checkpoint_every=800",
        "train.warmup_steps=50", "device=cpu"])
    bc = _run(cfg, tmp_path / "learn")
    before = evaluate(bc.agent.policy, "Hopper", 4, episodes=4, seed=3)["return_mean"]
    bc.fit()
    after = evaluate(bc.agent.policy, "Hopper", 4, episodes=4, seed=3)["return_mean"]
    assert after > 600 and after > 10 * before, (before, after)
