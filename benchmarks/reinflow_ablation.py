"""What removes ReinFlow's early collapse on locomotion, and what raises its final return: an ablation.

Every locomotion fine-tuning run first loses much of its starting return, then climbs. Each variant
below changes one thing against the preset (``base``) and fine-tunes the same behaviour-cloned
checkpoint with the same seed; every run is scored by its learning curve (deterministic-flow
evaluations every ``--eval-every`` iterations, the first at the start):

- ``min/start``: the lowest evaluation during fine-tuning as a fraction of the starting return
  (the collapse; the target is >= 0.9),
- env steps to the task's reference return (Hopper 3200, Walker2d 4300, Humanoid 5000),
- the final return after the budget.

    python benchmarks/reinflow_ablation.py --tasks hopper --variants base flow_sde critic_ev --seeds 0 \\
        --pretrained 'runs/bc/{task}-s{seed}' [--env-steps 10000000] [--eval-every 4] [--eval-episodes 10] \\
        [--device auto] [--tag NAME] [key=value overrides for every variant, e.g. train.backend=warp]
    python benchmarks/reinflow_ablation.py --report benchmarks/results/ablation/reinflow_ablation_*.json \
        [--final VARIANT]

On a GPU (one H200), as the presets run there:

    python benchmarks/reinflow_ablation.py --tasks hopper --seeds 0 --pretrained ... \\
        train.backend=warp train.num_envs=2048 train.rollout_steps=10

Writes ``benchmarks/results/ablation/reinflow_ablation_<task>[_<tag>].json`` (per variant and seed: the curve,
the overrides, wall-clock; with ``--diagnostics N`` the first N iterations' diagnostics). ``--report`` merges
files of parallel processes and prints one table per task (a row per variant, rollout layout and any further
overrides the runs trained with; the seeds of a row are its runs) and, for runs with diagnostics, how well each
diagnostic predicts the collapse (``--plot DIR`` draws them beside the curves); with ``--final VARIANT`` it checks that variant against the targets (>= 3 seeds at >= 10M env
steps): no collapse below 90% of the start on every task, the final returns (Hopper >= 3400, Walker2d
>= 5200, Humanoid >= 6000) and Hopper at 3200 within 5M env steps. Exit code 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from common import REPO, first_reaching, report_checks, run_main, write_result
from reinflow_locomotion import DIAGNOSTICS, lowest_fraction, run_seed

VARIANTS: dict[str, tuple[list[str], str]] = {
    "base": ([], "the preset"),
    "long_rollouts": (["train.num_envs=512", "train.rollout_steps=40"],
                      "4x fewer envs, 4x longer rollouts (same decisions per iteration on 2048 x 10)"),
    "mid_rollouts": (["train.num_envs=1024", "train.rollout_steps=20"],
                     "2x fewer envs, 2x longer rollouts (same decisions per iteration on 2048 x 10)"),
    "cpu_layout": (["train.num_envs=256", "train.rollout_steps=80"],
                   "the cpu preset's layout: 8x fewer envs, 8x longer rollouts (same decisions per iteration)"),
    "rollouts_160": (["train.num_envs=128", "train.rollout_steps=160"],
                     "2x fewer envs, 2x longer rollouts than the presets' 256 x 80 (the same decisions per iteration)"),
    "rollouts_40": (["train.rollout_steps=40"], "4x longer rollouts of the same envs (4x the decisions per iteration)"),
    "full_batch": (["train.minibatch_size=20480", "train.update_epochs=20"],
                   "minibatches of 20,480 decisions (all of 2048 envs x 10), 20 epochs: the reference's ~20 near-full-batch steps"),
    "target_kl": (["train.target_kl=0.00002"], "stop an update's epochs at approximate KL 2e-5 (per element)"),
    "norm_initial": (["train.logprob_normalization=mean_with_initial"],
                     "log-likelihood / ((K+1) x horizon x act_dim), as the reference"),
    "critic_ev": (["train.critic_warmup_ev=0.8"], "critic alone until its explained variance reaches 0.8"),
    "critic_long": (["train.critic_warmup_iterations=10"], "critic alone for 10 iterations"),
    "low_noise": (["train.sigma_min=0.05", "train.sigma_max=0.12"], "injected noise std in [0.05, 0.12]"),
    "flow_sde": (["train.exploration=flow_sde"], "score-corrected noisy chain: trains the deployed flow's marginals"),
    "flow_sde_critic_ev": (["train.exploration=flow_sde", "train.critic_warmup_ev=0.8"], "both"),
    "no_entropy": (["train.ent_coef=0"], "no entropy bonus: the noise head may shrink the noise where it hurts"),
    "k1": (["train.k=1"], "one Euler step (K = 1), the noise injected at it; evaluated at K = 1"),
    "last_step": (["train.exploration=last_step"],
                  "noise injected at the last Euler step only: samples Gaussian around the deployed chunk"),
    "raw_advantages": (["train.normalize_advantages=false"], "advantages in scaled-reward units, not standardised"),
    "actor_ramp": (["train.actor_lr_ramp_iterations=10"],
                   "the actor's learning rate ramped up linearly over its first 10 updating iterations"),
    "w2_anchor": (["train.w2_coef=1.0"], "W2 regulariser toward the behaviour-cloned policy's actions, weight 1"),
    "w2_strong": (["train.w2_coef=10.0"], "W2 regulariser toward the behaviour-cloned policy's actions, weight 10"),
    "tracking": (["train.tracking_coef=1.0"],
                 "the deterministic chunks regressed onto the sampled chains' ends, weight 1"),
    "dsrl": ([], "DSRL instead of ReinFlow: PPO over the frozen flow's initial noise (configs/<task>/finetune_dsrl.yaml)"),
}
PRESETS = {"dsrl": "finetune_dsrl.yaml"}
"""Variants that fine-tune from another preset of ``configs/<task>/`` than ``finetune_reflow.yaml``."""
REFERENCE = {"hopper": 3200.0, "walker2d": 4300.0, "ant": 4000.0, "humanoid": 5000.0}
FINAL_TARGET = {"hopper": 3400.0, "walker2d": 5200.0, "ant": 5300.0, "humanoid": 6000.0}


def curve_summary(task: str, curve: list[dict]) -> dict:
    """Start, lowest evaluation as a fraction of the start, env steps to the reference return, final."""
    returns = [c["return_mean"] for c in curve]
    start = returns[0]
    hit = first_reaching(curve, REFERENCE.get(task, float("inf")))
    return {"start": start, "min_fraction": lowest_fraction({"curve": curve}),
            "min_at": curve[int(np.argmin(returns))]["env_steps"], "reached_at": hit["env_steps"] if hit else None,
            "final": returns[-1], "env_steps": curve[-1]["env_steps"]}


def run_variant(task: str, variant: str, seed: int, args: argparse.Namespace, record: dict, save) -> None:
    overrides, _ = VARIANTS[variant]
    seed_args = argparse.Namespace(
        device=args.device, pretrain_steps=None, episodes=args.eval_episodes, pretrain_set=[],
        pretrained=args.pretrained, finetune_preset=PRESETS.get(variant, ""), eval_every=args.eval_every, eval_episodes=args.eval_episodes,
        sim_threads=0, overrides=[*args.overrides, *overrides], env_steps=args.env_steps, budget_minutes=0.0,
        diagnostics=args.diagnostics, tag=args.tag)
    run_seed(task, "reflow", seed, seed_args, Path(args.runs) / "ablation" / variant, record, save)
    record.update(variant=variant, **curve_summary(task, record["curve"]))


def diagnosed_points(run: dict) -> list[tuple[float, dict]]:
    """Each evaluation after the start inside a run's diagnosed iterations: its return as a fraction of the
    start, with the diagnostics of the iteration that ended just before it."""
    start = run["curve"][0]["return_mean"]
    rows = {row["env_steps"]: row for row in run.get("diagnostics", [])}
    return [(c["return_mean"] / start, rows[c["env_steps"]]) for c in run["curve"][1:]
            if start > 0 and c["env_steps"] in rows]


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among measured values); NaN for fewer than three pairs or
    a constant side, which ranks cannot order."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])


def dip_predictors(runs: list[dict]) -> list[tuple[str, float, int]]:
    """For each diagnostic, its rank correlation with the evaluation's fraction of the start over every
    (run, evaluation) pair with diagnostics: a strongly negative value for a quantity that grows as the
    deployed policy loses its return (e.g. the action drift) says it predicts the collapse."""
    points = [pt for run in runs for pt in diagnosed_points(run)]
    out = []
    for key in DIAGNOSTICS:
        pairs = [(frac, row[key]) for frac, row in points if row.get(key) is not None]
        if pairs:
            out.append((key, rank_correlation([v for _, v in pairs], [f for f, _ in pairs]), len(pairs)))
    return out


def plot_diagnostics(task: str, runs: list[dict], out_dir: Path) -> Path:
    """One figure per task: the evaluations as a fraction of the start, then each diagnostic, against env
    steps, one colour per variant and rollout layout, one line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in DIAGNOSTICS if k != "train/critic_warmup"
            and any(row.get(k) is not None for r in runs for row in r.get("diagnostics", []))]
    fig, axes = plt.subplots(len(keys) + 1, 1, figsize=(7, 1.6 * (len(keys) + 1)), sharex=True)

    def name(r: dict) -> str:
        return r.get("variant_layout", r["variant"])

    variants = sorted({name(r) for r in runs})
    colours = dict(zip(variants, plt.cm.tab10.colors))
    last = max(row["env_steps"] for r in runs for row in r.get("diagnostics", [])) if keys else None
    for r in runs:
        curve = [c for c in r["curve"] if last is None or c["env_steps"] <= last]
        start = r["curve"][0]["return_mean"]
        label = name(r) if r["seed"] == min(x["seed"] for x in runs if name(x) == name(r)) else None
        axes[0].plot([c["env_steps"] / 1e6 for c in curve], [c["return_mean"] / start for c in curve],
                     color=colours[name(r)], marker="o", ms=3, label=label)
        for ax, key in zip(axes[1:], keys):
            rows = [row for row in r.get("diagnostics", []) if row.get(key) is not None]
            ax.plot([row["env_steps"] / 1e6 for row in rows], [row[key] for row in rows], color=colours[name(r)])
    axes[0].axhline(0.9, color="grey", ls="--", lw=0.8)
    axes[0].set_ylabel("eval / start")
    axes[0].legend(fontsize=7)
    for ax, key in zip(axes[1:], keys):
        ax.set_ylabel(key.split("/")[-1].replace("_", " "), fontsize=8)
    axes[-1].set_xlabel("env steps (M)")
    axes[0].set_title(f"{task}: the first iterations of fine-tuning")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"reinflow_diagnostics_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layout(record: dict) -> str:
    """The run's rollout layout, envs x decisions per env per iteration, as the run recorded it, else from its
    overrides (the last of each key wins, as in the config; ``preset`` where it kept the preset's)."""
    if "num_envs" in record and "rollout_steps" in record:
        return f"{record['num_envs']}x{record['rollout_steps']}"
    keys = {}
    preset = REPO / "configs" / str(record.get("task", "")) / str(record.get("preset", ""))
    if record.get("preset") and preset.is_file():
        train = (yaml.safe_load(preset.read_text()) or {}).get("train", {})
        keys = {f"train.{k}": str(train[k]) for k in ("num_envs", "rollout_steps") if k in train}
    for item in record.get("overrides", []):
        key, _, value = item.partition("=")
        keys[key] = value
    if "train.num_envs" not in keys and "train.rollout_steps" not in keys:
        return "preset"
    return f"{keys.get('train.num_envs', 'preset')}x{keys.get('train.rollout_steps', 'preset')}"


