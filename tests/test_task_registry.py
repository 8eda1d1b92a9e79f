"""The task registry and the task abstraction's per-substep control hook."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowrl.envs import BACKENDS, MujocoTask, all_tasks, make, resolve_backend, resolve_task
from flowrl.envs.backends.cpu import MujocoBatchEnv
from flowrl.errors import FlowrlError


def test_every_task_states_its_facts_once() -> None:
    for name, info in all_tasks().items():
        assert info.backends and set(info.backends) <= set(BACKENDS), name
        assert info.obs_dim > 0 and info.act_dim > 0 and info.max_episode_steps > 0, name
        mujoco_backends = {"cpu", "warp", "gymnasium"} & set(info.backends)
        assert set(info.envs) == set(info.backends) - mujoco_backends, name  # a builder for each other backend
        assert isinstance(info, MujocoTask) == bool({"cpu", "warp"} & mujoco_backends), name
        if info.obs_layout:
            assert sum(size for _, size in info.obs_layout) == info.obs_dim, name
    assert resolve_task("hopper-v5").name == "Hopper" and resolve_task("lift").name == "robosuite/Lift"


def test_unknown_tasks_and_backends_are_one_line_errors() -> None:
    with pytest.raises(FlowrlError, match="unknown task 'Hoper'; known tasks: .*Hopper"):
        make("Hoper")
    with pytest.raises(FlowrlError, match="Humanoid-Newton does not run on the gymnasium backend"):
        make("Humanoid-Newton", backend="gymnasium")
    assert resolve_backend("Hopper", "auto", "cpu") == "cpu"
    assert resolve_backend("Humanoid", "auto", "cpu") == "cpu"


class HalfGain:
    """A per-substep controller: the actuators get half the action, recomputed before every substep."""

    def __init__(self) -> None:
        self.calls = 0

    def set_goal(self, state, action):
        self.goal = action

    def ctrl(self, state):
        self.calls += 1
        return 0.5 * self.goal


def test_a_per_substep_controller_runs_inside_the_substep_loop() -> None:
    info = resolve_task("Hopper")
    base = info
    controller = HalfGain()
    controlled = dataclasses.replace(base)
    object.__setattr__(controlled, "controller", lambda *a: controller)
    with_hook = MujocoBatchEnv(controlled, 2, seed=0)
    plain = MujocoBatchEnv(base, 2, seed=0)
    with_hook.reset(), plain.reset()
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        a = (torch.rand((2, 3), generator=gen, dtype=torch.float64) * 2 - 1) * 0.8
        o1 = with_hook.step(a)[0]
        o2 = plain.step(0.5 * a)[0]
        assert torch.equal(o1, o2)
    assert controller.calls == 5 * base.frame_skip


@pytest.mark.parametrize("doc", ["README.md", "docs/environments.md"])
def test_the_task_tables_match_the_registry(doc: str) -> None:
    """The README's and docs/environments.md's tables of tasks (rows ``| `Name` (aliases) | obs | act |
    horizon | backends | ...``) state each built-in task's dims, horizon and backends as registered."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    rows = {line.split("|")[1].split("`")[1]: [c.strip() for c in line.split("|")[2:6]] for line in lines}
    spellings = {line.split("|")[1].split("`")[1]: line.split("|")[1].split("`")[3::2] for line in lines}
    for name, info in all_tasks().items():
        builder = next(iter(info.envs.values()), type(info))
        if not builder.__module__.startswith("flowrl."):
            continue  # registered by a test, not shipped
        assert name in rows, f"{doc}'s task table lacks {name}"
        for alias in spellings[name]:  # `Hopper` (`Hopper-v5`): the other spellings it gives name this task
            assert resolve_task(alias).name == name, (doc, name, alias)
        obs, act, horizon, backends = rows[name]
        assert (int(obs), int(act), int(horizon)) == (info.obs_dim, info.act_dim, info.max_episode_steps), (doc, name)
        assert [b.strip() for b in backends.split(",")] == list(info.backends), (doc, name)


