"""ReinFlow on locomotion from the medium demonstrations, against the published numbers.

For each task and seed: behaviour cloning (configs/<task>/pretrain_<head>.yaml), then ReinFlow
(configs/<task>/finetune_<head>.yaml); optionally Stable-Baselines3's PPO and SAC from scratch on our
batched env (``--baselines ppo sac``: PPO at the same env-step budget, SAC at sb3_baselines.py's; the
settings of benchmarks/sb3_baselines.py). Prints a table of pretrained -> fine-tuned return, env steps,
wall-clock and seconds per 80k-env-step iteration beside ReinFlow's published numbers, then the SB3
baselines of each task (its own and those in benchmarks/results/baselines/sb3_<task>*.json), writes
benchmarks/results/locomotion/reinflow_<task>[_<tag>].json and a learning-curve PNG (return against env steps
and against wall-clock) when matplotlib is there.

    python benchmarks/reinflow_locomotion.py --tasks hopper --seeds 0 1 2 [--env-steps 30000000]
        [--pretrain-steps 10000] [--head reflow] [--baselines ppo sac] [--baselines-only] [--device auto]
        [--tag NAME] [--sim-threads N] [--pretrain-set KEY=VALUE] [--pretrained PATH] [--budget-minutes N]
        [key=value overrides of the fine-tuning preset]
    python benchmarks/reinflow_locomotion.py --report benchmarks/results/locomotion/reinflow_hopper*.json

Demonstrations the repository does not ship (Humanoid's, 38 MB) are made first, once, with the command of
data/README.md from the shipped expert snapshot (:data:`MADE_DEMONSTRATIONS`).

Seeds can run as parallel processes (one ``--seeds i --tag si --sim-threads N`` each, or all of them from one
command with ``--jobs N``); ``--report`` merges their JSON files into one table and plot.

Targets (exit code 1 when one is missed), per task over its seeds:
- no collapse: every run's lowest evaluation >= 90% of its first (the pretrained policy), with evaluations
  at most 0.4M env steps apart of at least 20 episodes each (``--eval-every``, ``--eval-episodes``);
- at the full budget (10M env steps, Humanoid 6M): the mean final return at least ReinFlow's published one
  and at least the strongest SB3 PPO from scratch at that budget (benchmarks/results/baselines/);
- a Hopper 80k-step iteration under 1 s on a CUDA machine with the warp backend.
The presets' layout (256 envs x 80 decisions) is the one that keeps its start; on a GPU:

    python benchmarks/reinflow_locomotion.py --tasks hopper walker2d ant humanoid --seeds 11 12 13 --jobs 12 \
        --eval-every 4 --eval-episodes 20 train.backend=warp
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import FLOWRL_CLI, REPO, in_repo, merge_results, report_checks, results_dir, run_main, write_result
import sb3_baselines
from flowrl.agents.bc import BehaviorCloning
from flowrl.agents.ppo import ChunkPPO
from flowrl.checkpoint import load_policy, resolve_checkpoint
from flowrl.config import load_stage_config, resolve_device
from flowrl.errors import FlowrlError
from flowrl.evaluation import Evaluator
from flowrl.registry import agent_info
from flowrl.training import Trainer

PUBLISHED = {  # ReinFlow-R / ReinFlow-S: pretrained -> fine-tuned; seconds per iteration on an RTX 3090
    ("hopper", "reflow"): (1432, 3205, 11.7), ("hopper", "shortcut"): (1528, 3283, 11.7),
    ("walker2d", "reflow"): (2740, 4109, 11.6), ("walker2d", "shortcut"): (2739, 4255, 11.6),
    ("ant", "reflow"): (1231, 4009, 17.5), ("ant", "shortcut"): (2088, 4106, 17.5),
    ("humanoid", "reflow"): (1926, 5076, 30.9), ("humanoid", "shortcut"): (2122, 4749, 30.9),
}
FULL_BUDGET = {"hopper": 10_000_000, "walker2d": 10_000_000, "ant": 10_000_000, "humanoid": 6_000_000}
"""Env steps at which the final returns are compared with the published ones and with SB3 PPO."""
KEEP_START = 0.9
"""The lowest evaluation of a run as a fraction of its first that counts as keeping its start."""
MAX_EVAL_SPACING = 400_000
MIN_EVAL_EPISODES = 20
MIN_SEEDS = 3
MADE_DEMONSTRATIONS = {
    "data/humanoid-medium.hdf5": ["collect", "data/experts/humanoid", "--level", "medium", "--episodes", "100",
                                  "--noise", "0.05", "--seed", "0", "--num-envs", "100", "--backend", "cpu"],
}
"""Demonstrations the repository does not ship, by a preset's ``data.path``: the ``flowrl`` command that makes
them from what it does ship (data/README.md), run once before the study when the file is missing."""


def run_seed(task: str, head: str, seed: int, args: argparse.Namespace, runs: Path, record: dict,
             save: Callable[[], None]) -> None:
    """Behaviour cloning then ReinFlow from ``configs/<task>/`` for one seed; results into ``record``
    (success rates too where the task reports success), ``save`` called at every curve point.
    Shared with reinflow_manipulation.py."""
    started = time.time()
    common = [f"seed={seed}", f"device={args.device}"]
    pre_cfg = load_stage_config("pretrain", REPO / "configs" / task / f"pretrain_{head}.yaml",
                                [*common, "train.eval_every=0", f"eval.episodes={args.episodes}", "eval.k=[4]",
                                 *([f"train.steps={args.pretrain_steps}"] if args.pretrain_steps else []),
                                 *args.pretrain_set])
    pre_cfg.data.path = str(in_repo(pre_cfg.data.path))
    stamp = f"{args.tag}-{time.strftime('%H%M%S')}" if args.tag else time.strftime("%H%M%S")  # runs side by side differ
    if args.pretrained:  # behaviour cloning done elsewhere (e.g. on other machines): evaluate it here
        init = resolve_checkpoint(args.pretrained.format(task=task, head=head, seed=seed))
        policy, _ = load_policy(init, device=resolve_device(pre_cfg.device))
        evaluator = Evaluator.from_config(pre_cfg.task, pre_cfg.eval, policy.obs_mean.device)
        eval_start = time.time()
        try:
            pre = evaluator(policy, 4, args.episodes)
        finally:
            evaluator.close()
        record["pretrained_from"] = str(init)
    else:
        start = time.time()
        bc = Trainer(BehaviorCloning(pre_cfg), runs / f"{task}-{head}-s{seed}-pretrain-{stamp}", progress=False)
        try:
            bc.fit()
            record["pretrain_s"] = round(time.time() - start, 1)
            eval_start = time.time()
            pre = bc.evaluate(4, args.episodes)
        finally:
            bc.close()
        record["data_return"] = bc.agent.data_info["return_mean"]
        init = bc.run.checkpoint_dir(bc.step)
    eval_s = time.time() - eval_start
    record["pretrained"] = pre["return_mean"]
    if "success_rate" in pre:
        record["pretrained_success"] = pre["success_rate"]
    source = f"{record['pretrain_s']} s" if "pretrain_s" in record else f"loaded from {init}"
    print(f"[{task} s{seed}] pretrained: {describe(pre)} ({source})", flush=True)

    preset = getattr(args, "finetune_preset", "") or f"finetune_{head}.yaml"
    record["pretrained_checkpoint"] = str(init)
    ft_cfg = load_stage_config("finetune", REPO / "configs" / task / preset,
                               [*common, f"init={init}", f"eval.episodes={args.episodes}", "eval.k=[4]",
                          f"train.eval_every={args.eval_every}", f"train.eval_episodes={args.eval_episodes}",
                                f"train.sim_threads={args.sim_threads}", *args.overrides,
                                *([f"train.env_steps={args.env_steps}"] if args.env_steps else [])])
    if args.budget_minutes:
        minutes = fine_tuning_minutes(args.budget_minutes, time.time() - started, eval_s)
        ft_cfg.train.max_minutes = min(minutes, ft_cfg.train.max_minutes or minutes)
        record["max_minutes"] = round(ft_cfg.train.max_minutes, 2)
    record["overrides"] = list(args.overrides)
    record["eval_episodes"] = ft_cfg.train.eval_episodes
    record["shared_by"] = getattr(args, "shared_by", 1)
    record.update(num_envs=ft_cfg.train.num_envs, rollout_steps=ft_cfg.train.rollout_steps)
    record["pretrain_overrides"] = list(args.pretrain_set)
    run = Trainer(agent_info("finetune", ft_cfg.algo).agent_class()(ft_cfg),
                  runs / f"{task}-{head}-s{seed}-finetune-{stamp}", progress=False)
    agent, st = run.agent, run.state
    record_diagnostics(agent, record, getattr(args, "diagnostics", 0))
    run.on_eval = lambda: (record.update(curve=st.eval_history, iteration_s=st.iteration_seconds), save())
    try:
        run.fit()
        agent.release_rollout_envs()
        final = run.evaluate(4, args.episodes)
    finally:
        run.close()
    if "success_rate" in final:
        record["finetuned_success"] = final["success_rate"]
    record.update(finetuned=final["return_mean"], finetuned_std=final["return_std"], env_steps=run.step,
                  finetuned_checkpoint=str(run.run.checkpoint_dir(run.step)), preset=preset,
                  wall_clock_s=round(st.wall_clock, 1), curve=st.eval_history,
                  iteration_s=st.iteration_seconds, rollout_s=agent.stats.rollout_seconds,
                  steps_per_iteration=agent.steps_per_iteration, backend=type(agent.env).__name__,
                  sim_threads=args.sim_threads)
    print(f"[{task} s{seed}] fine-tuned: {describe(final)} after {run.step} env steps, "
          f"{record['wall_clock_s']} s", flush=True)


def make_demonstrations(tasks: list[str], head: str) -> None:
    """Make the missing demonstrations of ``tasks``' pretraining presets that :data:`MADE_DEMONSTRATIONS`
    knows (once, before any run, so parallel runs do not race to write them); a missing file it does not know
    is an error naming it."""
    for task in tasks:
        cfg = load_stage_config("pretrain", REPO / "configs" / task / f"pretrain_{head}.yaml", [])
        path = in_repo(cfg.data.path)
        if path.is_file():
            continue
        command = MADE_DEMONSTRATIONS.get(cfg.data.path)
        if command is None:
            raise FlowrlError(f"{task}: the demonstrations {path} are missing (configs/{task}/pretrain_{head}.yaml)")
        print(f"[{task}] making {cfg.data.path}: flowrl {' '.join(command)}", flush=True)
        start = time.time()
        done = subprocess.run([*FLOWRL_CLI, *command, "--out", str(path)], cwd=REPO)
        if done.returncode != 0 or not path.is_file():
            raise FlowrlError(f"{task}: making {cfg.data.path} failed (exit {done.returncode})")
        print(f"[{task}] made {cfg.data.path} in {time.time() - start:.0f} s", flush=True)


def fine_tuning_minutes(budget_minutes: float, elapsed_s: float, eval_s: float) -> float:
    """What is left of a seed's time budget for fine-tuning (``train.max_minutes``).

    A run stopped by its time limit still finishes its iteration, evaluates and saves it, and then
    the benchmark evaluates it once more over ``--episodes``: this keeps 2.5 times the pretrained
    policy's evaluation (``eval_s``, the same episodes) and a minute for those, so that a machine
    with a hard limit does not cut the final evaluation.
    """
    left_s = budget_minutes * 60 - elapsed_s - 2.5 * eval_s - 60
    if left_s <= 0:
        raise FlowrlError(f"--budget-minutes {budget_minutes:g}: no time left to fine-tune ({elapsed_s:.0f} s spent "
                          f"before it and ~{2.5 * eval_s + 60:.0f} s needed after it)")
    return left_s / 60


DIAGNOSTICS = ("train/action_drift", "train/explained_variance", "train/advantage_sign_flips", "train/noise_std",
               "train/approx_kl", "train/clip_fraction", "train/critic_warmup", "rollout/ep_rew_mean")
"""What the first iterations of a fine-tuning record with ``--diagnostics N``: how far the deployed policy moves,
the critic's accuracy, the advantages' sign flips, the noise and the step size."""


def record_diagnostics(agent: ChunkPPO, record: dict, iterations: int) -> None:
    """Keep :data:`DIAGNOSTICS` of the agent's first ``iterations`` iterations in ``record["diagnostics"]``."""
    if iterations <= 0:
        return
    step = agent.train_iteration
    rows = record.setdefault("diagnostics", [])

    def logged(iteration: int) -> dict:
        logs = step(iteration)
        if iteration < iterations:
            rows.append({"iteration": iteration, "env_steps": (iteration + 1) * agent.steps_per_iteration,
                         **{k: (None if logs.get(k) is None else float(logs[k])) for k in DIAGNOSTICS}})
        return logs

    agent.train_iteration = logged  # type: ignore[method-assign]


