"""How fast the training loops run on one GPU: behaviour cloning, a ReinFlow iteration, MLE, evaluation, the
physics alone, and the wall clock from demonstrations to Hopper's published return.

Parts (``--parts``, default all but ``profile``):
- ``bc``: gradient steps/s of behaviour cloning through the training loop, for the Hopper preset (3x512
  MLP, batch 256), the Square preset and a pixel policy (Can's pixel preset on random 84x84 images beside
  Can's demonstrations: the speed does not depend on what the pixels show). Each run also records its
  loss every 100 steps, so runs of one seed (``--cuda-graph off`` / ``on``, ``--compile``, or the baseline)
  compare loss curves, and its steady rate after the first 200 steps (the graph's capture and, with
  ``--compile``, the compilation are then behind it) beside the whole loop's.
- ``reinflow``: Hopper ReinFlow iterations for each ``--layouts`` rollout (``<envs>x<decisions>``, 4 actions
  per decision; the preset's 256x80 and 2048x10 are 80k env steps each) on ``--sim-backend`` (MuJoCo Warp by default),
  split into rollout and update seconds (the mean of the iterations after the critic warm-up and the
  first actor update), and evaluations of 10 Hopper episodes at K = 4 on each backend.
- ``mle``: MLE reconstruction fine-tuning steps/s (Hopper preset, K = 1; no CUDA graph yet).
- ``physics``: Hopper on MuJoCo Warp without a policy, seconds per env step at each ``--worlds``.
- ``e2e``: ``flowrl pretrain configs/hopper/pretrain_reflow.yaml`` then ``flowrl finetune
  configs/hopper/finetune_reflow.yaml`` on the ``--e2e-layout`` rollout (the preset's 256x80) on warp, stopped at the
  first periodic evaluation (20 episodes) at or above the published return (``train.stop_at_score=3205``), as two CLI
  processes timed from their start (Python and CUDA start-up, data loading and Warp's kernel cache
  included).
- ``profile``: torch.profiler tables of BC steps, a ReinFlow rollout and update, and an evaluation.

Targets (exit code 1 when one is missed): BC of the Hopper policy >= 2500 steps/s once running (after its
first 200 steps: the graph's capture and any compilation are start-up, which the whole loop's rate beside
it includes), a Hopper ReinFlow
iteration (rollout + update, the preset's 256x80 on warp: shorter rollouts simulate faster but
lose much of the pretrained policy's return first, docs/results.md) <= 0.3 s, an evaluation of 10 Hopper episodes <= 1 s,
demonstrations to 3205 <= 60 s. ``--report`` prints the table of every record in the results folder.

    python benchmarks/training_speed.py --tag after            # writes training_speed/<tag>.json
    python benchmarks/training_speed.py --report                # the table of every record

The record names the commit, the card and the torch version. Compare only records of the same card: run
the baseline on the same machine, one run after the other (``--code-commit`` and ``--configs`` for a
baseline installed elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import FLOWRL_CLI, REPO, in_repo, provenance, report_checks, results_dir, run_main

PUBLISHED_HOPPER = 3205.0
TARGETS = {"bc_hopper_steady_steps_per_s": 2500.0, "reinflow_iteration_s": 0.3, "eval_hopper_10_s": 1.0, "e2e_s": 60.0}
ROLLOUT = "256x80"


CONFIGS = [REPO / "configs"]
"""Where the presets are read from (``--configs``: a baseline's own, whose keys it knows)."""


def preset(name: str) -> Path:
    """A preset, ``<task>/<file>.yaml``, from the configs folder in use."""
    return CONFIGS[0] / name


def machine() -> str:
    """The card, or the CPU where there is none (from the record's provenance)."""
    where = provenance()
    return where["gpu"] or f"cpu ({where['cpu']}, {where['cores']} cores)"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_fit(trainer: Any) -> float:
    """Seconds of ``trainer.fit()`` to the last kernel's end; the trainer is closed after."""
    sync()
    start = time.time()
    trainer.fit()
    sync()
    seconds = time.time() - start
    trainer.close()
    return seconds


def supports(schema: Any, key: str) -> bool:
    """Whether this flowrl's config has ``train.<key>`` (the baseline may predate it)."""
    import dataclasses

    return key in {f.name for f in dataclasses.fields(schema)}


def step_overrides(args: argparse.Namespace, agent_config: Any) -> list[str]:
    """``--cuda-graph`` and ``--compile`` as the agent's ``train.*`` overrides, where its config has the key."""
    compiled = ["train.compile=true"] if args.compile and supports(agent_config, "compile") else []
    if args.cuda_graph == "default" or not supports(agent_config, "cuda_graph"):
        return compiled
    return [f"train.cuda_graph={'true' if args.cuda_graph == 'on' else 'false'}", *compiled]


# -- behaviour cloning -----------------------------------------------------------------------------
def pixel_dataset(path: Path, episodes: int = 40) -> None:
    """Can's shipped demonstrations (the first ``episodes``) with random 84x84 images of both cameras."""
    import numpy as np

    from flowrl.datasets import read_dataset, write_robomimic
    from flowrl.envs import resolve_task
    from flowrl.envs.backends.robosuite import robomimic_env_args

    info = resolve_task("robosuite/PickPlaceCan")
    eps = read_dataset(REPO / "data/can-scripted.hdf5").head(episodes)
    rng = np.random.default_rng(0)
    eps.images = {c: rng.integers(0, 255, (eps.num_transitions, 84, 84, 3), dtype=np.uint8)
                  for c in ("agentview", "robot0_eye_in_hand")}
    write_robomimic(path, eps, list(info.obs_layout), robomimic_env_args(info, info.max_episode_steps))


def bc_run(name: str, preset_path: Path, steps: int, args: argparse.Namespace, extra: list[str]) -> dict:
    from flowrl.agents.bc import BCConfig, BehaviorCloning
    from flowrl.config import load_stage_config
    from flowrl.training import Trainer

    overrides = [f"seed={args.seed}", f"device={args.device}", f"train.steps={steps}", "train.eval_every=0",
                 f"train.checkpoint_every={steps}", "train.log_every=100", *extra, *step_overrides(args, BCConfig)]
    cfg = load_stage_config("pretrain", preset_path, overrides)
    cfg.data.path = str(in_repo(cfg.data.path))
    losses: list[float] = []
    steady_from = min(200, steps // 2)
    marks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        trainer = Trainer(BehaviorCloning(cfg), Path(tmp) / name, progress=False)
        setup_s = time.time() - start
        agent = trainer.agent
        step = agent.train_iteration

        def logged(iteration: int) -> dict:
            if iteration == steady_from:
                sync()
                marks["steady"] = time.time()
            logs = step(iteration)
            if iteration % 100 == 99:
                losses.append(float(logs["train/loss"]))
            return logs

        agent.train_iteration = logged  # type: ignore[method-assign]
        loop_s = timed_fit(trainer)
        steady_s = time.time() - marks["steady"]
    return {"preset": str(preset_path), "steps": steps, "batch_size": cfg.train.batch_size,
            "setup_s": round(setup_s, 2), "loop_s": round(loop_s, 3), "steps_per_s": round(steps / loop_s, 1),
            "steady_steps_per_s": round((steps - steady_from) / steady_s, 1),
            "loss_every_100": [round(x, 6) for x in losses], "overrides": overrides}


def part_bc(args: argparse.Namespace, record: dict) -> None:
    runs = record.setdefault("bc", {})
    runs["hopper"] = bc_run("bc-hopper", preset("hopper/pretrain_reflow.yaml"), args.bc_steps, args, [])
    print(f"BC hopper: {runs['hopper']['steps_per_s']:.0f} steps/s "
          f"({runs['hopper']['steady_steps_per_s']:.0f} after step 200)", flush=True)
    runs["square"] = bc_run("bc-square", preset("square/pretrain_reflow.yaml"), args.bc_steps, args, [])
    print(f"BC square: {runs['square']['steps_per_s']:.0f} steps/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "can-pixels.hdf5"
        pixel_dataset(data)
        runs["pixels"] = bc_run("bc-pixels", preset("can/pretrain_reflow_pixels.yaml"), args.pixel_steps, args,
                                [f"data.path={data}"])
    print(f"BC pixels: {runs['pixels']['steps_per_s']:.0f} steps/s", flush=True)


# -- ReinFlow and evaluation ---------------------------------------------------------------------------
def pretrained_hopper(args: argparse.Namespace, out: Path) -> Path:
    """A Hopper policy of the preset's architecture, cloned for ``--init-steps`` steps (its quality does not
    change an iteration's seconds)."""
    from flowrl.agents.bc import BehaviorCloning
    from flowrl.config import load_stage_config
    from flowrl.training import Trainer

    done = out / "checkpoints" / str(args.init_steps)
    if done.is_dir():  # another part made it already
        return done
    cfg = load_stage_config("pretrain", preset("hopper/pretrain_reflow.yaml"),
                            [f"seed={args.seed}", f"device={args.device}", f"train.steps={args.init_steps}",
                             "train.eval_every=0"])
    cfg.data.path = str(REPO / cfg.data.path)
    trainer = Trainer(BehaviorCloning(cfg), out, progress=False)
    trainer.fit()
    trainer.close()
    return trainer.run.checkpoint_dir(trainer.step)


def layout_overrides(layout: str, device: str, backend: str = "warp") -> list[str]:
    """``<envs>x<decisions>`` as the ReinFlow overrides of that rollout on ``backend`` (a small one on a CPU
    device)."""
    envs, decisions = (int(x) for x in layout.lower().split("x"))
    if device == "cpu":
        envs, backend = min(envs, 64), "cpu"
    return [f"train.num_envs={envs}", f"train.rollout_steps={decisions}", f"train.backend={backend}"]


def time_evaluations(evaluate: Any, repeats: int = 3) -> list[float]:
    """Seconds of each of ``repeats`` evaluations (the first compiles what the later ones reuse)."""
    out = []
    for _ in range(repeats):
        sync()
        begin = time.time()
        evaluate()
        sync()
        out.append(round(time.time() - begin, 3))
    return out


def part_reinflow(args: argparse.Namespace, record: dict, tmp: Path) -> None:
    from flowrl.agents.reinflow import ReinFlow, ReinFlowConfig
    from flowrl.config import load_stage_config
    from flowrl.envs import resolve_backend
    from flowrl.evaluation import Evaluator
    from flowrl.training import Trainer

    init = pretrained_hopper(args, tmp / "init")
    record["reinflow"] = {}
    for layout in args.layouts:
        overrides = [f"seed={args.seed}", f"device={args.device}", f"init={init}", "train.eval_every=0",
                     f"train.checkpoint_every={10 ** 6}", *layout_overrides(layout, args.device, args.sim_backend),
                     *step_overrides(args, ReinFlowConfig)]
        cfg = load_stage_config("finetune", preset("hopper/finetune_reflow.yaml"), overrides)
        per_iteration = cfg.train.num_envs * cfg.train.rollout_steps * 4
        cfg.train.env_steps = args.iterations * per_iteration
        start = time.time()
        trainer = Trainer(ReinFlow(cfg), tmp / f"reinflow-{layout}", progress=False)
        setup_s = time.time() - start
        agent = trainer.agent
        step = agent.train_iteration
        split: list[tuple[float, float]] = []

        def timed(iteration: int) -> dict:
            sync()
            begin = time.time()
            logs = step(iteration)
            sync()
            total = time.time() - begin
            rollout = rollout_clock[-1]
            split.append((rollout, total - rollout))
            return logs

        collect = agent.collect

        def timed_collect() -> dict:  # the rollout to its last kernel (the agent's own clock does not wait)
            sync()
            begin = time.time()
            batch = collect()
            sync()
            rollout_clock.append(time.time() - begin)
            return batch

        rollout_clock: list[float] = []
        agent.collect = timed_collect  # type: ignore[method-assign]
        agent.train_iteration = timed  # type: ignore[method-assign]
        trainer.fit()
        warm = cfg.train.critic_warmup_iterations
        actor = split[warm + 1:] or split[-1:]  # after the critic-only iterations and the first actor update
        rollout_s = sum(r for r, _ in actor) / len(actor)
        update_s = sum(u for _, u in actor) / len(actor)
        record["reinflow"][layout] = {
            "env_steps_per_iteration": agent.steps_per_iteration, "setup_s": round(setup_s, 2),
            "iterations": [[round(r, 4), round(u, 4)] for r, u in split], "rollout_s": round(rollout_s, 4),
            "update_s": round(update_s, 4), "iteration_s": round(rollout_s + update_s, 4),
            "per_80k_env_steps_s": round((rollout_s + update_s) * 81920 / agent.steps_per_iteration, 4),
            "overrides": overrides}
        print(f"ReinFlow hopper {layout}: rollout {rollout_s:.3f} s + update {update_s:.3f} s per iteration of "
              f"{agent.steps_per_iteration} env steps", flush=True)
        policy = agent.policy
        trainer.close()
    policy.eval()
    evals = {}
    for backend in ("warp", "cpu") if args.device != "cpu" and args.sim_backend == "warp" else ("cpu",):
        evaluator = Evaluator("Hopper", backend=backend, device=args.device)
        evals[backend] = time_evaluations(lambda: evaluator(policy, 4, 10, seed=900000))
        evaluator.close()
    auto = Evaluator("Hopper", backend="auto", device=args.device)
    # what training's evaluations take (a baseline without Evaluator.backend_for resolved "auto" for every size)
    default = (auto.backend_for(10) if hasattr(auto, "backend_for")
               else resolve_backend("Hopper", "auto", args.device))
    default = default if default in evals else next(iter(evals))
    record["eval_hopper_10"] = {"seconds": evals, "warm_s": min(evals[default][1:]), "default_backend": default,
                                "warm_s_by_backend": {b: min(v[1:]) for b, v in evals.items()}}
    print(f"evaluation of 10 Hopper episodes at K=4: {evals} s", flush=True)


def part_physics(args: argparse.Namespace, record: dict) -> None:
    """Hopper on MuJoCo Warp without a policy: seconds per env step (4 physics steps) at each world count,
    the physics alone (the captured graph) and through ``step_chunk`` (task terms, resets)."""
    import torch

    from flowrl.envs import make

    out = {}
    for n in args.worlds:
        env = make("Hopper", n, backend="warp", device=args.device, seed=0)
        env.reset()
        zeros = torch.zeros((n, 4, env.act_dim), device=env.device)
        for _ in range(3):
            env.step_chunk(zeros)
            env._simulate()
        sync()
        begin = time.time()
        for _ in range(40):
            env._simulate()
        sync()
        physics = (time.time() - begin) / 40
        begin = time.time()
        for _ in range(10):
            env.step_chunk(zeros)
        sync()
        stepped = (time.time() - begin) / 40
        env.close()
        out[str(n)] = {"physics_s_per_env_step": round(physics, 6), "step_chunk_s_per_env_step": round(stepped, 6),
                       "env_steps_per_s": round(n / stepped)}
        print(f"Hopper warp {n} worlds: physics {1000 * physics:.2f} ms, step_chunk {1000 * stepped:.2f} ms per env "
              f"step ({n / stepped:.0f} env steps/s)", flush=True)
    record["physics"] = out


def part_mle(args: argparse.Namespace, record: dict, tmp: Path) -> None:
    from flowrl.agents.mle import MLEConfig, MLEFineTuning
    from flowrl.config import load_stage_config
    from flowrl.training import Trainer

    init = pretrained_hopper(args, tmp / "init")
    overrides = [f"seed={args.seed}", f"device={args.device}", f"init={init}", f"train.steps={args.mle_steps}",
                 "train.eval_every=0", f"train.checkpoint_every={args.mle_steps}",
                 *step_overrides(args, MLEConfig)]
    cfg = load_stage_config("finetune", preset("hopper/finetune_mle.yaml"), overrides)
    loop_s = timed_fit(Trainer(MLEFineTuning(cfg), tmp / "mle", progress=False))
    record["mle"] = {"steps": args.mle_steps, "loop_s": round(loop_s, 3),
                     "steps_per_s": round(args.mle_steps / loop_s, 1), "overrides": overrides}
    print(f"MLE hopper: {record['mle']['steps_per_s']:.0f} steps/s", flush=True)


# -- demonstrations to the published return -------------------------------------------------------------
def part_e2e(args: argparse.Namespace, record: dict, tmp: Path) -> None:
    common = [f"seed={args.seed}", f"device={args.device}"]
    start = time.time()
    pre = subprocess.run([*FLOWRL_CLI, "pretrain", str(preset("hopper/pretrain_reflow.yaml")), "--out",
                          str(tmp / "e2e-pretrain"), "--quiet", "--no-eval", *common, "train.eval_every=0",
                          *([f"train.steps={args.e2e_pretrain_steps}"] if args.e2e_pretrain_steps else []),
                          f"data.path={REPO / 'data/hopper-medium.hdf5'}"], capture_output=True, text=True, cwd=tmp)
    pretrain_s = time.time() - start
    if pre.returncode:
        raise RuntimeError(f"pretrain failed: {pre.stderr[-2000:]}")
    ft = subprocess.run([*FLOWRL_CLI, "finetune", str(preset("hopper/finetune_reflow.yaml")), "--init",
                         str(tmp / "e2e-pretrain"), "--out", str(tmp / "e2e-finetune"), "--quiet", "--no-eval",
                         *common, *layout_overrides(args.e2e_layout, args.device),
                         f"train.stop_at_score={args.e2e_target}",
                         f"train.eval_every={args.e2e_eval_every}", "train.eval_episodes=20",
                         f"train.env_steps={args.e2e_env_steps}"], capture_output=True, text=True, cwd=tmp)
    total_s = time.time() - start
    if ft.returncode:
        raise RuntimeError(f"finetune failed: {ft.stderr[-2000:]}")
    said = (ft.stdout + "\n" + ft.stderr).splitlines()
    lines = [line for line in said if "eval return" in line]
    reached = any("reached train.stop_at_score" in line for line in said)
    record["e2e"] = {"pretrain_s": round(pretrain_s, 1), "total_s": round(total_s, 1), "reached": reached,
                     "target": args.e2e_target, "evaluations": lines[-30:]}
    print(f"demonstrations -> {args.e2e_target:g}: {total_s:.1f} s (pretrain {pretrain_s:.1f} s), "
          f"reached: {reached}", flush=True)


# -- profile -------------------------------------------------------------------------------------------
def part_profile(args: argparse.Namespace, tmp: Path) -> None:
    """torch.profiler tables of BC steps, ReinFlow iterations and an evaluation (``--profile-dir``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from flowrl.agents.bc import BehaviorCloning
    from flowrl.agents.reinflow import ReinFlow
    from flowrl.config import load_stage_config
    from flowrl.training import Trainer

    out = Path(args.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"

    def table(prof: Any, name: str) -> None:
        text = prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70)
        text2 = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
        (out / f"{name}.txt").write_text(text + "\n\n" + text2)

    cfg = load_stage_config("pretrain", preset("hopper/pretrain_reflow.yaml"),
                            [f"device={args.device}", "train.steps=400", "train.eval_every=0"])
    cfg.data.path = str(REPO / cfg.data.path)
    trainer = Trainer(BehaviorCloning(cfg), tmp / "prof-bc", progress=False)
    for i in range(100):
        trainer.agent.train_iteration(i)
    sync()
    with profile(activities=acts) as prof:
        for i in range(100, 200):
            trainer.agent.train_iteration(i)
        sync()
    table(prof, "bc_100_steps")
    trainer.close()
    init = pretrained_hopper(args, tmp / "prof-init")
    cfg = load_stage_config("finetune", preset("hopper/finetune_reflow.yaml"),
                            [f"device={args.device}", f"init={init}", "train.eval_every=0",
                             f"train.env_steps={6 * 81920}", *layout_overrides(ROLLOUT, args.device)])
    trainer = Trainer(ReinFlow(cfg), tmp / "prof-rf", progress=False)
    agent = trainer.agent
    for i in range(3):
        agent.iteration = i
        agent.train_iteration(i)
    sync()
    with profile(activities=acts) as prof:
        agent.collect()
        sync()
    table(prof, "reinflow_rollout")
    batch = agent.collect()
    with profile(activities=acts) as prof:
        agent.update(batch)
        sync()
    table(prof, "reinflow_update")
    trainer.evaluate(4, 10)
    with profile(activities=acts) as prof:
        trainer.evaluate(4, 10)
        sync()
    table(prof, "eval_hopper_10")
    trainer.close()
    print(f"profiles written to {out}", flush=True)


# -- report --------------------------------------------------------------------------------------------
def summary(rec: dict) -> dict[str, Any]:
    bc = rec.get("bc", {})
    out: dict[str, Any] = {"bc_hopper_steps_per_s": bc.get("hopper", {}).get("steps_per_s"),
                           "bc_hopper_steady_steps_per_s": bc.get("hopper", {}).get("steady_steps_per_s"),
                           "bc_square_steps_per_s": bc.get("square", {}).get("steps_per_s"),
                           "bc_pixels_steps_per_s": bc.get("pixels", {}).get("steps_per_s")}
    for layout, r in rec.get("reinflow", {}).items():
        out[f"reinflow_{layout}_rollout_s"] = r.get("rollout_s")
        out[f"reinflow_{layout}_update_s"] = r.get("update_s")
        out[f"reinflow_{layout}_per_80k_s"] = r.get("per_80k_env_steps_s")
    out["reinflow_iteration_s"] = rec.get("reinflow", {}).get(ROLLOUT, {}).get("per_80k_env_steps_s")
    for backend, seconds in rec.get("eval_hopper_10", {}).get("warm_s_by_backend", {}).items():
        out[f"eval_hopper_10_{backend}_s"] = seconds
    out["eval_hopper_10_s"] = rec.get("eval_hopper_10", {}).get("warm_s")
    for n, r in rec.get("physics", {}).items():
        out[f"physics_{n}_worlds_ms_per_env_step"] = round(1000 * r["physics_s_per_env_step"], 3)
    out["mle_steps_per_s"] = rec.get("mle", {}).get("steps_per_s")
    out["e2e_s"] = rec.get("e2e", {}).get("total_s") if rec.get("e2e", {}).get("reached") else None
    return out


def checks(rec: dict) -> list[tuple[str, bool]]:
    s = summary(rec)
    out = []
    for key, target in TARGETS.items():
        value = s.get(key)
        if value is None or (key == "reinflow_iteration_s" and rec.get("sim_backend", "warp") != "warp"):
            continue
        ok = value >= target if key.endswith("per_s") else value <= target
        out.append((f"{key} = {value} ({'>=' if key.endswith('per_s') else '<='} {target:g}) on {rec['machine']}", ok))
    if "e2e" in rec and not rec["e2e"].get("reached"):
        out.append((f"Hopper did not reach {PUBLISHED_HOPPER:.0f} in the end-to-end run", False))
    return out


def report(folder: Path) -> int:
    records = sorted(folder.glob("*.json"))
    if not records:
        print(f"no results in {folder}", file=sys.stderr)
        return 2
    recs = [json.loads(p.read_text()) for p in records]
    keys: list[str] = []
    for r in recs:
        keys += [k for k in summary(r) if k not in keys]
    width = max(len(k) for k in keys)
    print(f"{'':<{width}} " + " ".join(f"{p.stem:>14}" for p in records))
    print(f"{'commit':<{width}} " + " ".join(f"{r['commit'][:14]:>14}" for r in recs))
    for k in keys:
        vals = [summary(r).get(k) for r in recs]
        print(f"{k:<{width}} " + " ".join(f"{'-' if v is None else v:>14}" for v in vals))
    for p, r in zip(records, recs):
        print(f"{p.stem}: {r['machine']}, torch {r['torch']}, {r.get('command', '')}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["bc", "reinflow", "mle", "physics", "e2e"],
                    choices=["bc", "reinflow", "mle", "physics", "e2e", "profile"])
    ap.add_argument("--tag", default="run", help="the record's name: training_speed/<tag>.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--cuda-graph", choices=["default", "on", "off"], default="default",
                    help="train.cuda_graph for BC and ReinFlow (default: the presets')")
    ap.add_argument("--compile", action="store_true", help="behaviour cloning with train.compile=true")
    ap.add_argument("--bc-steps", type=int, default=3000)
    ap.add_argument("--pixel-steps", type=int, default=300)
    ap.add_argument("--init-steps", type=int, default=2000, help="BC steps of the ReinFlow/MLE starting policy")
    ap.add_argument("--iterations", type=int, default=8, help="ReinFlow iterations timed (80k env steps each)")
    ap.add_argument("--layouts", nargs="+", default=["2048x10", ROLLOUT],
                    help="ReinFlow rollouts timed, <envs>x<decisions> (4 actions per decision)")
    ap.add_argument("--sim-backend", choices=["warp", "cpu"], default="warp",
                    help="the ReinFlow rollouts' simulator (cpu: the update's timing on a machine without MuJoCo Warp)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2048, 4096, 8192, 16384],
                    help="world counts of the physics-only timing")
    ap.add_argument("--mle-steps", type=int, default=1000)
    ap.add_argument("--e2e-target", type=float, default=PUBLISHED_HOPPER, help="the end-to-end run's target return")
    ap.add_argument("--e2e-layout", default=ROLLOUT, help="the end-to-end fine-tuning's rollout, <envs>x<decisions>")
    ap.add_argument("--e2e-pretrain-steps", type=int, help="behaviour-cloning steps of the end-to-end run "
                    "(default: the preset's)")
    ap.add_argument("--e2e-env-steps", type=int, default=20_000_000, help="the end-to-end run's budget cap")
    ap.add_argument("--e2e-eval-every", type=int, default=8, help="iterations between the end-to-end evaluations")
    ap.add_argument("--profile-dir", default="training_speed_profile")
    ap.add_argument("--configs", help="the presets' folder (default: this checkout's configs/; a baseline "
                    "installed elsewhere needs the presets of its own commit)")
    ap.add_argument("--code-commit", help="the commit of the flowrl under test, when it is not this checkout's "
                    "(a baseline installed elsewhere)")
    ap.add_argument("--report", action="store_true", help="print the table of every record and exit")
    args = ap.parse_args()
    folder = results_dir() / "training_speed"
    if args.report:
        return report(folder)
    if args.configs:
        CONFIGS[0] = Path(args.configs).resolve()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda, but this torch sees no CUDA device (use --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    import flowrl

    record: dict[str, Any] = {"commit": args.code_commit or provenance()["commit"], "machine": machine(),
                              "provenance": provenance(), "flowrl_from": str(Path(flowrl.__file__).parent),
                              "torch": torch.__version__,
                              "device": args.device, "cuda_graph": args.cuda_graph, "compile": args.compile,
                              "sim_backend": args.sim_backend,
                              "configs": str(CONFIGS[0]),
                              "tf32_override": os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"),
                              "command": "python benchmarks/training_speed.py " + " ".join(sys.argv[1:])}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{args.tag}.json"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for part in args.parts:
            if part == "bc":
                part_bc(args, record)
            elif part == "reinflow":
                part_reinflow(args, record, tmp)
            elif part == "mle":
                part_mle(args, record, tmp)
            elif part == "physics":
                part_physics(args, record)
            elif part == "e2e":
                part_e2e(args, record, tmp)
            elif part == "profile":
                part_profile(args, tmp)
            path.write_text(json.dumps(record, indent=2) + "\n")
    print()
    for key, value in summary(record).items():
        if value is not None:
            print(f"{key:<24} {value}")
    print(f"written to {path}")
    return report_checks(checks(record))


if __name__ == "__main__":
    sys.exit(run_main(main))