def test_a_reset_distribution_written_once_draws_per_env_or_batched() -> None:
    """The same reset code on both kinds of draws: NumpyDraws takes each env's draws from its own generator in
    the order asked (a rejection loop redraws one env at a time, as a sequential loop would), TorchDraws all at
    once (candidates in a batch, the first accepted kept); Hopper's distribution on the cpu backend's autoresets."""
    import numpy as np

    from flowrl.envs.tasks.base import NumpyDraws, TorchDraws

    def propose(d):
        return (d.uniform(0.0, 1.0),)

    def accept(p, rows):
        return p[0] > 0.7

    (x,) = NumpyDraws([np.random.default_rng(i) for i in range(5)]).first_accepted(propose, accept, "x")
    for i in range(5):
        rng = np.random.default_rng(i)
        while (expected := rng.uniform(0.0, 1.0)) <= 0.7:
            pass
        assert float(x[i]) == expected
    gen = torch.Generator().manual_seed(0)
    (y,) = TorchDraws(gen, 100, torch.device("cpu"), torch.float64).first_accepted(propose, accept, "y")
    assert y.shape == (100,) and bool((y > 0.7).all())
    with pytest.raises(FlowrlError, match=r"^cannot place the cube: none of 64 draws was accepted$"):
        TorchDraws(gen, 3, torch.device("cpu"), torch.float64).first_accepted(propose, lambda p, rows: p[0] > 2.0,
                                                                              "the cube")

    env = make("Hopper", 4, backend="cpu", seed=0)
    env.batched_autoreset = True
    env.reset()

    def autoreset_states() -> tuple[torch.Tensor, torch.Tensor]:
        env._reset_gen.manual_seed(3)
        env._reset_envs(torch.ones(4, dtype=torch.bool))
        return env.get_state()

    qpos, qvel = autoreset_states()
    assert torch.equal(autoreset_states()[0], qpos)  # seeded
    s = resolve_task("Hopper").reset_noise_scale
    assert float((qpos - torch.as_tensor(env.qpos0)).abs().max()) <= s and float(qvel.abs().max()) <= s
    assert float(qvel.abs().max()) > 0


def test_a_tasks_config_defaults_sit_under_every_preset_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    import flowrl.envs
    from flowrl.config import load_stage_config

    def end_on_success(preset: str | None, *overrides: str) -> bool:
        return load_stage_config("pretrain", preset, list(overrides), for_run=False).eval.end_on_success

    assert end_on_success("configs/can/pretrain_reflow.yaml")  # the preset no longer says it: the task does
    assert end_on_success(None, "task=robosuite/Lift", "data.path=d.hdf5")
    assert not end_on_success("configs/can/pretrain_reflow.yaml", "eval.end_on_success=false")
    assert not end_on_success("configs/hopper/pretrain_reflow.yaml")
    finetune = load_stage_config("finetune", "configs/transport/finetune_reflow.yaml", ["init=x"], for_run=False)
    assert finetune.eval.end_on_success
    hopper = resolve_task("Hopper")
    for defaults, error in (({"train.gamma": 0.9}, None),  # fine-tuning's key: pretraining skips it
                            ({"eval.end_on_sucess": True}, "task Hopper: config_defaults has 'eval.end_on_sucess'")):
        typo = dataclasses.replace(hopper, config_defaults=defaults)
        monkeypatch.setattr(flowrl.envs, "resolve_task", lambda name, task=typo: task)
        if error is None:
            assert load_stage_config("finetune", "configs/hopper/finetune_reflow.yaml", ["init=x"],
                                     for_run=False).train.gamma == 0.9
            assert not end_on_success("configs/hopper/pretrain_reflow.yaml")
        else:
            with pytest.raises(FlowrlError, match=error):
                end_on_success("configs/hopper/pretrain_reflow.yaml")
