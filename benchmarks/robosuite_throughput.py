"""robosuite env steps per second against the number of worker processes, stepped one action per round
trip (``step``) and a whole action chunk per round trip (``step_chunk``), measured interleaved.

    python benchmarks/robosuite_throughput.py [--task NutAssemblySquare] [--num-envs 1 4 16]
                                              [--chunk 4] [--chunks 25] [--repeats 3] [--tag NAME]

Zero actions, no policy: the simulator, robosuite's controllers and the inter-process round trips.
Target (exit code 1 when missed): at the largest number of envs, chunks are not slower than single
steps (>= 0.95x). Writes benchmarks/results/throughput/robosuite_throughput[_<tag>].json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

from common import report_checks, run_main, write_result
from flowrl.envs import make
from flowrl.envs.base import BatchedEnv


def rates(task: str, n: int, chunk: int, chunks: int, repeats: int) -> dict[str, float]:
    env = make(f"robosuite/{task}", n, seed=0)
    try:
        env.reset()
        actions = torch.zeros(n, chunk, env.act_dim)
        modes = {"step": lambda: list(BatchedEnv.step_chunk(env, actions)), "chunk": lambda: env.step_chunk(actions)}
        modes["chunk"]()  # warm-up
        seen: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(repeats):
            for mode, run in modes.items():
                start = time.perf_counter()
                for _ in range(chunks):
                    run()
                seen[mode].append(n * chunk * chunks / (time.perf_counter() - start))
        return {m: float(np.median(v)) for m, v in seen.items()}
    finally:
        env.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="NutAssemblySquare")
    ap.add_argument("--num-envs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tag", default="", help="suffix of the results file (e.g. the machine)")
    args = ap.parse_args()
    rows = []
    print(f"robosuite/{args.task}, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
          f"chunks of {args.chunk}, env steps/s (median of {args.repeats})")
    print(f"{'envs':>5} {'step':>9} {'chunk':>9} {'per env':>8} {'chunk/step':>10}")
    for n in args.num_envs:
        r = rates(args.task, n, args.chunk, args.chunks, args.repeats)
        rows.append({"num_envs": n, **r})
        print(f"{n:>5} {r['step']:>9.0f} {r['chunk']:>9.0f} {r['chunk'] / n:>8.0f} {r['chunk'] / r['step']:>10.2f}",
              flush=True)
    write_result("robosuite_throughput", {"task": args.task, "cores": os.cpu_count(), "chunk": args.chunk,
                                          "rows": rows}, args.tag, "throughput")
    last = rows[-1]
    return report_checks([(f"chunks not slower than single steps at {last['num_envs']} envs "
                           f"({last['chunk'] / last['step']:.2f}x)", last["chunk"] >= 0.95 * last["step"])])


if __name__ == "__main__":
    sys.exit(run_main(main))
