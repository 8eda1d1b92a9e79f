"""Scripted experts on robosuite's tasks: success on our batched cpu task (shipped scene, batched OSC, no robosuite
at run time) beside success in robosuite itself, over the same number of seeded episodes each.

    python benchmarks/manipulation_parity.py [--tasks Lift PickPlaceCan NutAssemblySquare TwoArmTransport] [--episodes 200]
        [--num-envs 50] [--robosuite-envs 2] [--backends cpu robosuite]
    python benchmarks/manipulation_parity.py --report --tasks TwoArmTransport   # the recorded outcomes again

Target (exit code 1 when missed): the two success rates within 3 points over the same number of episodes.
The episodes are not the same ones (each side draws its own placements from robosuite's distributions; Lift's
batched cube keeps its nominal size), except TwoArmTransport's, whose batched reset draws robosuite's sequence: the
same seeds give the same hammers and initial states, so its report pairs the outcomes and groups them by the
hammer head each episode had (on both sides). Writes
benchmarks/results/manipulation/manipulation_parity.json (tasks run separately accumulate in it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from common import report_checks, results_dir, run_main, with_provenance
from flowrl.envs import make, resolve_task

TOLERANCE = 0.03
PAIRED = ("TwoArmTransport",)
"""Tasks whose batched reset draws robosuite's own sequence, so that episode i starts from the same state on
both sides and the outcomes pair up."""


def success_rate(task: str, backend: str, episodes: int, num_envs: int, seed: int) -> tuple[float, float, list[bool]]:
    """(success rate, wall seconds, each episode's success in seed order): batches of ``num_envs`` seeded
    episodes, each run until every env has succeeded or the horizon."""
    env = make(f"robosuite/{task}", num_envs, backend=backend, seed=seed)
    expert = resolve_task(f"robosuite/{task}").expert(num_envs)
    wins, done, start, outcomes = 0, 0, time.time(), []
    try:
        while done < episodes:
            obs = env.reset(seed=seed + done)
            expert.reset()
            success = torch.zeros(num_envs, dtype=torch.bool)
            take = min(num_envs, episodes - done)
            for _ in range(env.max_episode_steps):
                obs, _, _, _, info = env.step(expert(obs))
                success |= info["success"].cpu()
                if success[:take].all():
                    break
            wins += int(success[:take].sum())
            outcomes += success[:take].tolist()
            done += take
            print(f"  {task} [{backend}]: {wins}/{done} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    finally:
        env.close()
    return wins / done, time.time() - start, outcomes


HEAD_BINS = (0.015, 0.016, 0.017, 0.018)
"""Edges of the hammer head half-size bins: robosuite draws it from [0.015, 0.018)."""


def by_head_size(task: str, seed: int, ours: str, ref: str) -> list[dict]:
    """TwoArmTransport's paired outcomes grouped by the hammer head robosuite built for each episode (the batched
    world reset with the episode's seed builds the same): episodes, success on each side, per size bin."""
    info = resolve_task(f"robosuite/{task}")
    heads = [info.robosuite_head_halfsize(seed + i) for i in range(len(ours))]
    print(f"{'':<20} by the episode's hammer head half-size:")
    rows = []
    for lo, hi in zip(HEAD_BINS, HEAD_BINS[1:]):
        idx = [i for i, h in enumerate(heads) if lo <= h < hi]
        if not idx:
            continue
        row = {"head_from": lo, "head_to": hi, "episodes": len(idx),
               "cpu": sum(ours[i] == "1" for i in idx) / len(idx), "robosuite": sum(ref[i] == "1" for i in idx) / len(idx)}
        rows.append(row)
        print(f"{'':<22}[{lo:.3f}, {hi:.3f}): {len(idx):>3} episodes, cpu {100 * row['cpu']:5.1f}%, "
              f"robosuite {100 * row['robosuite']:5.1f}%")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["Lift", "PickPlaceCan", "NutAssemblySquare", "TwoArmTransport"])
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--num-envs", type=int, default=50, help="batched cpu envs (default 50)")
    ap.add_argument("--robosuite-envs", type=int, default=os.cpu_count() or 1, help="robosuite worker processes")
    ap.add_argument("--backends", nargs="+", default=["cpu", "robosuite"], choices=["cpu", "warp", "robosuite"])
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--report", action="store_true",
                    help="run nothing: report the --tasks recorded in the results file (and add their analyses to it)")
    args = ap.parse_args()
    path = results_dir("manipulation") / "manipulation_parity.json"
    merged = json.loads(path.read_text()) if path.is_file() else {"results": {}}
    if args.report:
        rows = {task: merged["results"][task] for task in args.tasks if task in merged["results"]}
    else:
        rows = {}
        for task in args.tasks:
            rows[task] = {}
            for backend in args.backends:
                n = args.robosuite_envs if backend == "robosuite" else args.num_envs
                rate, wall, outcomes = success_rate(task, backend, args.episodes, n, args.seed)
                rows[task][backend] = with_provenance({
                    "success_rate": rate, "episodes": len(outcomes), "wall_s": round(wall, 1), "num_envs": n,
                    "outcomes": "".join("1" if o else "0" for o in outcomes), "seed": args.seed,
                    "cores": os.cpu_count()})
    checks = report(rows)
    for task, by_backend in rows.items():
        merged["results"].setdefault(task, {}).update(by_backend)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return report_checks(checks)


def report(rows: dict[str, dict[str, dict]]) -> list[tuple[str, bool]]:
    """Print each task's success rate per backend (and, where episodes pair up, their paired outcomes and the
    outcomes by hammer size, added to the rows); the parity checks."""
    print("\nscripted experts, seeded episodes")
    checks = []
    for task, by_backend in rows.items():
        line = "   ".join(f"{b}: {100 * r['success_rate']:5.1f}% of {r['episodes']} ({r['wall_s']:.0f} s, seeds "
                          f"{r['seed']}...)" for b, r in by_backend.items())
        print(f"{task:<20} {line}")
        paired = {"robosuite", "cpu"} <= by_backend.keys() and all("outcomes" in r for r in by_backend.values())
        if task in PAIRED and paired:  # the same initial states on both
            ours, ref = by_backend["cpu"]["outcomes"], by_backend["robosuite"]["outcomes"]
            pairs = list(zip(ours, ref))
            print(f"{'':<20} same seeds: both succeed {pairs.count(('1', '1'))}, both fail {pairs.count(('0', '0'))}, "
                  f"only cpu {pairs.count(('1', '0'))}, only robosuite {pairs.count(('0', '1'))}")
            by_backend["cpu"]["by_head_size"] = by_head_size(task, by_backend["cpu"]["seed"], ours, ref)
        if "robosuite" in by_backend and len(by_backend) > 1:
            ref_rate = by_backend["robosuite"]["success_rate"]
            for b, r in by_backend.items():
                if b != "robosuite":
                    gap = abs(r["success_rate"] - ref_rate)
                    checks.append((f"{task}: {b} within {100 * TOLERANCE:.0f} points of robosuite "
                                   f"({100 * gap:.1f})", gap <= TOLERANCE + 1e-12))
    return checks


if __name__ == "__main__":
    sys.exit(run_main(main))
