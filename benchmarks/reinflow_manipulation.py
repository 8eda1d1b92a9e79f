"""ReinFlow on robosuite's manipulation tasks, from the scripted experts' demonstrations.

For each task and seed: behaviour cloning (configs/<task>/pretrain_reflow.yaml on
data/<task>-scripted.hdf5, made by the commands in data/README.md), then ReinFlow
(configs/<task>/finetune_reflow.yaml). Prints success before and after fine-tuning, env steps and
wall-clock beside ReinFlow's published success rates, and writes
benchmarks/results/reinflow_manip_<task>[_<tag>].json.

    python benchmarks/reinflow_manipulation.py --tasks lift can square --seeds 0 1 2
        [--env-steps N] [--pretrain-steps N] [--episodes 50] [--tag NAME] [--budget-minutes N]
        [key=value overrides]
    python benchmarks/reinflow_manipulation.py --report benchmarks/results/reinflow_manip_*.json

Each env is a robosuite worker process (~0.8 GB, one core's worth of Python): size train.num_envs
and eval.max_envs to the machine. On a time-limited machine pass --budget-minutes N (per seed,
evaluations included): fine-tuning then stops itself in time for its final evaluations
(train.max_minutes=N bounds the fine-tuning alone). Targets (exit code 1 when missed): after
fine-tuning Lift 100%, Can >= 99%, Square >= 85%.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from common import REPO, merge_results, report_checks, run_main, write_result
from reinflow_locomotion import add_seed_options, completed, run_seed

TASKS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
# ReinFlow (pixels, shortcut policy) pretrained -> fine-tuned success; Gaussian PPO from scratch
PUBLISHED = {"can": (0.59, 0.987, 0.905), "square": (0.25, 0.748, 0.187)}
TARGETS = {"lift": 1.0, "can": 0.99, "square": 0.85}


def report(results: dict) -> int:
    first = next(iter(results.values()))
    print(f"\nReinFlow (reflow) on robosuite, {first['device']}, {first['cores']} CPU cores")
    head = (f"{'task':<7} {'seeds':>6} {'pretrained':>11} {'fine-tuned':>15} {'env steps':>10} {'wall s':>7}"
            f" {'published':>15} {'PPO':>6}")
    print(head)
    print("-" * len(head))
    checks = []
    for task, rec in results.items():
        # a run cut short (time limit) reports its last evaluation and does not count for the targets
        seeds = [completed(s) for s in rec["seeds"] if "pretrained_success" in s]
        if not seeds:
            continue
        done = all("finetuned_success" in s and not s.get("final_cut") for s in seeds)
        pre = [s["pretrained_success"] for s in seeds]
        post = [s.get("finetuned_success", float("nan")) for s in seeds]
        steps = [s.get("env_steps", 0) for s in seeds]
        wall = [s.get("wall_clock_s", 0.0) for s in seeds]
        pub = PUBLISHED.get(task)
        pub_text = f"{100 * pub[0]:>5.1f} -> {100 * pub[1]:>5.1f}" if pub else "-"
        ppo = f"{100 * pub[2]:>5.1f}" if pub else "-"
        print(f"  seeds {[s['seed'] for s in seeds]}: "
              + ", ".join(f"{100 * a:.0f}% -> {100 * b:.0f}%" for a, b in zip(pre, post))
              + ("" if done else "  (cut short: last evaluation during fine-tuning)"))
        print(f"{task:<7} {len(seeds):>6} {100 * np.mean(pre):>10.1f}% {100 * np.mean(post):>7.1f}% ± {100 * np.std(post):>4.1f}"
              f" {int(np.mean(steps)):>10} {np.mean(wall):>7.0f} {pub_text:>15} {ppo:>6}")
        if task in TARGETS:
            ok = done and len(seeds) >= 3 and np.mean(post) >= TARGETS[task] - 1e-9
            checks.append((f"{task} fine-tuned success >= {100 * TARGETS[task]:.0f}% over 3 seeds "
                           f"({100 * np.mean(post):.1f}%, {len(seeds)} seed(s){'' if done else ', cut short'})", ok))
    return report_checks(checks, require_some=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--env-steps", type=int, help="override train.env_steps of the presets")
    ap.add_argument("--pretrain-steps", type=int, help="override train.steps of the pretraining presets")
    add_seed_options(ap)
    ap.add_argument("--episodes", type=int, default=50, help="episodes of the evaluations before and after")
    ap.add_argument("--eval-every", type=int, default=5, help="iterations between curve points")
    ap.add_argument("--eval-episodes", type=int, default=25, help="episodes per curve point")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    ap.add_argument("--tag", default="", help="suffix of the results file (parallel processes)")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="only merge these results files and report")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the fine-tuning preset")
    args = ap.parse_intermixed_args()  # key=value overrides may come before or after options
    args.head, args.sim_threads = "reflow", 0

    if args.report:
        return report(merge_results(args.report))
    results: dict = {}
    missing = [t for t in args.tasks if not (REPO / "data" / f"{t}-scripted.hdf5").is_file()]
    if missing:
        print(f"error: no demonstrations for {', '.join(missing)}: make them with the commands in data/README.md",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    for task in args.tasks:
        rec = {"task": task, "robosuite_task": TASKS[task], "device": device, "cores": os.cpu_count(), "seeds": []}
        results[task] = rec
        for seed in args.seeds:
            srec: dict = {"seed": seed}
            rec["seeds"].append(srec)
            save = lambda: write_result(f"reinflow_manip_{task}", rec, args.tag)  # noqa: E731
            run_seed(task, "reflow", seed, args, Path(args.runs), srec, save)
            save()
    return report(results)


if __name__ == "__main__":
    sys.exit(run_main(main))
