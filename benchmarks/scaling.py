"""Data-parallel scaling of ReinFlow on Hopper: env steps/s and seconds per iteration on 1..N GPUs.

For each GPU count G: weak scaling (``--envs-per-gpu`` envs on every GPU, so G times the batch) and strong
scaling (``--total-envs`` split over the G GPUs), each a short ``flowrl finetune
configs/hopper/finetune_reflow.yaml`` under ``torchrun --nproc-per-node G`` from a behaviour-cloned policy
(``--init``; made with configs/hopper/pretrain_reflow.yaml when not given). Iteration times come from the
run's own training state (the first iteration, which compiles and captures CUDA graphs, is left out), the
rollout's share of them from its TensorBoard log (``time/rollout_s``; the update is the rest).

    python benchmarks/scaling.py --gpus 1 2 [--envs-per-gpu 2048] [--total-envs 4096] [--rollout-steps 10]
        [--iterations 6] [--init CHECKPOINT] [--backend warp] [--device cuda] [--reach 3200] [--no-strong]
        [--torchrun-args "..."]

An 80k-env-step iteration is ``--envs-per-gpu 2048 --rollout-steps 10`` (2048 x 10 x 4 actions) on one GPU,
updated in minibatches of ``--minibatch-per-gpu`` decisions per GPU (the preset's 2560: 40 gradient steps).
Several machines: run the same command on each with torchrun's rendezvous options in ``--torchrun-args``
(e.g. "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400"); G is then GPUs per node.
``--reach R`` also runs each GPU count (weak scaling) until an evaluation of the deterministic policy reaches
return R (``train.stop_at_score``) and compares the training time to get there.
Targets (exit code 1 when missed): weak-scaling efficiency >= 90% from 1 to 2 GPUs; with ``--reach``,
2 GPUs reach R in no more training time than 1.
Writes benchmarks/results/scaling/scaling_hopper[_<tag>].json.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import FLOWRL_CLI, REPO, first_reaching, report_checks, run_main, write_result
from flowrl.checkpoint import load_train_state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(args: argparse.Namespace, runs: Path) -> str:
    out = runs / f"scaling-bc-{time.strftime('%H%M%S')}"
    subprocess.run([*FLOWRL_CLI, "pretrain", str(REPO / "configs" / "hopper" / "pretrain_reflow.yaml"),
                    "--out", str(out), "--quiet", "--no-eval", f"device={args.device}", "train.eval_every=0",
                    f"data.path={REPO / 'data' / 'hopper-medium.hdf5'}"], check=True, cwd=runs)
    return str(max((out / "checkpoints").glob("[0-9]*"), key=lambda p: int(p.name)))


def finetune(gpus: int, envs: int, minibatch: int, args: argparse.Namespace, runs: Path, init: str, name: str,
             *overrides: str) -> tuple[dict, float]:
    """A distributed ``flowrl finetune`` of the Hopper preset with ``envs`` envs and PPO minibatches of
    ``minibatch`` decisions in total on ``gpus`` ranks per node; returns its loop state (from the last
    checkpoint) and its wall-clock."""
    out = runs / f"scaling-{name}-g{gpus}-e{envs}-{time.strftime('%H%M%S')}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus),
           *(shlex.split(args.torchrun_args) or ["--master-port", str(_free_port())]),
           "-m", "flowrl", "finetune", str(REPO / "configs" / "hopper" / "finetune_reflow.yaml"), "--init", init,
           "--out", str(out), "--quiet", "--no-eval", f"device={args.device}", f"train.backend={args.backend}",
           f"train.num_envs={envs}", f"train.rollout_steps={args.rollout_steps}", f"train.minibatch_size={minibatch}",
           *overrides]
    started = time.time()
    subprocess.run(cmd, check=True, cwd=runs, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    wall = time.time() - started
    last = max((out / "checkpoints").glob("[0-9]*"), key=lambda p: int(p.name))
    loop = load_train_state(last)["components"]["loop"]
    loop["rollout_seconds"] = _logged(out, "time/rollout_s")
    return loop, wall


def _logged(run: Path, tag: str) -> list[float]:
    """A scalar's values in step order from the run's TensorBoard events (the ranks' mean, as logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)] if tag in acc.Tags()["scalars"] else []


def measure(gpus: int, envs: int, minibatch: int, args: argparse.Namespace, runs: Path, init: str) -> dict:
    """Seconds per iteration of a short run (its first iteration, which compiles, left out)."""
    per_iteration = envs * args.rollout_steps * 4
    loop, wall = finetune(gpus, envs, minibatch, args, runs, init, "iterations",
                          f"train.env_steps={per_iteration * args.iterations}",
                          "train.eval_every=0", f"train.checkpoint_every={args.iterations}", "train.eval_episodes=1")
    seconds, rollout = loop["iteration_seconds"], loop["rollout_seconds"]
    steady = float(np.median(seconds[1:] if len(seconds) > 1 else seconds))
    rollout_s = float(np.median(rollout[1:] if len(rollout) > 1 else rollout)) if rollout else None
    row = {"gpus": gpus, "envs": envs, "minibatch": minibatch, "env_steps_per_iteration": per_iteration,
           "iteration_s": steady, "rollout_s": rollout_s,
           "update_s": steady - rollout_s if rollout_s is not None else None,
           "env_steps_per_s": per_iteration / steady, "iterations": len(seconds), "wall_s": round(wall, 1)}
    print(f"  {row}", file=sys.stderr, flush=True)
    return row


def time_to_return(gpus: int, args: argparse.Namespace, runs: Path, init: str) -> dict:
    """Weak scaling to a return: ``--envs-per-gpu`` envs on each GPU, evaluated every
    ``--eval-every-env-steps``, stopped at the first evaluation reaching ``--reach``. The time is the
    training's own (iterations, evaluations left out), from the run's learning curve."""
    envs = args.envs_per_gpu * gpus
    per_iteration = envs * args.rollout_steps * 4
    every = max(1, round(args.eval_every_env_steps / per_iteration))
    loop, wall = finetune(gpus, envs, args.minibatch_per_gpu * gpus, args, runs, init, "reach",
                          f"train.env_steps={args.reach_env_steps}",
                          f"train.eval_every={every}", f"train.eval_episodes={args.eval_episodes}",
                          f"train.stop_at_score={args.reach}", f"train.checkpoint_every={10 ** 6}")
    hit = first_reaching(loop["eval_history"], args.reach)
    row = {"gpus": gpus, "envs": envs, "eval_every_env_steps": every * per_iteration, "reached": hit is not None,
           "train_s": hit["wall_clock_s"] if hit else None, "env_steps": hit["env_steps"] if hit else None,
           "best_return": max(e["return_mean"] for e in loop["eval_history"]), "wall_s": round(wall, 1)}
    print(f"  {row}", file=sys.stderr, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPUs (ranks) per node to compare")
    ap.add_argument("--envs-per-gpu", type=int, default=2048, help="weak scaling: envs on each GPU")
    ap.add_argument("--total-envs", type=int, default=4096, help="strong scaling: envs over all GPUs")
    ap.add_argument("--rollout-steps", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--minibatch-per-gpu", type=int, default=2560,
                    help="PPO minibatch (decisions) per GPU: weak scaling keeps it per GPU (the global minibatch "
                         "grows with the GPUs, the gradient steps per iteration stay), strong scaling keeps the "
                         "first GPU count's global minibatch (default: the Hopper preset's 2560)")
    ap.add_argument("--no-strong", action="store_true", help="skip the strong-scaling runs")
    ap.add_argument("--reach", type=float, default=0.0,
                    help="also time weak-scaling runs to this evaluation return (Hopper: 3200; 0: skip)")
    ap.add_argument("--reach-env-steps", type=int, default=20_000_000, help="env-step budget of each --reach run")
    ap.add_argument("--eval-every-env-steps", type=int, default=327_680, help="evaluation interval of --reach runs")
    ap.add_argument("--eval-episodes", type=int, default=16, help="episodes per evaluation of --reach runs")
    ap.add_argument("--init", help="behaviour-cloned Hopper checkpoint (default: pretrain one first)")
    ap.add_argument("--backend", default="warp")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--torchrun-args", default="", help="extra torchrun options (several nodes: rendezvous)")
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    init = args.init or pretrain(args, runs)
    weak = [measure(g, args.envs_per_gpu * g, args.minibatch_per_gpu * g, args, runs, init) for g in args.gpus]
    strong_minibatch = args.minibatch_per_gpu * args.gpus[0]
    strong = [] if args.no_strong else [measure(g, args.total_envs, strong_minibatch // g * g, args, runs, init)
                                        for g in args.gpus]
    print(f"\nReinFlow on Hopper ({args.backend}, {args.device}), {args.rollout_steps} decisions x 4 actions per env "
          f"per iteration")
    head = (f"{'scaling':>8} {'GPUs':>5} {'envs':>7} {'s/iteration':>12} {'rollout s':>10} {'update s':>9} "
            f"{'env steps/s':>12} {'efficiency':>11}")
    print(head)
    print("-" * len(head))
    for name, rows in (("weak", weak), ("strong", strong)):
        for r in rows:
            base = rows[0]
            r["efficiency"] = r["env_steps_per_s"] / (base["env_steps_per_s"] * r["gpus"] / base["gpus"])
            split = (f"{r['rollout_s']:>10.3f} {r['update_s']:>9.3f}" if r["rollout_s"] is not None
                     else f"{'-':>10} {'-':>9}")
            print(f"{name:>8} {r['gpus']:>5} {r['envs']:>7} {r['iteration_s']:>12.3f} {split} "
                  f"{r['env_steps_per_s']:>12.0f} {r['efficiency']:>10.0%}")
    reach = [time_to_return(g, args, runs, init) for g in args.gpus] if args.reach else []
    if reach:
        print(f"\nTime to an evaluation return of {args.reach:g} ({args.envs_per_gpu} envs per GPU; training time, "
              f"evaluations left out)")
        print(f"{'GPUs':>5} {'envs':>7} {'env steps':>10} {'train s':>8} {'best return':>12} {'wall s':>7}")
        for r in reach:
            steps = f"{r['env_steps'] / 1e6:.2f}M" if r["reached"] else "not reached"
            train = f"{r['train_s']:.1f}" if r["reached"] else "-"
            print(f"{r['gpus']:>5} {r['envs']:>7} {steps:>10} {train:>8} {r['best_return']:>12.1f} {r['wall_s']:>7.1f}")
    checks = [(f"weak-scaling efficiency >= 90% on {r['gpus']} GPUs ({r['efficiency']:.0%})", r["efficiency"] >= 0.9)
              for r in weak if r["gpus"] == 2 * weak[0]["gpus"]]
    for r in reach[1:]:
        base = reach[0]
        checks.append((f"{r['gpus']} GPUs reach {args.reach:g} in no more training time than {base['gpus']} "
                       f"({r['train_s']} s vs {base['train_s']} s)",
                       r["reached"] and base["reached"] and r["train_s"] <= base["train_s"]))
    write_result("scaling_hopper", {"backend": args.backend, "device": args.device, "init": init,
                                    "rollout_steps": args.rollout_steps, "weak": weak, "strong": strong, "reach": reach,
                                    "checks": [{"check": t, "pass": ok} for t, ok in checks]}, args.tag, "scaling")
    return report_checks(checks, require_some=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