RUN_KEYS = {"train.max_minutes", "train.num_envs", "train.rollout_steps", "train.sim_threads", "threads", "train.backend"}
"""Overrides that say how a run ran (its budget, threads, backend; its layout, labelled apart), not what it trained."""


def setting(record: dict) -> str:
    """The run's overrides beyond its variant's own and :data:`RUN_KEYS` (``key=value`` joined by spaces, ``train.``
    dropped), so that runs of one variant with other settings are reported apart, not merged as seeds."""
    own = set(VARIANTS.get(record.get("variant", ""), ([], ""))[0])
    extra = [o for o in record.get("overrides", []) if o not in own and o.partition("=")[0] not in RUN_KEYS]
    return " ".join(o.removeprefix("train.") for o in extra)


def row_label(record: dict) -> str:
    """``<variant> <layout>[ <setting>]``: the row a run is reported in."""
    return " ".join(x for x in (record["variant"], layout(record), setting(record)) if x)


def first_updates(run: dict, updates: int = 3) -> dict | None:
    """What the actor's first ``updates`` iterations looked like: the critic's explained variance when the
    actor starts, their mean approximate KL and the action drift after them (None without diagnostics)."""
    rows = [d for d in run.get("diagnostics", []) if d.get("train/critic_warmup") == 0.0]
    if len(rows) < updates:
        return None
    return {"ev_at_start": rows[0]["train/explained_variance"],
            "kl": float(np.mean([d["train/approx_kl"] for d in rows[:updates]])),
            "drift": rows[updates - 1]["train/action_drift"]}


