"""Stable-Baselines3 PPO and SAC from scratch on the locomotion tasks, through our adapters on the
batched backends: the baselines beside ReinFlow in the results table.

For each task, algorithm and seed: train on ``flowrl.envs.make(task, N, backend=...)`` seen as an SB3
``VecEnv`` (``flowrl.envs.adapters.sb3_vec_env``, under ``VecMonitor`` and ``VecNormalize``), then
evaluate the deterministic policy on the cpu backend (env i seeded 100000 + i, as ``flowrl eval``).
PPO runs at ReinFlow's env-step budget of the task; SAC, whose cost is its gradient updates (one per
env step at the default update-to-data ratio 1), at ``--sac-steps`` (default 1M). Prints a table
with ReinFlow's fine-tuned return at the same budget where benchmarks/results/locomotion/reinflow_<task>*.json
has it, and writes benchmarks/results/baselines/sb3_<task>[_<tag>].json (per seed: return, env steps,
wall-clock, backend, and the command). Progress goes to stdout every minute. ``--max-minutes`` caps one
run's training wall-clock (for a machine lent for a fixed time): a run it stops is evaluated as it stands,
and its row records the env steps it reached and ``"stopped_by_time_limit": true``.

    python benchmarks/sb3_baselines.py --tasks hopper walker2d ant humanoid --algos ppo sac --seeds 0 1 2
        [--backend auto] [--device auto] [--ppo-steps N] [--sac-steps N] [--ppo-num-envs N]
        [--ppo-n-steps N] [--sac-num-envs N] [--sac-utd R] [--episodes N] [--threads N] [--max-minutes M]
        [--tag NAME]
    python benchmarks/sb3_baselines.py --report benchmarks/results/baselines/sb3_*.json

``humanoid`` is Humanoid-Newton (what ReinFlow's Humanoid row ran on MuJoCo Warp). On a GPU, PPO as in
the results (SAC keeps the cpu backend: its cost is the networks, not the physics):

    python benchmarks/sb3_baselines.py --tasks ant humanoid --algos ppo --seeds 0 1 2 \\
        --backend warp --device cuda --ppo-num-envs 1024 --ppo-n-steps 32

Many runs fit on one GPU machine at once, one process each with ``--threads 1``; under CUDA MPS
(``nvidia-cuda-mps-control -d``) their small kernels share the GPU instead of taking turns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import results_dir, run_main, write_result
from flowrl.agents.expert import SnapshotPolicy
from flowrl.config import EVAL_SEED, resolve_device
from flowrl.envs import canonical_task, make, resolve_backend
from flowrl.errors import FlowrlError
from flowrl.evaluation import Evaluator

TASKS = {"hopper": "Hopper", "walker2d": "Walker2d", "ant": "Ant", "humanoid": "Humanoid-Newton"}
REINFLOW_STEPS = {"hopper": 30_000_000, "walker2d": 10_000_000, "ant": 10_000_000, "humanoid": 6_060_000}
"""ReinFlow's env-step budget per task in the locomotion study (Ant: its preset's budget)."""
STUDY = "baselines"
REINFLOW_STUDY = "locomotion"


def train_env(task: str, backend: str, device: str, num_envs: int, seed: int, threads: int):
    """Our batched env as SB3's VecEnv, with episode statistics and observation/reward normalisation.
    The cpu backend keeps its observations on the CPU whatever device the networks use."""
    from stable_baselines3.common.vec_env import VecMonitor, VecNormalize

    from flowrl.envs.adapters import sb3_vec_env

    env_device = "cpu" if backend == "cpu" else device
    env = make(task, num_envs, backend=backend, device=env_device, seed=seed, threads=threads)
    return VecNormalize(VecMonitor(sb3_vec_env(env)), gamma=0.99)


def progress_callback(label: str, total_steps: int, max_seconds: float, every_s: float = 60.0):
    """An SB3 callback that prints progress every ``every_s`` seconds and stops training after
    ``max_seconds`` (0: no limit); ``stopped`` on it says whether the limit ended the run."""
    from stable_baselines3.common.callbacks import BaseCallback

    class Progress(BaseCallback):
        def _on_training_start(self) -> None:
            self.start = self.last = time.time()
            self.stopped = False

        def _on_step(self) -> bool:
            now = time.time()
            if now - self.last >= every_s:
                self.last = now
                steps = self.model.num_timesteps
                print(f"{label}: {steps:,}/{total_steps:,} env steps, {steps / (now - self.start):,.0f} steps/s, "
                      f"{now - self.start:.0f} s", flush=True)
            if max_seconds and now - self.start >= max_seconds:
                self.stopped = True
                return False
            return True

    return Progress()


def evaluate(task: str, act, episodes: int) -> tuple[float, float]:
    """Mean and std of the return of ``episodes`` deterministic episodes, all at once on the cpu backend
    (``flowrl eval``'s seeds: env i seeded 100000 + i)."""
    evaluator = Evaluator(task, EVAL_SEED, backend="cpu", max_envs=episodes)
    try:
        result = evaluator.run(SnapshotPolicy(act), episodes)
    finally:
        evaluator.close()
    return result["return_mean"], result["return_std"]


def run_one(key: str, algo: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one algorithm on one task for one seed; its row."""
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.logger import Logger

    task = TASKS[key]
    device = str(resolve_device(args.device))
    backend = resolve_backend(task, args.backend, device)
    if algo == "ppo":
        steps, n = args.ppo_steps or REINFLOW_STEPS[key], args.ppo_num_envs
    else:
        steps, n = args.sac_steps, args.sac_num_envs
    venv = train_env(task, backend, device, n, seed, args.threads)
    if algo == "ppo":
        model = PPO("MlpPolicy", venv, n_steps=args.ppo_n_steps, batch_size=min(4096, n * args.ppo_n_steps),
                    n_epochs=10, learning_rate=3e-4, seed=seed, device=device, verbose=0)
    else:
        model = SAC("MlpPolicy", venv, learning_starts=min(10_000, steps // 10), batch_size=256,
                    train_freq=1, gradient_steps=max(1, round(args.sac_utd * n)), seed=seed, device=device,
                    verbose=0)
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes an empty log folder in /tmp
    progress = progress_callback(f"{task} {algo} seed {seed}", steps, args.max_minutes * 60)
    start = time.time()
    model.learn(total_timesteps=steps, callback=progress)
    wall = time.time() - start
    venv.training = False
    ret, std = evaluate(task, lambda o: model.predict(venv.normalize_obs(o), deterministic=True)[0], args.episodes)
    venv.close()
    row = {"seed": seed, "return": round(ret, 1), "return_std": round(std, 1), "env_steps": int(model.num_timesteps),
           "target_env_steps": steps, "wall_clock_s": round(wall, 1), "backend": backend, "device": device,
           "num_envs": n, "machine": machine(device)}
    if algo == "ppo":
        row["n_steps"] = args.ppo_n_steps
    else:
        row["utd"] = args.sac_utd
    if progress.stopped:
        row["stopped_by_time_limit"] = True
    print(f"{task} {algo} seed {seed}: return {ret:.1f} +- {std:.1f} after {model.num_timesteps} env steps, "
          f"{wall:.0f} s ({backend}, {n} envs)", flush=True)
    return row


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()} CPU cores"


def read_record(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FlowrlError(f"{path}: cannot read it as a results file ({e})") from None


def reinflow_return(key: str, env_steps: int) -> str:
    """ReinFlow's fine-tuned return, mean over the seeds of its result files that ran ``env_steps``
    (within 5%), when there are any."""
    finals = []
    for path in sorted(results_dir(REINFLOW_STUDY).glob(f"reinflow_{key}*.json")):
        rec = read_record(path)
        finals += [s["finetuned"] for s in rec.get("seeds", [])
                   if s.get("finetuned") is not None and abs((s.get("env_steps") or 0) / env_steps - 1) < 0.05]
    return f"{np.mean(finals):.0f} ({len(finals)} runs)" if finals else "-"


def setting(row: dict) -> tuple:
    """What makes rows comparable: the env-step budget asked for (rows a time limit stopped keep theirs),
    the batch shape and the backend."""
    budget = row.get("target_env_steps") or int(float(f"{row['env_steps']:.2g}"))  # rows from before the field
    shape = f"{row['num_envs']}x{row['n_steps']}" if "n_steps" in row else f"{row['num_envs']} envs"
    return budget, shape, row["backend"]


SUMMARY_HEADER = (f"{'task':<9} {'algo':<4} {'return (mean +- std)':<20} {'env steps':>10} {'envs':<9} {'backend':<7} "
                  f"{'seeds':>5}  {'ReinFlow':<14} {'wall-clock':<11} machine")


def summary_lines(key: str, rows_by_algo: dict[str, list[dict]]) -> list[str]:
    """One line per algorithm and setting (``SUMMARY_HEADER``'s columns): return over seeds, env steps,
    wall-clock (its range over seeds) and where it ran, and ReinFlow's fine-tuned return at the same
    env steps."""
    lines = []
    for algo, rows in sorted(rows_by_algo.items()):
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            groups.setdefault(setting(row), []).append(row)
        for (budget, shape, backend), group in sorted(groups.items(), key=lambda g: g[0][0]):
            r = np.array([row["return"] for row in group])
            steps = int(np.mean([row["env_steps"] for row in group]))
            walls = [row["wall_clock_s"] for row in group]
            spread = max(walls) > 1.05 * min(walls)
            wall = f"{min(walls):.0f}-{max(walls):.0f}s" if spread else f"{np.mean(walls):.0f}s"
            where = ", ".join(sorted({row.get("machine", "") for row in group}))
            capped = " (time limit)" if any(row.get("stopped_by_time_limit") for row in group) else ""
            lines.append(f"{key:<9} {algo:<4} {f'{r.mean():.0f} +- {r.std():.0f}':<20} {steps:>10} {shape:<9} "
                         f"{backend:<7} {len(group):>5}  {reinflow_return(key, budget):<14} {wall:<11} {where}{capped}")
    return lines


def report(records: dict[str, dict]) -> int:
    print("\n" + SUMMARY_HEADER)
    for key, rec in records.items():
        for line in summary_lines(key, rec["rows"]):
            print(line)
    return 0


def rows_in_results(key: str) -> dict[str, list[dict]]:
    """Every SB3 row of a task in the study's results folder (``baselines/sb3_<task>*.json``), per algorithm."""
    merged = merge([str(p) for p in sorted(results_dir(STUDY).glob(f"sb3_{key}*.json"))])
    return merged[key]["rows"] if key in merged else {}


def legacy_ppo_row(rec: dict) -> dict:
    """A ReinFlow record's ``"ppo"`` (written by ``reinflow_locomotion.py --ppo-only``, since replaced by
    ``--baselines ppo --baselines-only``) as one of this script's rows: SB3 PPO from scratch, cpu backend,
    64 envs x 64 steps, seed 0."""
    ppo = rec["ppo"]
    return {"seed": 0, "return": round(ppo["return"], 1), "env_steps": ppo["env_steps"],
            "target_env_steps": ppo["env_steps"], "wall_clock_s": ppo["wall_clock_s"], "backend": "cpu",
            "device": "cpu", "num_envs": 64, "n_steps": 64,
            "machine": ppo.get("machine", "").removesuffix(" (dev machine)")}


def merge(paths: list[str]) -> dict[str, dict]:
    """Records of separate runs (tags) merged per task: rows concatenated per algorithm, each row
    carrying its record's machine. ReinFlow records with a PPO row (``reinflow_<task>_*.json``) add it."""
    merged: dict[str, dict] = {}
    for path in paths:
        rec = read_record(path)
        if "rows" not in rec and "ppo" in rec:
            row = legacy_ppo_row(rec)
            rec = {"task": rec["task"], "machine": row["machine"], "rows": {"ppo": [row]}}
        if "rows" not in rec or "task" not in rec:
            raise FlowrlError(f"{path}: not a baselines record (it has no 'task' and 'rows', nor a ReinFlow "
                              "record's 'ppo')")
        into = merged.setdefault(rec["task"], {**rec, "rows": {}})
        n_steps = re.search(r"--ppo-n-steps (\d+)", rec.get("command", ""))
        for algo, rows in rec["rows"].items():
            if algo == "ppo":  # rows from before "n_steps" was recorded: the command's, else its default then
                rows = [{"n_steps": int(n_steps.group(1)) if n_steps else 64, **row} for row in rows]
            into["rows"].setdefault(algo, []).extend({"machine": rec.get("machine", ""), **row} for row in rows)
    return merged


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--algos", nargs="+", default=["ppo", "sac"], choices=["ppo", "sac"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--backend", default="auto", help="cpu, warp or auto (warp on CUDA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ppo-steps", type=int, default=0, help="default: ReinFlow's budget of the task")
    ap.add_argument("--sac-steps", type=int, default=1_000_000)
    ap.add_argument("--ppo-num-envs", type=int, default=64)
    ap.add_argument("--ppo-n-steps", type=int, default=64, help="PPO's rollout length per env per update")
    ap.add_argument("--sac-num-envs", type=int, default=8)
    ap.add_argument("--sac-utd", type=float, default=1.0, help="gradient updates per env step")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="threads of the cpu backend's training envs (0: all cores)")
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="stop one run's training after this many minutes and evaluate it (0: no limit)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--report", nargs="+", metavar="JSON")
    return ap


