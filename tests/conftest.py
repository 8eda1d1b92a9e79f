"""Shared fixtures: small datasets made here from real Hopper simulation."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.datasets import Episodes, write_dataset
from flowrl.envs import make
from flowrl.errors import FlowrlError

REPO = Path(__file__).resolve().parents[1]


def rollout_episodes(task: str, episodes: int, seed: int, max_steps: int = 60) -> list[dict[str, np.ndarray]]:
    """Episodes of a fixed smooth open-loop controller on the real simulator, cut at ``max_steps``."""
    env = make(task, episodes, seed=seed)
    obs = env.reset()
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, size=(episodes, env.act_dim))
    eps = [{k: [] for k in ("observations", "actions", "rewards", "terminated", "truncated")} for _ in range(episodes)]
    active = np.ones(episodes, bool)
    for t in range(max_steps):
        action = torch.as_tensor(0.8 * np.sin(0.3 * t + phase), dtype=torch.float32)
        nxt, rew, term, trunc, info = env.step(action)
        trunc = trunc | (t == max_steps - 1)
        for i in np.flatnonzero(active):
            e = eps[i]
            e["observations"].append(obs[i].numpy())
            e["actions"].append(action[i].numpy())
            e["rewards"].append(float(rew[i]))
            e["terminated"].append(bool(term[i]))
            e["truncated"].append(bool(trunc[i]) and not bool(term[i]))
        active &= ~(term | trunc).numpy()
        obs = nxt
        if not active.any():
            break
    env.close()
    return [{k: np.asarray(v) for k, v in e.items()} for e in eps]


@pytest.fixture(scope="session")
def hopper_episodes() -> list[dict[str, np.ndarray]]:
    return rollout_episodes("Hopper", 6, seed=3)


@pytest.fixture(scope="session")
def hopper_dataset(tmp_path_factory: pytest.TempPathFactory, hopper_episodes) -> Path:
    path = tmp_path_factory.mktemp("data") / "hopper-small.hdf5"
    write_dataset(path, Episodes.from_list(hopper_episodes, {"task": "Hopper"}))
    return path


@pytest.fixture(scope="session")
def shipped_medium() -> Path:
    path = REPO / "data" / "hopper-medium.hdf5"
    assert path.is_file(), "the shipped Hopper medium dataset is missing"
    return path


def assert_full_state_resumes(env, actions: list, saved_after: int, detour=None) -> list:
    """Step ``actions``, saving the full state after the first ``saved_after``; step the rest, optionally
    ``detour`` (an action) to move away, restore, step the rest again: the two continuations must be equal.
    Returns the first continuation's step results."""
    for a in actions[:saved_after]:
        env.step(a)
    saved = env.get_full_state()
    first = [env.step(a) for a in actions[saved_after:]]
    if detour is not None:
        env.step(detour)
    env.set_full_state(saved)
    second = [env.step(a) for a in actions[saved_after:]]
    for one, two in zip(first, second):
        for x, y in zip(one[:4], two[:4]):
            assert torch.equal(x, y)
    return first


def gl_missing() -> str | None:
    """Why offscreen OpenGL does not work here (None when it does): rendering tests skip with it."""
    from flowrl.envs.rendering import gl_context

    try:
        gl_context(8, 8).free()
    except FlowrlError as e:
        return str(e)
    return None


def ctrl_c_after(agent, iteration: int) -> None:
    """Make ``agent`` send this process a real SIGINT (Ctrl-C) once its iteration ``iteration`` has run: the
    training loop stops at the next iteration boundary with a checkpoint and raises Interrupted."""
    original = agent.train_iteration

    def step_then_ctrl_c(i):
        logs = original(i)
        if i == iteration:
            os.kill(os.getpid(), signal.SIGINT)
        return logs

    agent.train_iteration = step_then_ctrl_c


def clone_point_reach(root: Path, steps: int, noise: float = 0.05) -> str:
    """Behaviour-clone PointReach's scripted demonstrator (40% speed, 64 episodes, action noise ``noise``)
    into ``root``: the small policy the fine-tuning tests start from. Returns its last checkpoint."""
    from flowrl.agents.bc import BehaviorCloning
    from flowrl.agents.scripted import write_demonstrations
    from flowrl.config import load_stage_config
    from flowrl.training import Trainer

    write_demonstrations(str(root / "demos.hdf5"), episodes=64, seed=0, noise=noise)
    cfg = load_stage_config("pretrain", None, [
        "task=PointReach", f"data.path={root / 'demos.hdf5'}", "device=cpu", "policy.hidden_dim=64", "policy.depth=2",
        "policy.horizon=2", "policy.act_steps=2", "policy.k=4", "policy.time_embed_dim=16",
        f"train.steps={steps}", "train.batch_size=128", "train.eval_every=0", f"train.checkpoint_every={steps}",
        "train.warmup_steps=20"])
    Trainer(BehaviorCloning(cfg), root / "bc", progress=False).fit()
    return str(root / "bc" / "checkpoints" / str(steps))