def report(records: list[dict], final: str, plot_dir: str = "") -> int:
    checks = []
    records = [{**r, "variant_layout": row_label(r)} for r in records]
    tasks = sorted({r["task"] for r in records})
    for task in tasks:
        rows = [r for r in records if r["task"] == task]
        print(f"\n{task} (device: {rows[0].get('device', '?')}), reference return {REFERENCE.get(task, '-')}")
        head = (f"{'variant':<28} {'seeds':>5} {'start':>7} {'min/start':>10} {'worst':>6} {'env steps to ref':>22} "
                f"{'final':>15} {'env steps':>10} {'wall s':>7}")
        print(head)
        print("-" * len(head))
        labels = sorted({r["variant_layout"] for r in rows}, key=lambda x: (list(VARIANTS).index(x.split()[0]), x))
        for label in labels:
            variant = label.split()[0]
            runs = [r for r in rows if r["variant_layout"] == label and r.get("curve")]
            runs = [{**r, **curve_summary(task, r["curve"])} for r in runs]
            if not runs:
                continue
            fr = [r["min_fraction"] for r in runs]
            reach = ",".join("-" if r["reached_at"] is None else f"{r['reached_at'] / 1e6:.1f}M" for r in runs)
            finals = [r["final"] for r in runs]
            print(f"{label:<28} {len(runs):>5} {np.mean([r['start'] for r in runs]):>7.0f} {np.mean(fr):>10.2f} "
                  f"{min(fr):>6.2f} {reach:>22} {np.mean(finals):>7.0f} ± {np.std(finals):>5.0f} "
                  f"{min(r['env_steps'] for r in runs):>10} {np.mean([r.get('wall_clock_s', 0) for r in runs]):>7.0f}")
            if variant == final and len(runs) >= 3 and min(r["env_steps"] for r in runs) >= 10_000_000:
                checks.append((f"{task} {variant}: lowest evaluation >= 90% of the start (worst {min(fr):.2f})",
                               min(fr) >= 0.9))
                if task in FINAL_TARGET:
                    checks.append((f"{task} {variant}: final >= {FINAL_TARGET[task]:.0f} ({np.mean(finals):.0f})",
                                   np.mean(finals) >= FINAL_TARGET[task]))
                if task == "hopper":
                    ok = all(r["reached_at"] is not None and r["reached_at"] <= 5_000_000 for r in runs)
                    checks.append((f"hopper {variant}: 3200 within 5M env steps ({reach})", ok))
        for variant, (overrides, what) in VARIANTS.items():
            if any(r["variant"] == variant for r in rows):
                print(f"  {variant}: {what} {' '.join(overrides)}")
        diagnosed = [r for r in rows if r.get("diagnostics") and r.get("curve")]
        starts = [(r, first_updates(r)) for r in diagnosed]
        if any(f for _, f in starts):
            print("\nthe actor's first 3 updating iterations: the critic's explained variance when they start, their "
                  "mean approximate KL, the action drift after them; and the run's lowest evaluation / start")
            for r, f in starts:
                if f:
                    print(f"  {r['variant_layout']:<28} seed {r['seed']:<4} EV {f['ev_at_start']:>+7.2f}  "
                          f"KL {f['kl']:.1e}  drift {f['drift']:.3f}  min/start "
                          f"{curve_summary(task, r['curve'])['min_fraction']:.2f}")
        if diagnosed:
            print(f"\nwhat predicts the collapse ({len(diagnosed)} runs): rank correlation of each diagnostic with "
                  "the next evaluation's fraction of the start")
            for key, rho, n in dip_predictors(diagnosed):
                print(f"  {key:<30} {rho:>6.2f}  ({n} evaluations)")
            if plot_dir:
                print(f"  drawn: {plot_diagnostics(task, diagnosed, Path(plot_dir))}")
    return report_checks(checks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["hopper"], choices=sorted(REFERENCE))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--pretrained", help="behaviour-cloned checkpoint or run folder ({task} and {seed} filled in)")
    ap.add_argument("--env-steps", type=int, default=10_000_000)
    ap.add_argument("--eval-every", type=int, default=4, help="iterations between curve points")
    ap.add_argument("--eval-episodes", type=int, default=10, help="episodes per curve point")
    ap.add_argument("--diagnostics", type=int, default=0, metavar="N",
                    help="record the first N iterations' diagnostics (action drift, explained variance, ...)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    ap.add_argument("--tag", default="", help="suffix of the results files (parallel processes)")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="only merge these results files and report")
    ap.add_argument("--final", default="", help="the variant checked against the targets in the report")
    ap.add_argument("--plot", default="", metavar="DIR",
                    help="with --report: draw each task's evaluations and diagnostics into DIR")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the fine-tuning preset, for every variant")
    args = ap.parse_intermixed_args()
    if args.report:
        return report([r for path in args.report for r in json.loads(Path(path).read_text())["runs"]], args.final,
                      args.plot)
    if not args.pretrained:
        ap.error("--pretrained is required (a behaviour-cloned checkpoint per task and seed)")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    records: list[dict] = []
    for task in args.tasks:
        out: dict = {"task": task, "command": " ".join(sys.argv), "runs": []}
        for variant in args.variants:
            for seed in args.seeds:
                rec: dict = {"task": task, "variant": variant, "seed": seed, "device": device}
                records.append(rec)
                out["runs"].append(rec)
                started = time.time()
                run_variant(task, variant, seed, args, rec, lambda: write_result(f"reinflow_ablation_{task}", out,
                                                                                  args.tag, "ablation"))
                rec["total_s"] = round(time.time() - started, 1)
                write_result(f"reinflow_ablation_{task}", out, args.tag, "ablation")
    return report(records, args.final)


if __name__ == "__main__":
    sys.exit(run_main(main))
