"""Few-step policies: distillation from the prior reduces the one-step error, the optimal grid's dynamic
programme is exact, grids travel from the checkpoint into evaluation and exports, a meanflow head
exports at K = 1, and the whole path runs from the command line."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from test_cli import one_line_error, run_cli

import flowrl.deploy
from flowrl.agents.bc import BehaviorCloning
from flowrl.agents.distill import Distillation, optimal_grid, shortcut_trained_step, write_time_grids
from flowrl.agents.scripted import write_demonstrations
from flowrl.checkpoint import load_policy, read_config, save_checkpoint
from flowrl.config import PolicyConfig, load_stage_config
from flowrl.datasets import read_dataset
from flowrl.deploy.export import export
from flowrl.deploy.runtime import make_backend
from flowrl.errors import FlowrlError
from flowrl.policy import FlowPolicy
from flowrl.training import Trainer

TINY = ["task=PointReach", "device=cpu", "policy.hidden_dim=32", "policy.depth=1", "policy.horizon=2",
        "policy.act_steps=2", "policy.k=4", "policy.time_embed_dim=16", "train.batch_size=128",
        "train.eval_every=0", "train.warmup_steps=20"]


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pointreach") / "demos.hdf5"
    write_demonstrations(str(path), episodes=32, seed=0)
    return str(path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, demos) -> str:
    """A behaviour-cloned rectified-flow PointReach policy at K = 4."""
    root = tmp_path_factory.mktemp("teacher")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_stage_config("pretrain", None, [*TINY, f"data.path={demos}", "train.steps=300",
                                                   "train.checkpoint_every=300"])
        Trainer(BehaviorCloning(cfg), root / "bc", progress=False).fit()
    finally:
        torch.set_num_threads(threads)
    return str(root / "bc" / "checkpoints" / "300")


def test_optimal_grid_is_the_least_cost_path_of_k_steps() -> None:
    rng = np.random.default_rng(0)
    r, k = 7, 3
    cost = [[float(rng.uniform(0, 1)) if j > i else float("inf") for j in range(r + 1)] for i in range(r + 1)]
    best = min(itertools.combinations(range(1, r), k - 1),
               key=lambda inner: sum(cost[a][b] for a, b in zip((0, *inner), (*inner, r))))
    assert optimal_grid(cost, k) == [j / r for j in (0, *best, r)]
    # a cost that grows faster than linearly in the step's length: equal steps are optimal
    convex = [[float((j - i) ** 2) for j in range(9)] for i in range(9)]
    assert optimal_grid(convex, 4) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_shortcut_grid_takes_only_the_steps_behaviour_cloning_trains(tmp_path, demos) -> None:
    """Shortcut heads are trained on power-of-two steps starting on multiples of their size; the grid search
    offers them no other step, and a K with no such grid on the candidates is a one-line error."""
    assert [j for j in range(1, 9) if shortcut_trained_step(0, j, 8, 128)] == [1, 2, 4, 8]
    assert shortcut_trained_step(2, 4, 8, 128) and not shortcut_trained_step(2, 6, 8, 128)  # 1/2 from 1/4
    assert not shortcut_trained_step(0, 1, 8, 4)  # finer than the finest trained step
    episodes = read_dataset(demos)
    torch.manual_seed(0)
    cfg = PolicyConfig(head="shortcut", hidden_dim=32, depth=1, horizon=2, act_steps=2, k=4, time_embed_dim=16)
    ckpt = save_checkpoint(tmp_path / "shortcut", FlowPolicy(cfg, episodes.obs_dim, episodes.act_dim),
                           {"task": "PointReach"})
    rows = write_time_grids(ckpt, [3, 5], tmp_path / "grid", data=demos, samples=32, resolution=8, refine=2)
    for row in rows:
        steps = [(round(a * 8), round(b * 8)) for a, b in zip(row["times"], row["times"][1:])]
        assert len(steps) == row["k"] and all(shortcut_trained_step(i, j, 8, 128) for i, j in steps), row
    with pytest.raises(FlowrlError, match="--k 3: no 3 steps"):
        write_time_grids(ckpt, [3], tmp_path / "none", data=demos, samples=32, resolution=6, refine=2)


def test_distillation_reduces_the_one_step_error(teacher) -> None:
    agent = Distillation(load_stage_config("finetune", None, [
        f"init={teacher}", "algo=distill", "device=cpu", "train.k=1", "train.batch_size=128", "train.lr=1e-3"]))
    gen = torch.Generator().manual_seed(5)
    obs = agent.data.batch(torch.randint(0, len(agent.data), (512,), generator=gen))[0]
    x0 = torch.randn((512, *agent.student.chunk_shape), generator=gen)

    def one_step_error() -> float:
        with torch.no_grad():
            return float(agent.distillation_loss(obs, x0))

    before = one_step_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(150):
            agent.train_iteration(i)
    finally:
        torch.set_num_threads(threads)
    after = one_step_error()
    assert agent.teacher_k == 4 and agent.student.cfg.k == 1
    assert after < 0.3 * before, (before, after)
    info = agent.checkpoint_info()
    assert info["distill"] == {"k": 1, "teacher_k": 4, "observations": "demonstrations", "noise": "prior"}
    assert info["dataset"]["path"].endswith("demos.hdf5")  # recorded by the teacher's checkpoint


def test_a_grid_in_the_checkpoint_drives_eval_and_export(tmp_path, teacher) -> None:
    out = tmp_path / "with-grid"
    proc = run_cli("distill", teacher, "--grid", "--k", "2", "3", "--out", str(out), "--samples", "256",
                   "--resolution", "16", "--refine", "2")
    assert proc.returncode == 0, proc.stderr
    record = read_config(out)["time_grid"]
    assert [row["k"] for row in record["grids"]] == [2, 3]
    for row in record["grids"]:
        assert row["kept"] == (row["error"] < row["uniform_error"])
    kept = [row for row in record["grids"] if row["kept"]]
    assert kept, record  # a flow integrated on 2 or 3 steps has a better grid than the uniform one
    policy, _ = load_policy(out)
    uniform, _ = load_policy(teacher)
    k = kept[0]["k"]
    assert policy.time_grid(k) == kept[0]["times"] and uniform.time_grid(k) == [i / k for i in range(k + 1)]
    obs = policy.obs_mean + torch.randn(8, 1, policy.obs_dim, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(8, *policy.chunk_shape, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(policy.predict(obs, k, noise), uniform.predict(obs, k, noise))
    meta = export(out, tmp_path / "grid.onnx", "onnx", k=k)  # checked against eager predict on the grid
    assert meta["time_grid"] == kept[0]["times"] and meta["step_size"] is None
    got = make_backend(tmp_path / "grid.onnx", "onnx")(obs.numpy(), noise.numpy())
    np.testing.assert_allclose(got, policy.predict(obs, k, noise).numpy(), atol=1e-4)
    assert flowrl.deploy.load(tmp_path / "grid.onnx").k == k


def test_one_step_meanflow_exports_and_matches_eager(tmp_path) -> None:
    from flowrl.checkpoint import save_checkpoint
    from flowrl.config import PolicyConfig
    from flowrl.policy import FlowPolicy

    torch.manual_seed(0)
    cfg = PolicyConfig(head="meanflow", horizon=4, act_steps=2, k=1, hidden_dim=64, depth=2, obs_history=2)
    ckpt = save_checkpoint(tmp_path / "mf", FlowPolicy(cfg, 5, 3), {"task": "PointReach"})
    policy, _ = load_policy(ckpt)
    for fmt, suffix in (("onnx", "onnx"), ("torch-export", "pt2")):
        meta = export(ckpt, tmp_path / f"mf.{suffix}", fmt, k=1)
        assert (meta["k"], meta["head"], meta["step_size"], meta["time_grid"]) == (1, "meanflow", 1.0, [0.0, 1.0])
        run = make_backend(tmp_path / f"mf.{suffix}", fmt)
        obs = torch.randn(16, 2, 5, generator=torch.Generator().manual_seed(3))
        noise = torch.randn(16, 4, 3, generator=torch.Generator().manual_seed(4))
        np.testing.assert_allclose(run(obs.numpy(), noise.numpy()), policy.predict(obs, 1, noise).numpy(), atol=1e-5)


def test_meanflow_pretrain_eval_export_distill_from_the_command_line(tmp_path, demos) -> None:
    run, preset = tmp_path / "mf", tmp_path / "meanflow.yaml"
    preset.write_text(f"task: PointReach\ndata:\n  path: {demos}\npolicy:\n  head: meanflow\n")
    proc = run_cli("pretrain", str(preset), *TINY[1:], "train.steps=40",
                   "train.checkpoint_every=40", "eval.episodes=2", "eval.k=[1]", "--out", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert read_config(run / "checkpoints" / "40")["policy"]["head"] == "meanflow"
    proc = run_cli("eval", str(run), "--k", "1", "2", "--episodes", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [row["k"] for row in json.loads(proc.stdout)["results"]] == [1, 2]
    proc = run_cli("export", str(run), "--format", "onnx", "--out", str(tmp_path / "mf.onnx"), "--k", "1")
    assert proc.returncode == 0 and "K=1, meanflow head" in proc.stdout, proc.stderr
    student = tmp_path / "student"
    proc = run_cli("distill", str(run), "--k", "1", "--steps", "10", "--out", str(student), "--quiet",
                   "train.eval_every=0", "train.checkpoint_every=10", "eval.episodes=2", "eval.k=[1]")
    assert proc.returncode == 0, proc.stderr
    config = read_config(student / "checkpoints" / "10")
    assert (config["algorithm"], config["policy"]["k"], config["distill"]["teacher_k"]) == ("distill", 1, 4)
    one_line_error(run_cli("distill", str(run), "--k", "1", "2"), "--k", "one K")
    one_line_error(run_cli("distill", str(run), "--grid", "--k", "2", "--resolution", "1"), "--k 2", "--resolution")
