"""MLE reconstruction fine-tuning (``algo: mle``) against the policy it starts from, at K = 1, 2, 4.

For each task and seed: a behaviour-cloned policy (configs/<task>/pretrain_reflow.yaml on all but the
last ``--held-out`` episodes of its demonstrations, or ``--pretrained`` checkpoints), then FT and ResFT
(configs/<task>/finetune_mle.yaml) at each K on the first ``--max-episodes`` of the same training
episodes. Each policy is scored at its K (the pretrained one at every K) by its return or success and
by its reconstruction error on the held-out episodes (mean squared error, normalised action units, of
decoding each held-out chunk's latent with K Euler steps; latents from inverting the pretrained flow
with 64 steps, so every policy is scored on the same latents). With ``--reinflow-env-steps N`` (Hopper),
each policy also starts a ReinFlow run (configs/hopper/finetune_reflow.yaml at the policy's K) and
the env steps to its first evaluation >= 3200 are recorded (a GPU job).

    python benchmarks/mle_finetune.py [--tasks hopper square] [--seeds 0 1 2] [--ks 1 2 4]
        [--methods ft resft] [--held-out 20] [--max-episodes 300] [--pretrained PATH] [--pretrain-steps N]
        [--steps N] [--episodes N] [--eval-backend cpu] [--reinflow-env-steps N] [--tag NAME]
    python benchmarks/mle_finetune.py --report benchmarks/results/mle/mle_finetune_*.json

``--pretrained`` takes checkpoints made elsewhere ({task} and {seed} filled in); they may have seen the
held-out episodes, which the results file then says. Targets (exit code 1 when missed), per task: at
K = 1 and K = 2, FT or ResFT beats the pretrained policy at the same K by more than the seed spread (the
mean paired difference over seeds exceeds its standard deviation); at K = 4 neither loses more than
the spread. Writes benchmarks/results/mle/mle_finetune_<task>[_<tag>].json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import REPO, first_reaching, in_repo, merge_results, report_checks, run_main, write_result
from flowrl.agents.bc import BehaviorCloning
from flowrl.agents.mle import MLEFineTuning, held_out_reconstruction
from flowrl.checkpoint import load_policy, resolve_checkpoint
from flowrl.config import load_stage_config
from flowrl.datasets import ChunkDataset, read_dataset
from flowrl.envs import resolve_task
from flowrl.errors import FlowrlError
from flowrl.evaluation import Evaluator
from flowrl.policy import FlowPolicy
from flowrl.training import Trainer

TASKS = {"hopper": "Hopper", "walker2d": "Walker2d", "lift": "robosuite/Lift", "can": "robosuite/PickPlaceCan",
         "square": "robosuite/NutAssemblySquare"}
REINFLOW_TARGET = {"hopper": 3200.0}


def score(result: dict) -> float:
    """Success rate where the task has one, else the mean return."""
    return float(result["success_rate"] if "success_rate" in result else result["return_mean"])


def measure(policy: FlowPolicy, k: int, evaluator: Evaluator, episodes: int, held: ChunkDataset,
            reference: FlowPolicy) -> dict:
    policy.eval()
    result = evaluator(policy, k, episodes)
    return {"score": score(result), "return": result["return_mean"], "success": result.get("success_rate"),
            "held_out_mse": held_out_reconstruction(policy, held, k, reference=reference)}


def reinflow_from(task: str, checkpoint: str, k: int, seed: int, args: argparse.Namespace, out: Path) -> dict:
    from flowrl.agents.reinflow import ReinFlow

    cfg = load_stage_config("finetune", REPO / "configs" / task / "finetune_reflow.yaml",
                            [f"init={checkpoint}", f"seed={seed}", f"device={args.device}", f"train.k={k}",
                             f"train.env_steps={args.reinflow_env_steps}", f"eval.k=[{k}]",
                             f"eval.backend={args.eval_backend}"])
    run = Trainer(ReinFlow(cfg), out, progress=False)
    try:
        run.fit()
    finally:
        run.close()
    history = run.state.eval_history
    hit = first_reaching(history, REINFLOW_TARGET[task])
    return {"env_steps_to_target": int(hit["env_steps"]) if hit else None, "curve": history,
            "final_return": history[-1]["return_mean"] if history else None}


def run_seed(task: str, seed: int, args: argparse.Namespace, record: dict, save) -> None:
    runs = Path(args.runs)
    stamp = time.strftime("%H%M%S")
    pre_cfg = load_stage_config("pretrain", REPO / "configs" / task / "pretrain_reflow.yaml",
                                [f"seed={seed}", f"device={args.device}", "train.eval_every=0",
                                 f"eval.backend={args.eval_backend}",
                                 *([f"train.steps={args.pretrain_steps}"] if args.pretrain_steps else [])])
    data_path = str(in_repo(pre_cfg.data.path))
    episodes = read_dataset(data_path)
    if args.held_out >= episodes.num_episodes:
        raise FlowrlError(f"--held-out {args.held_out}: {data_path} has only {episodes.num_episodes} episodes")
    train_episodes = episodes.num_episodes - args.held_out
    record.update(dataset=data_path, episodes=episodes.num_episodes, held_out_episodes=args.held_out)
    started = time.time()
    if args.pretrained:
        init = resolve_checkpoint(args.pretrained.format(task=task, seed=seed))
        record["pretrained_from"] = str(init)
        record["pretrained_saw_held_out"] = True  # trained elsewhere, on whatever it was given
    else:
        pre_cfg.data.path, pre_cfg.data.max_episodes = data_path, train_episodes
        bc = Trainer(BehaviorCloning(pre_cfg), runs / f"mle-{task}-s{seed}-pretrain-{stamp}", progress=False)
        try:
            bc.fit()
        finally:
            bc.close()
        init = bc.run.checkpoint_dir(bc.step)
        record["pretrain_s"] = round(time.time() - started, 1)
        record["pretrained_saw_held_out"] = False
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    pretrained, _ = load_policy(init, device)
    held = ChunkDataset(episodes.tail(args.held_out), pretrained.cfg.obs_history, pretrained.cfg.horizon, device)
    info = resolve_task(TASKS[task])
    evaluator = Evaluator(info.name, backend=args.eval_backend, device=device, end_on_success=info.has_success)
    try:
        record["pretrained"] = {}
        for k in args.ks:
            record["pretrained"][str(k)] = measure(pretrained, k, evaluator, args.episodes, held, pretrained)
            print(f"[{task} s{seed}] pretrained K={k}: {record['pretrained'][str(k)]}", flush=True)
            save()
        for method in args.methods:
            record[method] = {}
            for k in args.ks:
                overrides = [f"init={init}", f"seed={seed}", f"device={args.device}", f"train.method={method}",
                             f"train.k={k}", f"train.data={data_path}", f"eval.backend={args.eval_backend}",
                             f"train.max_episodes={min(args.max_episodes or train_episodes, train_episodes)}",
                             "train.eval_every=0", *([f"train.steps={args.steps}"] if args.steps else [])]
                cfg = load_stage_config("finetune", REPO / "configs" / task / "finetune_mle.yaml", overrides)
                start = time.time()
                run = Trainer(MLEFineTuning(cfg), runs / f"mle-{task}-s{seed}-{method}-k{k}-{stamp}", progress=False)
                try:
                    run.fit()
                finally:
                    run.close()
                result = measure(run.agent.policy, k, evaluator, args.episodes, held, pretrained)
                result.update(train_s=round(time.time() - start, 1), checkpoint=str(run.run.checkpoint_dir(run.step)))
                record[method][str(k)] = result
                print(f"[{task} s{seed}] {method} K={k}: {result}", flush=True)
                save()
    finally:
        evaluator.close()
    if args.reinflow_env_steps and task in REINFLOW_TARGET:
        record["reinflow"] = {}
        starts = [("pretrained", k, str(init)) for k in args.ks]
        starts += [(m, k, record[m][str(k)]["checkpoint"]) for m in args.methods for k in args.ks]
        for name, k, checkpoint in starts:
            rf = reinflow_from(task, checkpoint, k, seed, args, runs / f"mle-{task}-s{seed}-rf-{name}-k{k}-{stamp}")
            record["reinflow"][f"{name}/{k}"] = rf
            print(f"[{task} s{seed}] ReinFlow from {name} K={k}: {rf['env_steps_to_target']} env steps to "
                  f"{REINFLOW_TARGET[task]:.0f}", flush=True)
            save()
    record["wall_clock_s"] = round(time.time() - started, 1)


def combine_seeds(records: list[dict]) -> list[dict]:
    """One record per seed: the parts of a seed that ran separately (``--methods ft``, then ``--methods resft``;
    or some K at a time) merged, K by K. The pretrained policy's evaluations repeat exactly, so the first is kept."""
    by_seed: dict[int, dict] = {}
    for rec in records:
        into = by_seed.setdefault(rec["seed"], {})
        for key, value in rec.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                into[key] = {**value, **into[key]} if key == "pretrained" else {**into[key], **value}
            else:
                into.setdefault(key, value)
    return list(by_seed.values())


