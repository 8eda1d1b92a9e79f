"""One-step against many-step policies: head x method x K on a task, after behaviour cloning and after
fine-tuning, with each K's batch-1 ONNX Runtime latency beside it.

    python benchmarks/few_step.py --task hopper --seeds 0 1 2 [--device cuda] [--finetune-overrides train.backend=warp]
    python benchmarks/few_step.py --task square --seeds 0 1 2 --finetune-suffix _warp --device cuda
    python benchmarks/few_step.py --report benchmarks/results/few_step/few_step_square_*.json

For each seed and head (``--heads``: reflow, shortcut, meanflow), from the task's presets under
configs/<task>/ (a head without its own preset takes the reflow preset with ``policy.head=<head>``):

- ``bc``: behaviour cloning (``pretrain_<head>.yaml``; meanflow's preset sets K = 1);
- ``bc+grid``: the optimal Euler grids of K = 2 and 4 for the cloned policy (``flowrl distill --grid``,
  into a copy), reflow and shortcut;
- ``bc+distill``: the cloned policy distilled into a one-step student (``flowrl distill --k 1``),
  reflow and shortcut;
- ``reinflow``: ReinFlow from the cloned policy (``finetune_<head><suffix>.yaml``, else the reflow preset;
  meanflow with ``train.k=1``, its one-step chain);
- ``reinflow+distill``: the fine-tuned policy distilled into a one-step student, reflow and shortcut.

Every policy is evaluated at K = 1, 2 and 4 on the final evaluation's seeds (``--episodes``; robosuite
tasks end episodes at their first success); a step's budget can be cut for a trial
(``--pretrain-steps``, ``--finetune-env-steps``, ``--distill-steps``). The ONNX latency of each K:
ONNX Runtime's batch-1 inference of the cloned reflow policy exported at that K, and its matmul floor,
on this machine (benchmarks/deploy_latency.py's measurement; latency depends on K, not on the weights).

Targets (exit code 1 when one is missed), on the mean over seeds, both after behaviour cloning (methods
``bc*``) and after fine-tuning (``reinflow*``): the best one-step policy within 2% of the best K = 4
return (Hopper, Walker2d), within 1 point of the best K = 4 success rate (Can, Square).
Writes benchmarks/results/few_step/few_step_<task>[_<tag>].json (seeds run as separate processes are
merged by ``--report``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, in_repo, merge_results, report_checks, run_main, write_result  # noqa: E402
from deploy_latency import inference_against_floor  # noqa: E402

from flowrl.agents.distill import write_time_grids  # noqa: E402
from flowrl.checkpoint import load_policy, resolve_checkpoint  # noqa: E402
from flowrl.config import load_stage_config  # noqa: E402
from flowrl.deploy.export import export  # noqa: E402
from flowrl.evaluation import Evaluator  # noqa: E402
from flowrl.registry import agent_info  # noqa: E402
from flowrl.training import Trainer  # noqa: E402

TASKS = {"hopper": "return", "walker2d": "return", "can": "success", "square": "success"}
"""The folder under configs/ of each task, and what its score is."""
HEADS = ("reflow", "shortcut", "meanflow")
KS = (1, 2, 4)
METHODS = ("bc", "bc+grid", "bc+distill", "reinflow", "reinflow+distill")
ONE_STEP_HEADS = ("meanflow",)
"""Heads that are one-step by construction: no grid or distillation of theirs is made."""


def preset(task: str, stage: str, head: str, suffix: str = "") -> tuple[Path, list[str]]:
    """The preset of ``stage`` for ``head`` on ``task`` and the overrides that adapt another head's."""
    folder = REPO / "configs" / task
    own = folder / f"{stage}_{head}{suffix}.yaml"
    if own.is_file():
        return own, []
    base = folder / f"{stage}_reflow{suffix}.yaml"
    if stage == "pretrain":
        return base, [f"policy.head={head}"] + (["policy.k=1"] if head in ONE_STEP_HEADS else [])
    return base, ["train.k=1"] if head in ONE_STEP_HEADS else []


