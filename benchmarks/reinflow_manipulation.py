"""ReinFlow on robosuite's manipulation tasks, from the scripted experts' demonstrations.

For each task and seed: behaviour cloning (configs/<task>/pretrain_reflow.yaml on
data/<task>-scripted.hdf5, made by the commands in data/README.md), then ReinFlow, and success before
and after fine-tuning beside ReinFlow's published success rates; writes
benchmarks/results/manipulation/reinflow_manip_<task>[_<tag>].json (from pixels: benchmarks/results/pixels/).

Two fine-tuning presets (``--preset``):
- ``robosuite`` (configs/<task>/finetune_reflow.yaml): robosuite's own envs, one worker process each
  (~0.8 GB, one core's worth of Python): size train.num_envs and eval.max_envs to the machine.
- ``warp`` (configs/<task>/finetune_reflow_warp.yaml): the same scenes batched on MuJoCo Warp (thousands
  of envs on one GPU). The policies are then also evaluated in robosuite itself (``--robosuite-episodes``,
  where robosuite is installed); on a GPU machine without robosuite, evaluate the recorded checkpoints
  later on one that has it with ``--robosuite-eval FILE``. Run one fine-tuning per GPU: processes sharing
  one GPU time-slice it.

    python benchmarks/reinflow_manipulation.py --tasks lift can square transport --seeds 0 1 2
        [--preset robosuite|warp] [--env-steps N] [--pretrain-steps N] [--episodes 50] [--tag NAME]
        [--budget-minutes N] [--robosuite-episodes 100] [key=value overrides]
    python benchmarks/reinflow_manipulation.py --tasks can square --pixels [--seeds 0 1 2]
    python benchmarks/reinflow_manipulation.py --robosuite-eval \
        benchmarks/results/manipulation/reinflow_manip_*_warp.json
    python benchmarks/reinflow_manipulation.py --report benchmarks/results/manipulation/reinflow_manip_*.json
    python benchmarks/reinflow_manipulation.py --import-runs DIR [DIR ...] --tag NAME [--recorded-at COMMIT]

``--pixels``: the same from camera images (robomimic's ``agentview`` and ``robot0_eye_in_hand`` at 84 x 84
beside the state): configs/<task>/pretrain_reflow_pixels.yaml on data/<task>-images.hdf5, which is
collected first when missing (the scripted expert, rendered by MuJoCo Warp on a GPU or by OpenGL on the
cpu backend), then configs/<task>/finetune_reflow_pixels_warp.yaml; the robosuite evaluations render
through robosuite itself. The policies train on MuJoCo Warp's ray-traced images and are also measured on
robosuite's OpenGL ones (a few grey levels apart on average): the warp success is recorded beside the
robosuite one, so a gap between them shows the renderers' difference. Results go to
reinflow_manip_<task>_pixels_warp.json.

``--import-runs``: rows from runs made with the CLI elsewhere (one run per GPU, several GPUs at once),
from a folder of their files (as benchmarks/results/manipulation/lift_warp_runs/ holds them):
``ft_<task><seed>[_pixels]_{config.yaml,eval.json,loop.json}`` (the fine-tuning run's config, its
final evaluation and its training-loop state, whose first evaluation is the starting policy's) and
``robosuite_eval_ft_<task><seed>[_pixels]_<checkpoint>.json`` (``flowrl eval CKPT --backend robosuite
--json``: the last checkpoint's is the fine-tuned success in robosuite; ``best``'s is the pretrained one
where the run's best evaluation was its starting policy, else reported beside the last), and
``robosuite_eval_bc_<task><seed>[_pixels].json`` where the behaviour-cloned checkpoint itself was evaluated
(its success is then the pretrained one).
Writes reinflow_manip_<task>_<tag>[_pixels].json.

On a time-limited machine pass --budget-minutes N (per seed, evaluations included): fine-tuning then
stops itself in time for its final evaluations (train.max_minutes=N bounds the fine-tuning alone).
Targets (exit code 1 when missed), success after fine-tuning over 3 seeds: robosuite preset Lift 100%,
Can >= 99%, Square >= 85%; warp preset, measured in robosuite: Lift 100%, Can 100%, Square >= 95%;
from pixels, in robosuite: Can >= 99%, Square >= 90% (each run under 30 minutes on one H200). TwoArmTransport
has no target: it is reported beside ReinFlow's published rates.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from common import REPO, merge_results, provenance, report_checks, run_main, write_result
from reinflow_locomotion import add_seed_options, completed, run_seed

from flowrl.errors import FlowrlError

TASKS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare", "transport": "TwoArmTransport"}
# ReinFlow (pixels, shortcut policy) pretrained -> fine-tuned success; Gaussian PPO from scratch
PUBLISHED = {"can": (0.59, 0.987, 0.905), "square": (0.25, 0.748, 0.187), "transport": (0.30, 0.887, 0.0)}
TARGETS = {"robosuite": {"lift": 1.0, "can": 0.99, "square": 0.85},
           "warp": {"lift": 1.0, "can": 1.0, "square": 0.95},
           "pixels": {"can": 0.99, "square": 0.90}}
PRESETS = {"robosuite": "finetune_reflow.yaml", "warp": "finetune_reflow_warp.yaml"}
PIXEL_CAMERAS = ["agentview", "robot0_eye_in_hand"]
PIXEL_EPISODES = {"lift": 200, "can": 200, "square": 400}  # as many as the low-dimensional demonstrations


def collect_images(task: str, path: Path, device: str) -> None:
    """The scripted expert's demonstrations with robomimic's cameras (data/README.md's command)."""
    from flowrl.agents.collect import collect

    on_gpu = device != "cpu" and torch.cuda.is_available()
    print(f"[{task}] collecting {PIXEL_EPISODES[task]} demonstrations with {', '.join(PIXEL_CAMERAS)} into {path}",
          flush=True)
    collect("scripted", path, episodes=PIXEL_EPISODES[task], task=f"robosuite/{TASKS[task]}", seed=0,
            num_envs=PIXEL_EPISODES[task] if on_gpu else 10, backend="warp" if on_gpu else "cpu",
            device="cuda" if on_gpu else "cpu", fmt="robomimic", cameras=PIXEL_CAMERAS, image_size=84,
            progress=False, created_by="benchmarks/reinflow_manipulation.py --pixels")


def robosuite_success(checkpoint: str, task: str, episodes: int) -> float:
    """Success rate of a checkpoint's deterministic K=4 policy in robosuite itself (robomimic's rollouts:
    episodes end at their first success), seeded as ``flowrl eval``."""
    from flowrl.checkpoint import load_policy
    from flowrl.evaluation import Evaluator

    policy, _ = load_policy(checkpoint, device="cpu")
    evaluator = Evaluator(f"robosuite/{TASKS[task]}", backend="robosuite", device="cpu", end_on_success=True)
    try:
        return float(evaluator(policy, 4, episodes)["success_rate"])
    finally:
        evaluator.close()


def add_robosuite_evaluations(task: str, record: dict, episodes: int) -> None:
    """Evaluate a warp-preset seed's pretrained and fine-tuned checkpoints in robosuite, into ``record``."""
    for stage in ("pretrained", "finetuned"):
        checkpoint = record.get(f"{stage}_checkpoint")
        if checkpoint and f"{stage}_success_robosuite" not in record:
            if not Path(checkpoint).exists():
                raise FlowrlError(f"{checkpoint}: checkpoint not found (copy the runs here, keeping their paths)")
            record[f"{stage}_success_robosuite"] = robosuite_success(checkpoint, task, episodes)
            record["robosuite_episodes"] = episodes
            print(f"[{task} s{record['seed']}] {stage} in robosuite: "
                  f"{100 * record[f'{stage}_success_robosuite']:.0f}% of {episodes}", flush=True)


def robosuite_installed() -> bool:
    """Without importing it: importing robosuite changes os.environ (as envs/backends/robosuite.py notes)."""
    return importlib.util.find_spec("robosuite") is not None


def percent(rate: float, digits: int = 0) -> str:
    """A success rate as a percentage; ``-`` where it was not measured (NaN)."""
    return "-" if np.isnan(rate) else f"{100 * rate:.{digits}f}%"


def report(results: dict) -> int:
    first = next(iter(results.values()))
    preset = first.get("preset", "robosuite")
    source = "from pixels and state" if first.get("pixels") else "from state"
    cores = f", {first['cores']} CPU cores" if first.get("cores") else ""
    print(f"\nReinFlow (reflow) on robosuite's tasks {source}, {preset} preset, {first['device']}{cores}")
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
        measured_in_robosuite = preset == "warp"
        if measured_in_robosuite:
            rs_pre = [s.get("pretrained_success_robosuite", float("nan")) for s in seeds]
            post = [s.get("finetuned_success_robosuite", float("nan")) for s in seeds]
            episodes = seeds[0].get("robosuite_episodes", 0)
            print(f"  in robosuite itself ({episodes} episodes each): "
                  + ", ".join(f"{percent(a)} -> {percent(b)}" for a, b in zip(rs_pre, post))
                  + f"; mean {percent(np.mean(rs_pre), 1)} -> {percent(np.mean(post), 1)}")
            best = [s.get("best_success_robosuite") for s in seeds]
            if any(b is not None for b in best):
                print("  the runs' best checkpoints (chosen by their evaluations during training) in robosuite: "
                      + ", ".join(percent(float("nan") if b is None else b) for b in best))
        target = TARGETS["pixels" if first.get("pixels") else preset].get(task)
        if target is not None:
            where = " in robosuite" if measured_in_robosuite else ""
            ok = done and len(seeds) >= 3 and bool(np.mean(post) >= target - 1e-9)
            checks.append((f"{task} fine-tuned success{where} >= {100 * target:.0f}% over 3 seeds "
                           f"({100 * np.mean(post):.1f}%, {len(seeds)} seed(s){'' if done else ', cut short'})", ok))
    return report_checks(checks, require_some=True)


def evaluate_in_robosuite(paths: list[str], episodes: int) -> int:
    """``--robosuite-eval``: fill in the robosuite success of warp-preset results files, in place."""
    if not robosuite_installed():
        raise FlowrlError("--robosuite-eval needs robosuite (see the README's robosuite section)")
    for path in paths:
        rec = json.loads(Path(path).read_text())
        for seed in rec["seeds"]:
            add_robosuite_evaluations(rec["task"], seed, episodes)
            rec["robosuite_eval_provenance"] = provenance()  # the training's own provenance stays as written
            Path(path).write_text(json.dumps(rec, indent=2) + "\n")
    return report(merge_results(paths))


def study(pixels: bool) -> str:
    """The results folder of a record: pixel policies' apart from state-only ones."""
    return "pixels" if pixels else "manipulation"


RUN_FILE = re.compile(r"ft_(?P<task>[a-z]+)(?P<seed>\d+)(?P<pixels>_pixels)?_eval\.json")


def import_seed(folder: Path, run: str, seed: int) -> dict:
    """One seed's record from a fine-tuning run's files in ``folder`` (see ``--import-runs``)."""
    try:
        return _import_seed(folder, run, seed)
    except (KeyError, IndexError, TypeError) as err:
        raise FlowrlError(f"{folder / run}_*: not the files of a fine-tuning run ({type(err).__name__}: {err})") from None


def _import_seed(folder: Path, run: str, seed: int) -> dict:
    def read(name: str) -> dict:
        try:
            return json.loads((folder / name).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FlowrlError(f"{folder / name}: {err}") from None

    final = read(f"{run}_eval.json")["evaluations"][-1]
    loop = read(f"{run}_loop.json")
    history = loop.get("eval_history") or []
    if not history or history[0].get("iteration") != 0:
        raise FlowrlError(f"{folder / (run + '_loop.json')}: no evaluation of the starting policy (iteration 0)")
    config_path = folder / f"{run}_config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(config_path)) if config_path.is_file() else {}
    if config and config.get("seed") != seed:
        raise FlowrlError(f"{folder / (run + '_config.yaml')}: seed {config.get('seed')}, but the file name says {seed}")
    result = final["results"][0]
    record = {"seed": seed, "pretrained_success": history[0]["success_rate"],
              "finetuned_success": result["success_rate"], "finetuned_episodes": result["episodes"],
              "env_steps": int(final["step"]), "wall_clock_s": round(float(loop.get("wall_clock", 0.0)), 1),
              "iterations": int(loop.get("iteration", 0)), "eval_history": history,
              "imported_from": _shown(folder / run)}
    if config:
        record["pretrained_episodes"] = config.get("train", {}).get("eval_episodes")
        record["max_minutes"] = config.get("train", {}).get("max_minutes")
    last, best = folder / f"robosuite_eval_{run}_{final['step']}.json", folder / f"robosuite_eval_{run}_best.json"
    if last.is_file():
        rs = read(last.name)["results"][0]
        record.update(finetuned_success_robosuite=rs["success_rate"], robosuite_episodes=rs["episodes"],
                      finetuned_length_robosuite=rs["length_mean"])
    cloned = folder / f"robosuite_eval_{run.replace('ft_', 'bc_', 1)}.json"
    if cloned.is_file():  # the behaviour-cloned checkpoint itself, evaluated in robosuite
        rs = read(cloned.name)["results"][0]
        record.update(pretrained_success_robosuite=rs["success_rate"], robosuite_episodes=rs["episodes"])
    if best.is_file():
        rs = read(best.name)["results"][0]
        if loop.get("best_step") == 0 and not cloned.is_file():
            record.update(pretrained_success_robosuite=rs["success_rate"], robosuite_episodes=rs["episodes"])
        else:
            record.update(best_success_robosuite=rs["success_rate"], best_step=loop.get("best_step"))
    return record


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def import_runs(folders: list[str], tag: str, recorded_at: str = "") -> int:
    """``--import-runs``: write results files from fine-tuning runs' files, then report them. Their provenance
    is the runs' (the GPU named in the folder's gpu.txt, ``recorded_at``: the commit of the code they ran, as
    given), with this import's beside it."""
    if not tag:
        raise FlowrlError("--import-runs needs --tag (the suffix of the results files it writes)")
    records: dict[tuple[str, bool], dict] = {}
    for name in folders:
        folder = Path(name)
        runs = sorted((m for m in map(RUN_FILE.fullmatch, (p.name for p in folder.glob("ft_*_eval.json"))) if m),
                      key=lambda m: (m["task"], bool(m["pixels"]), int(m["seed"])))
        if not runs:
            raise FlowrlError(f"{folder}: no ft_<task><seed>[_pixels]_eval.json files")
        device = (folder / "gpu.txt").read_text().split(",")[0].strip() if (folder / "gpu.txt").is_file() else "?"
        for m in runs:
            if m["task"] not in TASKS:
                raise FlowrlError(f"{folder / m.group(0)}: unknown task {m['task']!r} (one of {', '.join(TASKS)})")
            pixels = bool(m["pixels"])
            rec = records.setdefault((m["task"], pixels), {
                "task": m["task"], "robosuite_task": TASKS[m["task"]], "device": device, "cores": None,
                "preset": "warp", "pixels": pixels, "seeds": [],
                "provenance": {"commit": recorded_at or "unknown", "gpu": device, "imported": provenance()}})
            rec["seeds"].append(import_seed(folder, m.group(0)[: -len("_eval.json")], int(m["seed"])))
    written: dict[bool, list[str]] = {False: [], True: []}  # state rows and pixel rows get a table each
    for (task, pixels), rec in records.items():
        path = write_result(f"reinflow_manip_{task}", rec, f"{tag}_pixels" if pixels else tag, study(pixels))
        written[pixels].append(str(path))
        print(f"wrote {path}")
    status = 0
    for paths in written.values():
        if paths:
            status |= report(merge_results(paths))
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", choices=list(PRESETS), default="robosuite",
                    help="fine-tune in robosuite's worker processes or on the warp backend (see above)")
    ap.add_argument("--pixels", action="store_true",
                    help="from camera images: the *_pixels presets, the warp backend (see above)")
    ap.add_argument("--env-steps", type=int, help="override train.env_steps of the presets")
    ap.add_argument("--pretrain-steps", type=int, help="override train.steps of the pretraining presets")
    add_seed_options(ap)
    ap.add_argument("--episodes", type=int, default=50, help="episodes of the evaluations before and after")
    ap.add_argument("--robosuite-episodes", type=int, default=100,
                    help="warp preset: episodes of each evaluation in robosuite itself (0: none)")
    ap.add_argument("--eval-every", type=int, default=5, help="iterations between curve points")
    ap.add_argument("--eval-episodes", type=int, default=25, help="episodes per curve point")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    ap.add_argument("--tag", default="", help="suffix of the results file (parallel processes)")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="only merge these results files and report")
    ap.add_argument("--robosuite-eval", nargs="+", metavar="JSON",
                    help="evaluate the checkpoints of these warp-preset results files in robosuite, then report")
    ap.add_argument("--import-runs", nargs="+", metavar="DIR",
                    help="rows from fine-tuning runs' files in these folders (see above); needs --tag")
    ap.add_argument("--recorded-at", default="", metavar="COMMIT",
                    help="with --import-runs: the commit of the code the imported runs ran (named in their provenance)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the fine-tuning preset")
    args = ap.parse_intermixed_args()  # key=value overrides may come before or after options
    args.head, args.sim_threads = ("reflow_pixels" if args.pixels else "reflow"), 0
    if args.pixels:
        args.preset = "warp"
    args.finetune_preset = "finetune_reflow_pixels_warp.yaml" if args.pixels else PRESETS[args.preset]

    if args.report:
        return report(merge_results(args.report))
    if args.robosuite_eval:
        return evaluate_in_robosuite(args.robosuite_eval, args.robosuite_episodes)
    if args.import_runs:
        return import_runs(args.import_runs, args.tag, args.recorded_at)
    results: dict = {}
    if args.pixels:
        unsupported = [t for t in args.tasks if not (REPO / "configs" / t / "pretrain_reflow_pixels.yaml").is_file()]
        if unsupported:
            print(f"error: no pixel presets for {', '.join(unsupported)} (configs/<task>/*_pixels*.yaml)", file=sys.stderr)
            return 2
        for t in args.tasks:
            if not (REPO / "data" / f"{t}-images.hdf5").is_file():
                collect_images(t, REPO / "data" / f"{t}-images.hdf5", args.device)
    missing = [t for t in args.tasks if not (REPO / "data" / f"{t}-scripted.hdf5").is_file()]
    if missing and not args.pixels:
        print(f"error: no demonstrations for {', '.join(missing)}: make them with the commands in data/README.md",
              file=sys.stderr)
        return 2
    in_robosuite = args.preset == "warp" and args.robosuite_episodes > 0
    if in_robosuite and not robosuite_installed():
        print("robosuite is not installed here: the robosuite evaluations are left for "
              "`--robosuite-eval <results file>` on a machine that has it", file=sys.stderr)
        in_robosuite = False
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    tag = args.tag or ("pixels_warp" if args.pixels else "warp" if args.preset == "warp" else "")
    for task in args.tasks:
        rec = {"task": task, "robosuite_task": TASKS[task], "device": device, "cores": os.cpu_count(),
               "preset": args.preset, "pixels": args.pixels, "seeds": []}
        results[task] = rec
        for seed in args.seeds:
            srec: dict = {"seed": seed}
            rec["seeds"].append(srec)
            save = lambda: write_result(f"reinflow_manip_{task}", rec, tag, study(args.pixels))  # noqa: E731
            run_seed(task, args.head, seed, args, Path(args.runs), srec, save)
            if in_robosuite:
                add_robosuite_evaluations(task, srec, args.robosuite_episodes)
            save()
    return report(results)


if __name__ == "__main__":
    sys.exit(run_main(main))
