"""Success rates of the scripted robosuite experts over seeded episodes.

    python benchmarks/scripted_experts.py [--tasks Lift PickPlaceCan] [--episodes 100] [--num-envs 20]

Targets (exit code 1 when missed): Lift >= 95%, PickPlaceCan >= 95%, NutAssemblySquare >= 80%, TwoArmTransport >= 90%.
Writes benchmarks/results/manipulation/scripted_experts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from common import report_checks, results_dir, run_main, with_provenance
from flowrl.envs import all_tasks
from manipulation_parity import success_rate as robosuite_success_rate

TARGETS = {"Lift": 0.95, "PickPlaceCan": 0.95, "NutAssemblySquare": 0.80, "TwoArmTransport": 0.90}


def success_rate(task: str, episodes: int, num_envs: int, seed: int) -> tuple[float, float]:
    """(success rate, wall seconds) of ``task``'s scripted expert in robosuite itself."""
    rate, wall, _ = robosuite_success_rate(task, "robosuite", episodes, num_envs, seed)
    return rate, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scripted = [t.env_name for t in all_tasks().values() if t.expert is not None and t.family == "robosuite"]
    ap.add_argument("--tasks", nargs="+", default=scripted)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--num-envs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args()
    rows = {t: success_rate(t, args.episodes, args.num_envs, args.seed) for t in args.tasks}
    print(f"\nscripted experts, {args.episodes} seeded episodes each (seeds {args.seed}...), {os.cpu_count()} cores")
    checks = []
    for task, (rate, wall) in rows.items():
        print(f"{task:<20} {100 * rate:6.1f}%   {wall:6.0f} s")
        if task in TARGETS:
            checks.append((f"{task} >= {100 * TARGETS[task]:.0f}% ({100 * rate:.1f}%)", rate >= TARGETS[task]))
    path = results_dir("manipulation") / "scripted_experts.json"  # tasks run separately accumulate in one file
    merged = json.loads(path.read_text()) if path.is_file() else {"results": {}}
    merged["results"].update({t: with_provenance({"success_rate": r, "wall_s": round(w, 1), "episodes": args.episodes,
                                                  "seed": args.seed, "cores": os.cpu_count()})
                              for t, (r, w) in rows.items()})
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return report_checks(checks)


if __name__ == "__main__":
    sys.exit(run_main(main))