def report(results: dict) -> int:
    checks = []
    for task, rec in results.items():
        seeds = [s for s in combine_seeds(rec["seeds"]) if "pretrained" in s]
        if not seeds:
            continue
        metric = "success" if resolve_task(TASKS[task]).has_success else "return"
        methods = [m for m in ("ft", "resft") if all(m in s for s in seeds)]
        ks = sorted({int(k) for s in seeds for k in s["pretrained"]})
        saw = any(s.get("pretrained_saw_held_out") for s in seeds)
        print(f"\n{task}: {len(seeds)} seed(s), {metric} (mean ± std over seeds) and held-out reconstruction MSE"
              + (" (the pretrained checkpoints saw the held-out episodes)" if saw else ""))
        head = f"{'K':>3} {'policy':>10} {metric:>18} {'vs pretrained':>18} {'held-out MSE':>14}"
        print(head)
        print("-" * len(head))
        for k in ks:
            base = np.array([s["pretrained"][str(k)]["score"] for s in seeds])
            base_mse = np.array([s["pretrained"][str(k)]["held_out_mse"] for s in seeds])
            print(f"{k:>3} {'pretrained':>10} {base.mean():>10.3f} ± {base.std():>5.3f} {'':>18} {base_mse.mean():>14.5f}")
            wins = []
            for m in methods:
                if str(k) not in seeds[0][m]:
                    continue
                vals = np.array([s[m][str(k)]["score"] for s in seeds])
                mse = np.array([s[m][str(k)]["held_out_mse"] for s in seeds])
                diff = vals - base
                spread = diff.std()
                print(f"{k:>3} {m:>10} {vals.mean():>10.3f} ± {vals.std():>5.3f} {diff.mean():>+11.3f} ± {spread:>5.3f}"
                      f" {mse.mean():>14.5f}")
                wins.append((m, diff.mean(), spread))
            if not wins or len(seeds) < 3:
                continue
            if k in (1, 2):
                ok = any(d > 0 and d > s for _, d, s in wins)
                checks.append((f"{task} K={k}: FT or ResFT beats pretrained by more than the seed spread "
                               f"({', '.join(f'{m} {d:+.3f} ± {s:.3f}' for m, d, s in wins)})", ok))
            elif k == 4:
                ok = all(d >= -s for _, d, s in wins)
                checks.append((f"{task} K=4: FT and ResFT lose no more than the seed spread "
                               f"({', '.join(f'{m} {d:+.3f} ± {s:.3f}' for m, d, s in wins)})", ok))
        rf = [s["reinflow"] for s in seeds if "reinflow" in s]
        if rf:
            print(f"ReinFlow to {REINFLOW_TARGET.get(task, 0):.0f}: env steps from each starting policy (per seed)")
            for key in rf[0]:
                print(f"  {key:>14}: {[r[key]['env_steps_to_target'] for r in rf if key in r]}")
    return report_checks(checks, require_some=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["hopper", "square"], choices=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4], help="Euler steps K compared")
    ap.add_argument("--methods", nargs="+", default=["ft", "resft"], choices=["ft", "resft"])
    ap.add_argument("--held-out", type=int, default=20, help="last episodes kept out of every training stage")
    ap.add_argument("--max-episodes", type=int, default=300,
                    help="MLE fine-tuning on the first N training episodes (0: all; inversion cost grows with N)")
    ap.add_argument("--pretrained", metavar="PATH",
                    help="skip behaviour cloning: these checkpoints ({task} and {seed} filled in)")
    ap.add_argument("--pretrain-steps", type=int, help="override train.steps of the pretraining presets")
    ap.add_argument("--steps", type=int, help="override train.steps of the MLE presets")
    ap.add_argument("--episodes", type=int, default=20, help="evaluation episodes per policy and K")
    ap.add_argument("--eval-backend", default="",
                    help="simulation backend of the evaluations (default: warp on a GPU, else cpu)")
    ap.add_argument("--reinflow-env-steps", type=int, default=0,
                    help="Hopper: ReinFlow from every policy for this many env steps (0: skip)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="only merge these results files and report")
    args = ap.parse_args()
    if args.report:
        return report(merge_results(args.report))
    if not args.eval_backend:
        from flowrl.envs import warp_available

        args.eval_backend = "warp" if torch.cuda.is_available() and warp_available() else "cpu"
    results: dict = {}
    for task in args.tasks:
        rec = {"task": task, "device": args.device, "cores": os.cpu_count(), "eval_backend": args.eval_backend,
               "eval_episodes": args.episodes, "seeds": []}
        results[task] = rec
        for seed in args.seeds:
            srec: dict = {"seed": seed}
            rec["seeds"].append(srec)
            run_seed(task, seed, args, srec, lambda: write_result(f"mle_finetune_{task}", rec, args.tag, "mle"))
            write_result(f"mle_finetune_{task}", rec, args.tag, "mle")
    return report(results)


if __name__ == "__main__":
    sys.exit(run_main(main))
