"""Whether an evaluation gives the same returns wherever it runs.

One checkpoint's deterministic episodes (the periodic evaluations' seeds) on the cpu backend, with the policy
on the CPU and, on a CUDA machine, on the GPU; mujoco.batch on one thread and on every core; then, with
``--beside-warp`` on a CUDA machine, again beside a live MuJoCo Warp env and a ReinFlow agent training on it
(the surroundings of a fine-tuning run's evaluations), and on the warp backend itself.

    python benchmarks/evaluation_check.py CHECKPOINT [--episodes 50] [--k 4] [--beside-warp] [--tag NAME]

Targets (exit code 1 when one is missed): the rows with the policy on the CPU are bit-identical (the cpu
backend is deterministic at any thread count, whatever else runs in the process); every other row's mean is
within 3 standard errors of the first row's (the policy's float rounding on a GPU, or warp's float32
physics, moves single episodes, not the mean). Writes benchmarks/results/evaluation/evaluation_check[_<tag>].json
with every episode's return and length.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from common import REPO, report_checks, run_main, write_result
from flowrl.checkpoint import load_policy, resolve_checkpoint
from flowrl.envs import make, warp_available
from flowrl.evaluation import SELECTION_SEED, Evaluator


def evaluation_row(checkpoint: Path, where: str, backend: str, device: str, threads: int, episodes: int,
                   k: int) -> dict:
    """The checkpoint's episodes on ``backend`` with the policy on ``device`` (cpu backend: ``threads``
    mujoco.batch threads, 0 every core)."""
    policy, config = load_policy(checkpoint, device)
    evaluator = Evaluator(config["task"], seed=SELECTION_SEED, backend=backend, device=device, threads=threads)
    start = time.time()
    try:
        r = evaluator(policy, k, episodes, per_episode=True)
    finally:
        evaluator.close()
    return row(where, backend, device, threads, np.array(r["episode_returns"]), np.array(r["episode_lengths"]),
               time.time() - start)


def row(where: str, backend: str, device: str, threads: int, returns: np.ndarray, lengths: np.ndarray,
        seconds: float) -> dict:
    r = {"where": where, "backend": backend, "policy_device": device, "threads": threads,
         "return_mean": float(returns.mean()), "return_std": float(returns.std()), "return_min": float(returns.min()),
         "return_max": float(returns.max()), "episode_returns": returns.tolist(), "episode_lengths": lengths.tolist(),
         "seconds": round(seconds, 2)}
    print(f"{where:<12}{backend:<6}policy on {device:<5}threads {threads if backend == 'cpu' else '-':>3}: "
          f"{r['return_mean']:9.2f} +- {r['return_std']:7.2f}  [{r['return_min']:.1f}, {r['return_max']:.1f}]  "
          f"lengths {int(lengths.min())}-{int(lengths.max())}  {seconds:.1f} s", flush=True)
    return r


def live_warp_surroundings(checkpoint: Path, config: dict) -> list:
    """A MuJoCo Warp env stepped under its captured graph, then a ReinFlow agent fine-tuning the checkpoint on
    warp for a few iterations (its PPO update captured too): both, for the caller to keep alive."""
    from flowrl.config import load_stage_config
    from flowrl.registry import agent_info

    env = make(config["task"], 256, backend="warp", device="cuda", seed=0)
    env.reset()
    for _ in range(20):
        env.step_chunk(torch.rand((256, 4, env.act_dim), device="cuda") * 2 - 1)
    preset = REPO / "configs" / config["task"].split("-")[0].lower() / "finetune_reflow.yaml"
    cfg = load_stage_config("finetune", preset, [f"init={checkpoint}", "device=cuda", "train.backend=warp"])
    agent = agent_info("finetune", cfg.algo).agent_class()(cfg)
    for i in range(4):
        agent.train_iteration(i)
    torch.cuda.synchronize()
    return [env, agent]


def on_cpu(r: dict) -> bool:
    """A row with the policy on the CPU and the cpu backend: deterministic, so bit-identical to the first."""
    return r["policy_device"] == "cpu" and r["backend"] == "cpu"


def checks(rows: list[dict]) -> list[tuple[str, bool]]:
    first = rows[0]
    out = []
    same = [r for r in rows if on_cpu(r)]
    out.append((f"the {len(same)} rows with the policy on the CPU are bit-identical",
                all(r["episode_returns"] == first["episode_returns"] for r in same)))
    for r in rows:
        if on_cpu(r):
            continue
        n1, n2 = len(first["episode_returns"]), len(r["episode_returns"])
        se = math.sqrt(first["return_std"] ** 2 / n1 + r["return_std"] ** 2 / n2)
        gap = abs(r["return_mean"] - first["return_mean"])
        text = (f"{r['where']}, {r['backend']} backend, policy on {r['policy_device']}, threads {r['threads']}: "
                f"mean {r['return_mean']:.1f} within 3 standard errors ({3 * se:.1f}) of {first['return_mean']:.1f}")
        out.append((text, gap <= 3 * se + 1e-9))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint or run folder")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--k", type=int, default=4, help="Euler steps of the deterministic sampler")
    ap.add_argument("--beside-warp", action="store_true",
                    help="also evaluate beside a live MuJoCo Warp env and ReinFlow agent, and on warp (CUDA only)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()
    checkpoint = resolve_checkpoint(args.checkpoint)
    _, config = load_policy(checkpoint, "cpu")
    cuda = torch.cuda.is_available()
    rows = []
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        for threads in (1, 0):
            rows.append(evaluation_row(checkpoint, "alone", "cpu", device, threads, args.episodes, args.k))
    if args.beside_warp:
        if not (cuda and warp_available()):
            print("--beside-warp: needs a CUDA device and mujoco-warp; skipped")
        else:
            live = live_warp_surroundings(checkpoint, config)
            for device in ("cpu", "cuda"):
                rows.append(evaluation_row(checkpoint, "beside warp", "cpu", device, 0, args.episodes, args.k))
            rows.append(evaluation_row(checkpoint, "alone", "warp", "cuda", 0, args.episodes, args.k))
            del live
    record = {"checkpoint": str(checkpoint), "task": config["task"], "k": args.k, "episodes": args.episodes,
              "seed": SELECTION_SEED, "rows": rows}
    print(f"wrote {write_result('evaluation_check', record, args.tag, 'evaluation')}")
    return report_checks(checks(rows))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
