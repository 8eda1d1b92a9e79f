"""Bad input at the command line: one line naming the problem, exit code 2, nothing damaged.

The CLI runs in-process (``main`` with its output captured, argparse's exits caught), as fast as a
function call; one test runs ``python -m flowrl`` for real to cover the entry point."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from flowrl.checkpoint import save_checkpoint
from flowrl.cli import main
from flowrl.config import PolicyConfig
from flowrl.datasets import Episodes, write_dataset
from flowrl.policy import FlowPolicy

TINY = ["policy.hidden_dim=16", "policy.depth=1", "policy.time_embed_dim=8", "train.batch_size=16",
        "train.eval_every=0", "train.checkpoint_every=2", "train.warmup_steps=1", "device=cpu"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``flowrl ARGS`` in this process: its exit code, stdout and stderr; an exception escaping ``main``
    (a traceback in the shell) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["flowrl", *args], code, out.getvalue(), err.getvalue())


def test_the_entry_point_reports_errors_in_one_line(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "flowrl", "eval", str(tmp_path / "nowhere")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    one_line_error(proc, "checkpoint not found")


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("flowrl: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture()
def preset(tmp_path, hopper_dataset) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(f"task: Hopper\ndata:\n  path: {hopper_dataset}\n")
    return path


@pytest.mark.parametrize("override,fragments", [
    ("train.stepz=5", ("train.stepz", "not in 'BCConfig'")),
    ("train.steps=lots", ("train.steps", "could not be converted to Integer")),
    ("train.lr=-1", ("train.lr", "must be > 0")),
    ("policy.head=diffusion", ("policy.head", "reflow, shortcut, meanflow", "diffusion")),
    ("policy.act_steps=9", ("policy.act_steps", "<= horizon")),
    ("task=Hoper", ("task", "unknown task 'Hoper'")),
    ("eval.k=[0]", ("eval.k",)),
    ("noequals", ("override 'noequals' is not key=value",)),
])
def test_bad_config_values(preset, tmp_path, override, fragments) -> None:
    one_line_error(run_cli("pretrain", str(preset), override, "--out", str(tmp_path / "run")), *fragments)
    assert not (tmp_path / "run").exists()  # rejected before any work or any write


def test_bad_preset_files(tmp_path) -> None:
    one_line_error(run_cli("pretrain", str(tmp_path / "missing.yaml")), "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    one_line_error(run_cli("pretrain", str(bad)), "bad.yaml: not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("task: Hopper\ndata:\n  path: x.hdf5\n  colour: red\n")
    one_line_error(run_cli("pretrain", str(unknown)), "data.colour")


def test_dataset_problems(tmp_path, hopper_episodes) -> None:
    def preset_for(path: Path, task: str = "Hopper") -> str:
        p = tmp_path / f"{path.stem}.yaml"
        p.write_text(f"task: {task}\ndata:\n  path: {path}\n")
        return str(p)

    one_line_error(run_cli("pretrain", preset_for(tmp_path / "absent.hdf5")), "dataset not found", "absent.hdf5")
    corrupt = tmp_path / "corrupt.hdf5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 50)
    one_line_error(run_cli("pretrain", preset_for(corrupt)), "corrupt.hdf5", "not a readable HDF5 file")
    good = tmp_path / "hopper.hdf5"
    write_dataset(good, Episodes.from_list(hopper_episodes))
    one_line_error(run_cli("pretrain", preset_for(good, "Walker2d")), "observations have 11 dims", "Walker2d has 17")
    eps = [dict(e) for e in hopper_episodes]
    eps[2] = {**eps[2], "actions": eps[2]["actions"].copy()}
    eps[2]["actions"][4, 1] = np.inf
    nan = tmp_path / "nan.hdf5"
    write_dataset(nan, Episodes.from_list(eps))
    one_line_error(run_cli("pretrain", preset_for(nan)), "nan.hdf5", "'actions' holds NaN or inf")
    one_line_error(run_cli("data", "info", str(corrupt)), "not a readable HDF5 file")


def test_checkpoint_problems(tmp_path) -> None:
    one_line_error(run_cli("eval", str(tmp_path / "nowhere")), "checkpoint not found")
    ck = tmp_path / "ck"
    save_checkpoint(ck, FlowPolicy(PolicyConfig(hidden_dim=8, depth=1), 11, 3), {"task": "Hopper"})
    (ck / "model.safetensors").unlink()
    one_line_error(run_cli("eval", str(ck)), "missing model.safetensors")
    save_checkpoint(ck, FlowPolicy(PolicyConfig(hidden_dim=8, depth=1), 11, 3), {"task": "Hoppr"})
    one_line_error(run_cli("eval", str(ck), "--episodes", "1", "--k", "1"), "unknown task 'Hoppr'")
    one_line_error(run_cli("eval", str(ck), "--max-envs", "-1"), "--max-envs must be >= 1")


def test_existing_run_is_not_overwritten_and_resume_checks_config(tmp_path, preset) -> None:
    out = tmp_path / "run"
    assert main(["pretrain", str(preset), *TINY, "--steps", "4", "--out", str(out), "--no-eval", "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoints" / "4").iterdir()}
    one_line_error(run_cli("pretrain", str(preset), *TINY, "--steps", "4", "--out", str(out)),
                   "already holds checkpoints", "--resume")
    one_line_error(run_cli("pretrain", str(preset), *TINY, "train.lr=0.5", "--steps", "6", "--out", str(out),
                           "--resume"), "train.lr", "differs")
    assert {p.name: p.read_bytes() for p in (out / "checkpoints" / "4").iterdir()} == before
    assert main(["pretrain", str(preset), *TINY, "--steps", "6", "--out", str(out), "--resume", "--no-eval",
                 "--quiet"]) == 0
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]


def test_unknown_expert_task_and_collect_source(tmp_path) -> None:
    one_line_error(run_cli("expert", "Cartpole"), "unknown task 'Cartpole'")
    one_line_error(run_cli("expert", "Humanoid-Newton"), "Humanoid-Newton needs --backend cpu or warp")
    one_line_error(run_cli("expert", "Hopper", "--num-envs", "0"), "--num-envs and --snapshot-every must be >= 1")
    repo = Path(__file__).resolve().parents[1]
    one_line_error(run_cli("collect", str(repo / "data" / "experts" / "humanoid"), "--level", "expert",
                           "--out", str(tmp_path / "x.hdf5")), "missing model.zip")
    one_line_error(run_cli("collect", str(tmp_path), "--out", str(tmp_path / "x.hdf5")), "neither an expert folder")
    assert not (tmp_path / "x.hdf5").exists()


def test_help_explains_every_command() -> None:
    out = run_cli("--help").stdout
    for cmd in ("pretrain", "eval", "data", "expert", "collect", "config"):
        assert cmd in out
    assert "--resume" in run_cli("pretrain", "--help").stdout
    describe = run_cli("config", "describe").stdout
    assert "train.ema_decay" in describe and "exponential moving average" in describe


def test_one_meaning_per_budget_flag() -> None:
    """--steps is a gradient-step budget, --env-steps an env-step one; --steps of ReinFlow is the old name."""
    from flowrl.cli import _apply_budget
    from flowrl.config import RenamedWarning, load_stage_config
    from flowrl.errors import FlowrlError

    reinflow = load_stage_config("finetune", None, ["init=x"])
    _apply_budget(reinflow, None, 1234)
    assert reinflow.train.env_steps == 1234
    with pytest.warns(RenamedWarning, match=r"finetune \(algo reinflow\): --steps is now --env-steps") as caught:
        _apply_budget(reinflow, 999, None)
    assert reinflow.train.env_steps == 999 and len(caught) == 1
    mle = load_stage_config("finetune", None, ["init=x", "algo=mle"])
    _apply_budget(mle, 77, None)
    assert mle.train.steps == 77
    with pytest.raises(FlowrlError, match="--env-steps: algorithm 'mle' has no train.env_steps budget"):
        _apply_budget(mle, None, 5)
    with pytest.raises(FlowrlError, match="train.steps: must be > 0"):
        _apply_budget(mle, -1, None)


def test_distill_takes_the_grid_options_only_with_grid_and_seeds_training(monkeypatch) -> None:
    """--samples, --resolution and --refine belong to --grid; without it they are a one-line error, and
    --seed seeds the distillation run (seed=N) instead of being dropped."""
    import flowrl.cli as cli

    for option in ("--samples", "--resolution", "--refine"):
        one_line_error(run_cli("distill", "runs/none", option, "8"), option, "only with --grid")
    seen = {}
    monkeypatch.setattr(cli, "_train", lambda stage, args, presets_required=True: seen.update(overrides=args.overrides))
    assert run_cli("distill", "runs/none", "--seed", "3", "train.lr=1e-4").returncode == 0
    assert seen["overrides"] == ["algo=distill", "train.k=1", "seed=3", "train.lr=1e-4"]
    run_cli("distill", "runs/none")
    assert not any(o.startswith("seed=") for o in seen["overrides"])