def train(stage: str, presets: list[Path], overrides: list[str], out: Path) -> Path:
    """A run of the algorithm the config names, without its final evaluation; the checkpoint its folder
    stands for."""
    cfg = load_stage_config(stage, presets or None, overrides)
    if stage == "pretrain":
        cfg.data.path = str(in_repo(cfg.data.path))
    trainer = Trainer(agent_info(stage, cfg.algo).agent_class()(cfg), out, progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return resolve_checkpoint(out)


def distill(init: Path, out: Path, seed: int, args: argparse.Namespace) -> Path:
    overrides = ["algo=distill", f"init={init}", "train.k=1", f"seed={seed}", f"device={args.device}",
                 "train.eval_every=0"]
    if args.distill_steps:
        overrides.append(f"train.steps={args.distill_steps}")
    return train("finetune", [], overrides, out)


def policies_of_seed(task: str, seed: int, args: argparse.Namespace, runs: Path) -> dict[tuple[str, str], Path]:
    """Every (head, method) policy of one seed: its checkpoint."""
    common = [f"seed={seed}", f"device={args.device}", "train.eval_every=0"]
    made: dict[tuple[str, str], Path] = {}
    for head in args.heads:
        path, extra = preset(task, "pretrain", head)
        steps = [f"train.steps={args.pretrain_steps}"] if args.pretrain_steps else []
        bc = made[head, "bc"] = train("pretrain", [path], [*extra, *common, *steps], runs / f"{head}-bc")
        few = head not in ONE_STEP_HEADS
        if few and "bc+grid" in args.methods:
            write_time_grids(bc, [2, 4], runs / f"{head}-bc-grid", seed=seed)
            made[head, "bc+grid"] = runs / f"{head}-bc-grid"
        if few and "bc+distill" in args.methods:
            made[head, "bc+distill"] = distill(bc, runs / f"{head}-bc-distill", seed, args)
        if "reinflow" in args.methods or "reinflow+distill" in args.methods:
            path, extra = preset(task, "finetune", head, args.finetune_suffix)
            budget = [f"train.env_steps={args.finetune_env_steps}"] if args.finetune_env_steps else []
            ft = train("finetune", [path], [*extra, f"init={bc}", *common, *budget, *args.finetune_overrides],
                       runs / f"{head}-reinflow")
            made[head, "reinflow"] = ft
            if few and "reinflow+distill" in args.methods:
                made[head, "reinflow+distill"] = distill(ft, runs / f"{head}-reinflow-distill", seed, args)
    return made


def evaluate_all(task: str, made: dict[tuple[str, str], Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each policy at every K of :data:`KS`: its mean return (and success rate)."""
    rows = []
    first = load_policy(next(iter(made.values())), "cpu")[1]
    evaluator = Evaluator(first["task"], backend=args.eval_backend, device=args.eval_device,
                          end_on_success=TASKS[task] == "success")
    try:
        for (head, method), folder in made.items():
            policy, _ = load_policy(folder, args.eval_device)
            for k in KS:
                r = evaluator(policy, k, args.episodes)
                rows.append({"head": head, "method": method, "k": k, "return_mean": r["return_mean"],
                             "success_rate": r.get("success_rate"), "checkpoint": str(folder),
                             "time_grid": policy.time_grid(k)})
                print(f"{head:<9}{method:<18}K={k}  return {r['return_mean']:9.1f}"
                      + (f"  success {100 * r['success_rate']:5.1f}%" if "success_rate" in r else ""), flush=True)
    finally:
        evaluator.close()
    return rows


def latencies(checkpoint: Path, iters: int) -> dict[str, dict]:
    """ONNX Runtime batch-1 inference of ``checkpoint`` exported at each K, against its matmul floor."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="few-step-") as tmp:
        for k in KS:
            path = Path(tmp) / f"k{k}.onnx"
            export(checkpoint, path, "onnx", k=k)
            out[str(k)] = inference_against_floor(path, checkpoint, k, iters)
    return out


def score(row: dict[str, Any], kind: str) -> float:
    return 100 * row["success_rate"] if kind == "success" else row["return_mean"]


def table(record: dict[str, Any]) -> tuple[list[str], list[tuple[str, bool]]]:
    """The head x method x K table (mean +- std over seeds) and the targets' checks."""
    kind = TASKS[record["task"]]
    cells: dict[tuple[str, str, int], list[float]] = {}
    for seed in record["seeds"]:
        for row in seed["rows"]:
            cells.setdefault((row["head"], row["method"], row["k"]), []).append(score(row, kind))
    lat = record["seeds"][0].get("latency", {})
    header = "head      method            " + "".join(
        f"K={k} ({lat[str(k)]['onnx']['p50_ms']:.3f} ms)".rjust(22) if str(k) in lat else f"K={k}".rjust(22) for k in KS)
    lines = [f"{record['task']}: {'success %' if kind == 'success' else 'return'}, mean +- std over "
             f"{len(record['seeds'])} seed(s); ONNX Runtime batch-1 p50 per K", header]
    for head, method in dict.fromkeys((h, m) for h, m, _ in cells):
        values = []
        for k in KS:
            v = cells.get((head, method, k), [])
            spread = statistics.pstdev(v) if len(v) > 1 else 0.0
            values.append(f"{statistics.mean(v):.1f} +- {spread:.1f}".rjust(22) if v else "".rjust(22))
        lines.append(f"{head:<10}{method:<18}" + "".join(values))
    checks = []
    for stage, prefix in (("after behaviour cloning", "bc"), ("after fine-tuning", "reinflow")):
        means = {key: statistics.mean(v) for key, v in cells.items() if key[1].startswith(prefix)}
        one = [v for (_, _, k), v in means.items() if k == 1]
        four = [v for (_, _, k), v in means.items() if k == 4]
        if not one or not four:
            continue
        best1, best4 = max(one), max(four)
        if kind == "success":
            checks.append((f"{stage}: best one-step success {best1:.1f}% within 1 point of the best K=4 {best4:.1f}%",
                           best1 >= best4 - 1.0))
        else:
            checks.append((f"{stage}: best one-step return {best1:.1f} within 2% of the best K=4 {best4:.1f}",
                           best1 >= best4 - 0.02 * abs(best4)))
    return lines, checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper", choices=list(TASKS), help="folder under configs/")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--pretrain-steps", type=int, help="override train.steps of the pretraining presets")
    ap.add_argument("--finetune-env-steps", type=int, help="override train.env_steps of the fine-tuning presets")
    ap.add_argument("--finetune-suffix", default="", help="fine-tuning presets finetune_<head><suffix>.yaml "
                    "(e.g. _warp for Can and Square on MuJoCo Warp)")
    ap.add_argument("--finetune-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more overrides of every fine-tuning, e.g. train.backend=warp train.num_envs=2048")
    ap.add_argument("--distill-steps", type=int, help="override train.steps of the distillations")
    ap.add_argument("--episodes", type=int, default=50, help="evaluation episodes per policy and K")
    ap.add_argument("--device", default="auto", help="device of training")
    ap.add_argument("--eval-device", default="cpu", help="device of the evaluated policies")
    ap.add_argument("--eval-backend", default="auto")
    ap.add_argument("--latency-iters", type=int, default=2000, help="timed ONNX calls per K (0: no latency)")
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="only merge these results files and report")
    args = ap.parse_args()
    if args.report:
        records = merge_results(args.report).values()
    else:
        record: dict[str, Any] = {"task": args.task, "heads": args.heads, "methods": args.methods,
                                  "episodes": args.episodes, "seeds": []}
        for seed in args.seeds:
            runs = Path(args.runs) / f"few-step-{args.task}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
            made = policies_of_seed(args.task, seed, args, runs)
            entry: dict[str, Any] = {"seed": seed, "runs": str(runs), "rows": evaluate_all(args.task, made, args)}
            if args.latency_iters and ("reflow", "bc") in made:
                entry["latency"] = latencies(made["reflow", "bc"], args.latency_iters)
            record["seeds"].append(entry)
        path = write_result(f"few_step_{args.task}", record, args.tag, "few_step")
        print(f"wrote {path}")
        records = [record]
    checks = []
    for rec in records:
        lines, more = table(rec)
        print("\n" + "\n".join(lines))
        checks += more
    return report_checks(checks, require_some=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
