"""Tasks and agents, each defined in one file outside flowrl (tests/plugins/), run through the CLI's
collect, pretrain, finetune, eval and export with nothing in flowrl edited."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "plugins"))

import pole_balance  # noqa: E402,F401  (registers PoleBalance, a MuJoCo task; docs/adding-a-task.md)
import toy_agent  # noqa: E402,F401  (registers toy-bc and toy-hold)
import toy_task  # noqa: E402  (registers ToyLine)

from flowrl.cli import main  # noqa: E402
from flowrl.envs import make, resolve_task  # noqa: E402


def test_a_registered_task_and_agents_run_through_the_cli(tmp_path, capsys) -> None:
    data = tmp_path / "toy.hdf5"
    toy_task.write_demonstrations(str(data))
    pre = tmp_path / "pre.yaml"
    pre.write_text(f"algo: toy-bc\ntask: toyline\ndevice: cpu\ndata:\n  path: {data}\npolicy:\n  hidden_dim: 16\n"
                   "  depth: 1\n  time_embed_dim: 8\n  horizon: 2\n  act_steps: 2\ntrain:\n  steps: 40\n"
                   "  eval_every: 20\n  eval_episodes: 4\n  checkpoint_every: 20\neval:\n  episodes: 4\n  steps: [1, 2]\n")
    assert main(["pretrain", str(pre), "--out", str(tmp_path / "bc"), "--quiet"]) == 0
    ft = tmp_path / "ft.yaml"
    ft.write_text("algo: toy-hold\ndevice: cpu\ntrain:\n  iterations: 3\n  eval_every: 1\n  eval_episodes: 4\n"
                  "  checkpoint_every: 1\neval:\n  episodes: 4\n  steps: [2]\n")
    assert main(["finetune", str(ft), "--init", str(tmp_path / "bc"), "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    assert main(["eval", str(tmp_path / "ft"), "--episodes", "4", "--k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("return mean") == 3  # pretrain, finetune and eval tables
    config = json.loads((tmp_path / "ft" / "checkpoints" / "3" / "config.json").read_text())
    assert config["algorithm"] == "toy-hold" and config["task"] == "ToyLine"
    assert config["observation_layout"] == [["x", 1]]
    records = json.loads((tmp_path / "ft" / "eval.json").read_text())["evaluations"]
    assert [r["stage"] for r in records] == ["finetune", "eval"]  # evaluations accumulate
    assert main(["config", "describe", "finetune", "--algo", "toy-hold"]) == 0
    assert "train.iterations" in capsys.readouterr().out


def test_registry_facts_reach_make_and_errors() -> None:
    assert resolve_task("TOYLINE").name == "ToyLine"
    env = make("ToyLine", 3, seed=1)
    assert env.reset().shape == (3, 1)
    with pytest.raises(Exception, match="already registered"):
        from flowrl.envs import Task, register

        register(Task(name="Other", obs_layout=(("x", 1),), act_dim=1, max_episode_steps=5, backends=("torch",),
                      aliases=("toyline",)))


def test_a_mujoco_task_in_one_file_collects_trains_evaluates_and_exports(tmp_path, capsys) -> None:
    """tests/plugins/pole_balance.py, the file docs/adding-a-task.md walks through: its scripted expert's
    demonstrations, a tiny behaviour cloning run on the cpu backend, its evaluation and an ONNX export."""
    data, run, onnx = tmp_path / "balance.hdf5", tmp_path / "bc", tmp_path / "balance.onnx"
    assert main(["collect", "scripted", "--task", "polebalance", "--episodes", "4", "--num-envs", "4",
                 "--out", str(data)]) == 0
    capsys.readouterr()
    pre = tmp_path / "pre.yaml"
    pre.write_text(f"task: PoleBalance\ndevice: cpu\ndata:\n  path: {data}\npolicy:\n  hidden_dim: 32\n  depth: 1\n"
                   "  horizon: 2\n  act_steps: 2\ntrain:\n  steps: 60\n  eval_every: 60\n  eval_episodes: 2\n"
                   "  checkpoint_every: 60\neval:\n  episodes: 2\n  k: [2]\n")
    assert main(["pretrain", str(pre), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--episodes", "3", "--k", "2", "--device", "cpu", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["results"][0]
    assert row["episodes"] == 3 and row["length_mean"] > 0
    assert main(["export", str(run), "--format", "onnx", "--out", str(onnx)]) == 0
    meta = json.loads(onnx.with_suffix(".onnx.json").read_text())
    assert meta["task"] == "PoleBalance" and onnx.stat().st_size > 0
    env = make("PoleBalance", 2, backend="cpu", seed=0)
    assert env.reset().shape == (2, 4) and float(env.single_action_space.high[0]) == 3.0
    assert resolve_task("polebalance").obs_dim == 4  # from the layout