def settings(**overrides) -> argparse.Namespace:
    """This script's options at their defaults, with ``overrides`` (for ``run_one`` called from another
    benchmark)."""
    args = parser().parse_args([])
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise FlowrlError(f"sb3_baselines has no option {sorted(unknown)}")
    return validated(argparse.Namespace(**{**vars(args), **overrides}))


def validated(args: argparse.Namespace) -> argparse.Namespace:
    if min(args.ppo_num_envs, args.ppo_n_steps, args.sac_num_envs, args.episodes) < 1 or args.sac_utd <= 0:
        raise FlowrlError("--ppo-num-envs, --ppo-n-steps, --sac-num-envs, --episodes and --sac-utd must be positive")
    if args.threads < 0 or args.max_minutes < 0 or args.ppo_steps < 0:
        raise FlowrlError("--threads, --max-minutes and --ppo-steps must be >= 0")
    return args


def main() -> int:
    args = parser().parse_args()
    if args.report:
        return report(merge(args.report))
    validated(args)
    device = str(resolve_device(args.device))
    records: dict[str, dict] = {}
    for key in args.tasks:
        rec = {"task": key, "flowrl_task": canonical_task(TASKS[key]), "machine": machine(device),
               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rows": {a: [] for a in args.algos}}
        records[key] = rec
        for algo in args.algos:
            for seed in args.seeds:
                rec["rows"][algo].append(run_one(key, algo, seed, args))
                write_result(f"sb3_{key}", rec, args.tag, STUDY)
    return report(records)


if __name__ == "__main__":
    sys.exit(run_main(main))
