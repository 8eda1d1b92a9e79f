"""Behaviour cloning and its number of integration steps K, on the shipped (or made) medium demonstrations:
the rectified-flow and the shortcut head, each evaluated at K = 1, 2, 4 and 8.

Targets (exit code 1 when one is missed):
- rectified flow at K=4 reaches >= 85% of the demonstrations' mean return;
- shortcut at K=1 is within 10% of its own K=4 return.

    python benchmarks/bc_locomotion.py --task hopper --seeds 0 1 2 [--steps 10000] [--episodes 20]

Prints a table and writes benchmarks/results/one_step/bc_<task>[_<tag>].json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import REPO, in_repo, report_checks, run_main, write_result
from flowrl.agents.bc import BehaviorCloning
from flowrl.config import load_stage_config
from flowrl.training import Trainer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper", help="folder under configs/ (hopper, walker2d)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, help="override train.steps")
    ap.add_argument("--episodes", type=int, default=20, help="evaluation episodes per K")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench"))
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()

    rows, results = [], {}
    for head in ("reflow", "shortcut"):
        for seed in args.seeds:
            overrides = [f"seed={seed}", f"device={args.device}", f"eval.episodes={args.episodes}",
                         "eval.k=[1,2,4,8]", "train.eval_every=0"]
            if args.steps:
                overrides.append(f"train.steps={args.steps}")
            cfg = load_stage_config("pretrain", REPO / "configs" / args.task / f"pretrain_{head}.yaml", overrides)
            cfg.data.path = str(in_repo(cfg.data.path))
            out = Path(args.out) / f"{args.task}-{head}-s{seed}-{time.strftime('%H%M%S')}"
            start = time.time()
            bc = Trainer(BehaviorCloning(cfg), out, progress=False)
            try:
                bc.fit()
                train_s = time.time() - start
                evals = {r["k"]: r["return_mean"] for r in bc.final_evaluation()}
            finally:
                bc.close()
            results.setdefault(head, []).append({"seed": seed, "returns": evals, "train_s": round(train_s, 1)})
            data_mean = bc.agent.data_info["return_mean"]

    print()
    print(f"{args.task}: demonstrations' mean return {data_mean:.1f}; seeds {args.seeds}")
    print(f"{'head':<9} {'K=1':>8} {'K=2':>8} {'K=4':>8} {'K=8':>8} {'train s':>8}")
    for head, runs in results.items():
        mean = {k: np.mean([r["returns"][k] for r in runs]) for k in (1, 2, 4, 8)}
        rows.append((head, mean))
        print(f"{head:<9} " + " ".join(f"{mean[k]:8.1f}" for k in (1, 2, 4, 8))
              + f" {np.mean([r['train_s'] for r in runs]):8.1f}")
    reflow = dict(rows)["reflow"]
    shortcut = dict(rows)["shortcut"]
    checks = [
        (f"reflow K=4 >= 85% of data ({reflow[4]:.1f} / {data_mean:.1f} = {reflow[4] / data_mean:.1%})",
         reflow[4] >= 0.85 * data_mean),
        (f"shortcut K=1 within 10% of K=4 ({shortcut[1]:.1f} vs {shortcut[4]:.1f}, "
         f"{abs(shortcut[1] - shortcut[4]) / shortcut[4]:.1%})", abs(shortcut[1] - shortcut[4]) <= 0.10 * shortcut[4]),
    ]
    write_result(f"bc_{args.task}", {"task": args.task, "data_return_mean": data_mean, "steps": args.steps,
                                     "episodes": args.episodes, "device": args.device, "results": results,
                                     "checks": [{"check": t, "pass": bool(ok)} for t, ok in checks]},
                 args.tag, "one_step")
    return report_checks(checks)


if __name__ == "__main__":
    sys.exit(run_main(main))