def add_seed_options(ap: argparse.ArgumentParser) -> None:
    """Options of run_seed (shared with reinflow_manipulation.py)."""
    ap.add_argument("--diagnostics", type=int, default=0, metavar="N",
                    help="record what moves in the first N iterations (action drift from the pretrained policy, "
                         "explained variance, advantage sign flips, noise, approx KL) in the results file")
    ap.add_argument("--budget-minutes", type=float, default=0.0,
                    help="wall-clock budget of each seed, behaviour cloning and evaluations included: "
                         "fine-tuning gets train.max_minutes from what is left (default: none)")
    ap.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override of the pretraining preset, e.g. policy.horizon=1 (repeatable)")
    ap.add_argument("--pretrained", metavar="PATH",
                    help="skip behaviour cloning: fine-tune this checkpoint or run folder instead "
                         "({task}, {head} and {seed} are filled in, e.g. runs/bc/{task}-s{seed})")


def describe(result: dict) -> str:
    text = f"return {result['return_mean']:.1f}"
    return text + (f", success {100 * result['success_rate']:.0f}%" if "success_rate" in result else "")


def run_baselines(task: str, algos: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Stable-Baselines3 from scratch on ``task``, one row per algorithm and seed (benchmarks/sb3_baselines.py's
    settings; PPO at this run's env-step budget)."""
    settings = sb3_baselines.settings(device=args.device, ppo_steps=args.env_steps or 0, episodes=args.episodes,
                                      threads=args.sim_threads)
    return {algo: [sb3_baselines.run_one(task, algo, seed, settings) for seed in args.seeds] for algo in algos}


def baseline_rows(task: str, rec: dict) -> dict[str, list[dict]]:
    """The SB3 rows of a task: this record's (``"sb3"``, and ``"ppo"`` of older records) and those in
    benchmarks/results/baselines/sb3_<task>*.json."""
    rows: dict[str, list[dict]] = {algo: list(r) for algo, r in sb3_baselines.rows_in_results(task).items()}
    for algo, r in rec.get("sb3", {}).items():
        rows.setdefault(algo, []).extend(r)
    if "ppo" in rec:
        rows.setdefault("ppo", []).append(sb3_baselines.legacy_ppo_row(rec))
    return rows


TAG = [""]
STUDY = "locomotion"


def flush(all_results: dict) -> None:
    for task, rec in all_results.items():
        write_result(f"reinflow_{task}", rec, TAG[0], STUDY)


def plot(task: str, rec: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install 'flowrl[bench]')")
        return
    if not rec["seeds"]:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in rec["seeds"]:
        curve = s.get("curve", [])
        if not curve:
            continue
        backend = {"MujocoWarpEnv": "warp", "MujocoBatchEnv": "cpu"}.get(s.get("backend", ""), s.get("backend", ""))
        axes[0].plot([c.get("step", c.get("env_steps", 0)) / 1e6 for c in curve], [c["return_mean"] for c in curve],
                     label=f"seed {s['seed']}" + (f", {backend} backend" if backend else ""))
        axes[1].plot([c["wall_clock_s"] / 60 for c in curve], [c["return_mean"] for c in curve])
    pub = PUBLISHED.get((task, rec["head"]))
    for ax, xlabel in zip(axes, ("env steps (M)", "wall-clock (min)")):
        if pub:
            ax.axhline(pub[1], color="gray", ls="--", label="ReinFlow published")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("return (deterministic policy)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"ReinFlow on {task} ({rec['head']}), {rec.get('device', '')}")
    fig.tight_layout()
    path = results_dir(STUDY) / f"reinflow_{task}{'_' + TAG[0] if TAG[0] else ''}.png"  # --tag names the report too
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["hopper"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--head", default="reflow", choices=["reflow", "shortcut"])
    ap.add_argument("--env-steps", type=int, help="override train.env_steps of the presets")
    ap.add_argument("--pretrain-steps", type=int, help="override train.steps of the pretraining presets")
    ap.add_argument("--episodes", type=int, default=20, help="episodes of the final evaluations")
    ap.add_argument("--eval-every", type=int, default=10, help="iterations between curve points")
    ap.add_argument("--eval-episodes", type=int, default=10, help="episodes per curve point")
    ap.add_argument("--baselines", nargs="+", default=[], choices=["ppo", "sac"],
                    help="also train SB3 PPO / SAC from scratch, one run per seed (benchmarks/sb3_baselines.py)")
    ap.add_argument("--baselines-only", action="store_true",
                    help="only the baselines (e.g. on other cores, merged by --report)")
    add_seed_options(ap)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    ap.add_argument("--tag", default="", help="suffix of the results file (parallel processes)")
    ap.add_argument("--sim-threads", type=int, default=0, help="cpu backend threads (0: all cores)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run the (task, seed) pairs as this many processes side by side, then report them "
                         "together (several fit one GPU: its simulation and networks are small)")
    ap.add_argument("--shared-by", type=int, default=1, help=argparse.SUPPRESS)  # --jobs tells its runs
    ap.add_argument("--report", nargs="+", metavar="JSON", help="only merge these results files and report")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the fine-tuning preset")
    return ap


def main() -> int:
    args = parser().parse_intermixed_args()  # key=value overrides may come before or after options
    TAG[0] = args.tag

    all_results: dict = {}
    if args.report:
        return report(merge_results(args.report, also=("ppo",), extend=("sb3",)))
    if args.baselines_only and not args.baselines:
        raise FlowrlError("--baselines-only needs --baselines ppo and/or sac")
    missing = [task for task in args.tasks if args.baselines and task not in sb3_baselines.TASKS]
    if missing:
        raise FlowrlError(f"--baselines: no SB3 baseline for {missing} (have {sorted(sb3_baselines.TASKS)})")
    if args.jobs < 1:
        raise FlowrlError(f"--jobs must be >= 1, got {args.jobs}")
    if not args.baselines_only and not args.pretrained:
        make_demonstrations(args.tasks, args.head)
    if args.jobs > 1:
        if args.baselines:
            raise FlowrlError("--jobs runs ReinFlow only: run --baselines in a command of their own")
        return run_parallel(args)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    for task in args.tasks:
        rec = {"task": task, "head": args.head, "device": device, "cores": os.cpu_count(), "seeds": []}
        all_results[task] = rec
        for seed in [] if args.baselines_only else args.seeds:
            srec: dict = {"seed": seed}
            rec["seeds"].append(srec)
            run_seed(task, args.head, seed, args, Path(args.runs), srec, lambda: flush(all_results))
            flush(all_results)
        if args.baselines:
            rec["sb3"] = run_baselines(task, args.baselines, args)
        flush(all_results)
    return report(all_results)


def child_command(args: argparse.Namespace, task: str, seed: int, tag: str) -> list[str]:
    """The command line of one (task, seed) run of a ``--jobs`` study: this run's options, one task and seed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--tasks", task, "--seeds", str(seed), "--tag", tag,
           "--head", args.head, "--episodes", str(args.episodes), "--eval-every", str(args.eval_every),
           "--eval-episodes", str(args.eval_episodes), "--device", args.device, "--runs", args.runs,
           "--sim-threads", str(args.sim_threads), "--diagnostics", str(args.diagnostics),
           "--budget-minutes", str(args.budget_minutes),
           "--shared-by", str(min(args.jobs, len(args.tasks) * len(args.seeds)))]
    for flag, value in (("--env-steps", args.env_steps), ("--pretrain-steps", args.pretrain_steps),
                        ("--pretrained", args.pretrained)):
        if value:
            cmd += [flag, str(value)]
    for item in args.pretrain_set:
        cmd += ["--pretrain-set", item]
    return cmd + list(args.overrides)


def run_parallel(args: argparse.Namespace) -> int:
    """Every (task, seed) of the study as its own process, ``args.jobs`` at a time (each with
    ``OMP_NUM_THREADS`` = cores / jobs; processes on one GPU share it), each writing
    ``reinflow_<task>_<tag>s<seed>.json`` and its log beside it; then one report of them all."""
    runs = [(task, seed) for task in args.tasks for seed in args.seeds]
    folder = results_dir(STUDY)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs)),
           "PYTHONUNBUFFERED": "1"}
    waiting, running, failed, written = list(runs), [], [], []
    print(f"{len(runs)} runs, {args.jobs} at a time; logs in {folder}", flush=True)
    while waiting or running:
        while waiting and len(running) < args.jobs:
            task, seed = waiting.pop(0)
            tag = f"{args.tag}_s{seed}" if args.tag else f"s{seed}"
            log = folder / f"reinflow_{task}_{tag}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(child_command(args, task, seed, tag), stdout=out, stderr=subprocess.STDOUT,
                                        env=env)
            running.append((proc, task, seed, log, folder / f"reinflow_{task}_{tag}.json"))
        time.sleep(1.0)
        for item in [r for r in running if r[0].poll() is not None]:
            running.remove(item)
            proc, task, seed, log, result = item
            if proc.returncode not in (0, 1):  # 1: a single run misses the study's targets by construction
                failed.append(f"{task} seed {seed} (exit {proc.returncode}; {log})")
            print(f"[{task} s{seed}] finished, exit {proc.returncode}", flush=True)
            if result.is_file():
                written.append(str(result))
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    if not written:
        return 2
    code = report(merge_results(written, also=("ppo",), extend=("sb3",)))
    return 2 if failed else code


def completed(seed: dict) -> dict:
    """A seed's record; one whose process was stopped (time limit) before its final evaluation takes
    its last curve point instead, marked ``final_cut`` (it counts for the targets only if that point
    is at the full budget, as the checks' env-step condition requires)."""
    if "finetuned" in seed or not seed.get("curve"):
        return seed
    last = seed["curve"][-1]
    return {**seed, "finetuned": last["return_mean"], "finetuned_std": last.get("return_std", float("nan")),
            "env_steps": last["env_steps"], "wall_clock_s": last["wall_clock_s"], "final_cut": True,
            "steps_per_iteration": last["env_steps"] // max(last["iteration"], 1),
            **({"finetuned_success": last["success_rate"]} if "success_rate" in last else {})}


def lowest_fraction(seed: dict) -> float:
    """The lowest evaluation of a seed's learning curve as a fraction of its first (the collapse)."""
    returns = [c["return_mean"] for c in seed["curve"]]
    return min(returns) / returns[0] if returns[0] > 0 else float("nan")


def run_row(seed: dict, published: float) -> dict:
    """What the report says of one run (its curve is not empty): its start, lowest evaluation (fraction of the
    start, where), the env steps at which it first reached the published return, its final, and how dense its
    curve was."""
    curve = seed["curve"]
    low = min(curve, key=lambda c: c["return_mean"])
    steps = [c["env_steps"] for c in curve]
    return {"seed": seed["seed"], "start": curve[0]["return_mean"], "lowest": low["return_mean"],
            "lowest_fraction": lowest_fraction(seed), "lowest_at": low["env_steps"],
            "to_published": next((c["env_steps"] for c in curve if c["return_mean"] >= published), None),
            "final": seed["finetuned"], "env_steps": seed["env_steps"], "final_cut": bool(seed.get("final_cut")),
            "eval_spacing": int(max(np.diff(steps), default=0)), "eval_episodes": seed.get("eval_episodes"),
            "wall_clock_s": seed["wall_clock_s"]}


def seconds_per_80k(seed: dict) -> float:
    """A run's median iteration time, scaled to 80k env steps (nan when it recorded none)."""
    if not seed.get("iteration_s"):
        return float("nan")
    return float(np.median(seed["iteration_s"])) * 80_000 / seed["steps_per_iteration"]


def strongest_ppo(rows_by_algo: dict[str, list[dict]], budget: int) -> tuple[float, str] | None:
    """The best mean return over the SB3 PPO settings that ran ``budget`` env steps (within 5%), and the
    setting it came from."""
    groups: dict[tuple, list[float]] = {}
    for row in rows_by_algo.get("ppo", []):
        key = sb3_baselines.setting(row)
        if abs(row["env_steps"] / budget - 1) < 0.05:
            groups.setdefault(key, []).append(row["return"])
    if not groups:
        return None
    key, returns = max(groups.items(), key=lambda g: np.mean(g[1]))
    return float(np.mean(returns)), f"{key[1]} envs x steps, {key[2]} backend, {len(returns)} seeds"


def report(all_results: dict) -> int:
    for task, rec in all_results.items():
        plot(task, rec)
    first = next(iter(all_results.values()))
    device, head_name = first["device"], first["head"]
    print(f"\nReinFlow ({head_name}) on {device}, {first['cores']} CPU cores")
    head = (f"{'task':<9} {'seed':>4} {'start':>7} {'lowest':>7} {'/start':>6} {'at':>7} {'published':>9} "
            f"{'reached at':>10} {'final':>8} {'env steps':>10} {'wall s':>7} {'s/80k it':>8}")
    print(head)
    print("-" * len(head))
    checks = []
    baselines = {task: baseline_rows(task, rec) for task, rec in all_results.items()}
    for task, rec in all_results.items():
        seeds = [completed(s) for s in rec["seeds"] if s.get("curve")]
        if not seeds:  # a baselines-only record
            continue
        pub = PUBLISHED.get((task, head_name), (float("nan"),) * 3)
        rows = [run_row(s, pub[1]) for s in seeds]
        for s, r in zip(seeds, rows):
            it = seconds_per_80k(s)
            reached = f"{r['to_published'] / 1e6:.2f}M" if r["to_published"] is not None else "-"
            print(f"{task:<9} {r['seed']:>4} {r['start']:>7.0f} {r['lowest']:>7.0f} {r['lowest_fraction']:>6.2f} "
                  f"{r['lowest_at'] / 1e6:>6.2f}M {pub[1]:>9.0f} {reached:>10} {r['final']:>7.0f}"
                  f"{'*' if r['final_cut'] else ' '} {r['env_steps']:>10} {r['wall_clock_s']:>7.0f} {it:>8.2f}")
        dense = all(r["eval_spacing"] <= MAX_EVAL_SPACING and (r["eval_episodes"] or 0) >= MIN_EVAL_EPISODES
                    for r in rows)
        lowest = min(r["lowest_fraction"] for r in rows)
        sparse = ("" if dense else f"; curves need >= {MIN_EVAL_EPISODES} episodes every "
                  f"<= {MAX_EVAL_SPACING / 1e6:g}M env steps")
        few = "" if len(rows) >= MIN_SEEDS else f"; {MIN_SEEDS} seeds needed"
        checks.append((f"{task}: every run's lowest evaluation >= {KEEP_START:.0%} of its start "
                       f"(lowest {lowest:.2f} over {len(rows)} runs{sparse}{few})",
                       dense and not few and lowest >= KEEP_START))
        budget = FULL_BUDGET.get(task)
        if budget and min(r["env_steps"] for r in rows) >= budget:
            final = float(np.mean([r["final"] for r in rows]))
            checks.append((f"{task}: mean final {final:.0f} >= ReinFlow's published {pub[1]:.0f}{few}",
                           not few and final >= pub[1]))
            ppo = strongest_ppo(baselines[task], budget)
            checks.append((f"{task}: no SB3 PPO at {budget / 1e6:g}M env steps to compare with", False) if ppo is None
                          else (f"{task}: mean final {final:.0f} >= SB3 PPO from scratch {ppo[0]:.0f} ({ppo[1]}){few}",
                                not few and final >= ppo[0]))
        elif budget:
            print(f"  {task}: finals not compared (a run stopped before {budget / 1e6:g}M env steps)")
        # the iteration time only of runs that had the machine to themselves (no cpu-thread cap, no --jobs)
        alone = [s for s in seeds if not s.get("sim_threads") and s.get("shared_by", 1) == 1 and s.get("iteration_s")]
        if task == "hopper" and device != "cpu" and alone and {s.get("backend") for s in alone} == {"MujocoWarpEnv"}:
            it = float(np.mean([seconds_per_80k(s) for s in alone]))
            checks.append((f"hopper 80k-step iteration < 1 s on {device}, warp ({it:.2f} s)", it < 1.0))
    print("(* the last curve point of a run stopped before its final evaluation)")
    if any(baselines.values()):
        print("\nStable-Baselines3 from scratch through flowrl's adapters (benchmarks/sb3_baselines.py):")
        print(sb3_baselines.SUMMARY_HEADER)
        for task, rows in baselines.items():
            for line in sb3_baselines.summary_lines(task, rows):
                print(line)
    return report_checks(checks)


if __name__ == "__main__":
    sys.exit(run_main(main))
