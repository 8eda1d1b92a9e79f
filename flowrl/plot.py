"""Learning curves of run folders without TensorBoard: ``flowrl plot RUN [RUN ...] [--out PNG]``.

Reads each run's TensorBoard event files (every file in the folder: a resumed run writes several;
a step logged twice keeps its last value) and draws, one panel per metric that any run has,
``eval/mean_reward`` (periodic evaluations of the deterministic policy), ``eval/success_rate`` and
``rollout/ep_rew_mean`` (fine-tuning's training episodes) against the logged step (env steps for
fine-tuning, gradient steps for pretraining) or against wall-clock time since the run's first event.

What the figure shows, so that it reads right at a glance:

- Runs whose resolved configs (``config.yaml``) differ only in ``seed`` are one curve: the mean over
  seeds with a band of one standard deviation over seeds. A single run's evaluation curve has a band of
  one standard deviation over the episodes of each evaluation (``eval/std_reward``).
- The demonstrations' mean return, where a run's checkpoints record it (pretraining: the dataset's;
  fine-tuning: that of the checkpoint it started from), is a dashed horizontal line on the return panels.
- Return axes include 0 and the demonstrations' line: a drop of a few percent does not fill the panel
  and read as a collapse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowrl.errors import FlowrlError

METRICS = {
    "eval/mean_reward": "evaluation return (deterministic policy)",
    "eval/success_rate": "evaluation success rate",
    "rollout/ep_rew_mean": "training episode return",
}
"""The scalars plotted, with their panel titles, in panel order."""
RETURN_METRICS = ("eval/mean_reward", "rollout/ep_rew_mean")
"""Panels of returns: the demonstrations' line is drawn on them and their axis includes 0."""
SPREAD = {"eval/mean_reward": "eval/std_reward"}
"""Scalars holding the standard deviation over episodes of a plotted mean (a single run's band)."""
X_AXES = ("env_steps", "wall_clock")


@dataclass
class Curve:
    """One metric of one run: values at steps, and the wall-clock seconds since the run's first event."""

    steps: np.ndarray
    values: np.ndarray
    seconds: np.ndarray
    spread: np.ndarray | None = None
    """Standard deviation over the episodes behind each value, where the run logged it."""


@dataclass
class Run:
    """A run folder's curves and what tells it apart."""

    path: Path
    stage: str
    config: dict[str, Any]
    curves: dict[str, Curve]
    demonstrations: float | None = None
    """The demonstrations' mean return, where the run's checkpoints record it (:func:`demonstrations_return`)."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def read_run(path: str | Path) -> Run:
    """The plotted metrics of one run folder, from its event files and its config.yaml."""
    path = Path(path)
    if not path.is_dir():
        raise FlowrlError(f"run folder not found: {path}")
    if not any(path.glob("events.out.tfevents.*")):
        raise FlowrlError(f"{path}: no TensorBoard event files (events.out.tfevents.*); is it a run folder?")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point
    try:
        acc.Reload()
    except Exception as e:  # a torn or foreign file
        raise FlowrlError(f"{path}: cannot read its event files ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    tags = set(acc.Tags().get("scalars", []))
    events = [e for tag in tags for e in acc.Scalars(tag)]
    start = min((e.wall_time for e in events), default=0.0)
    curves = {}
    for tag in METRICS:
        if tag not in tags:
            continue
        by_step: dict[int, tuple[float, float]] = {}
        for e in acc.Scalars(tag):  # in file order: a step written again after a resume replaces the first
            by_step[int(e.step)] = (float(e.value), float(e.wall_time) - start)
        steps = np.array(sorted(by_step), dtype=np.int64)
        spread = None
        if SPREAD.get(tag) in tags:
            stds = {int(e.step): float(e.value) for e in acc.Scalars(SPREAD[tag])}
            if all(int(s) in stds for s in steps):
                spread = np.array([stds[int(s)] for s in steps])
        curves[tag] = Curve(steps, np.array([by_step[s][0] for s in steps]), np.array([by_step[s][1] for s in steps]),
                            spread)
    config: dict[str, Any] = {}
    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        from omegaconf import OmegaConf

        try:
            config = _flat(OmegaConf.to_container(OmegaConf.load(cfg_path)))
        except Exception:  # an unreadable config only costs the grouping by seed
            config = {}
    stage = "finetune" if "init" in config else ("pretrain" if config else "")
    return Run(path, stage, config, curves, demonstrations_return(path))


def demonstrations_return(path: str | Path, hops: int = 4) -> float | None:
    """The mean return of the demonstrations behind a run or checkpoint folder: the
    ``dataset_return_mean`` its checkpoints record (behaviour cloning), else, for a fine-tuning run,
    that of the checkpoint it started from (``init``), followed up to ``hops`` times. None when no
    checkpoint records one (or a file cannot be read: the line is left out, the plot is still drawn)."""
    from flowrl.checkpoint import CONFIG, resolve_checkpoint
    from flowrl.io import read_json

    folder = Path(path)
    for _ in range(hops + 1):
        try:
            config = read_json(resolve_checkpoint(folder) / CONFIG)
        except FlowrlError:
            return None
        if not isinstance(config, dict):
            return None
        value = config.get("dataset_return_mean")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            return float(value)
        init = config.get("init")
        init_path = init.get("path") if isinstance(init, dict) else init
        if not isinstance(init_path, str) or not init_path:
            return None
        folder = Path(init_path)
    return None


def group_by_seed(runs: list[Run]) -> list[list[Run]]:
    """Runs whose configs are equal in every key but ``seed``, in first-seen order (fine-tuning runs
    must also start from the same ``init``). Runs without a config.yaml stay alone."""
    groups: list[list[Run]] = []
    keys: list[Any] = []
    for run in runs:
        key = None if not run.config else sorted((k, repr(v)) for k, v in run.config.items() if k != "seed")
        for i, k in enumerate(keys):
            if key is not None and k == key:
                groups[i].append(run)
                break
        else:
            groups.append([run])
            keys.append(key)
    return groups


def _label(group: list[Run]) -> str:
    names = [r.path.resolve().name for r in group]
    if len(group) == 1:
        return names[0]
    seeds = ", ".join(str(r.config.get("seed", "?")) for r in group)
    return f"{names[0]} (+{len(group) - 1}; seeds {seeds}: mean ± std over seeds)"


def _mean_band(curves: list[Curve], x_axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x, mean, mean - std, mean + std of several seeds' curves (std over seeds, n - 1 in the
    denominator): at the steps every seed logged when plotting against steps, else on a common grid
    of the time they all ran (linear interpolation)."""
    if x_axis == "env_steps":
        common = set(curves[0].steps.tolist())
        for c in curves[1:]:
            common &= set(c.steps.tolist())
        if common:
            x = np.array(sorted(common))
            ys = np.stack([np.interp(x, c.steps, c.values) for c in curves])
            return _band(x, ys)
        xs = [c.steps.astype(float) for c in curves]
    else:
        xs = [c.seconds for c in curves]
    lo, hi = max(x[0] for x in xs), min(x[-1] for x in xs)
    x = np.linspace(lo, hi, 100) if hi > lo else np.array([lo])
    ys = np.stack([np.interp(x, xi, c.values) for xi, c in zip(xs, curves)])
    return _band(x, ys)


def _band(x: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mean, std = ys.mean(0), ys.std(0, ddof=1)
    return x, mean, mean - std, mean + std


def plot_runs(paths: list[str | Path], out: str | Path, x_axis: str = "env_steps") -> dict[str, Any]:
    """Draw the runs' learning curves into the PNG ``out`` (written atomically); returns what was
    drawn: ``{"out", "panels": [metric, ...], "groups": [[run, ...], ...], "runs", "demonstrations":
    [the demonstrations' returns drawn as lines], "ylim": {metric: (low, high)}, "figure"}``."""
    if x_axis not in X_AXES:
        raise FlowrlError(f"--x must be one of {', '.join(X_AXES)}, got '{x_axis}'")
    if not paths:
        raise FlowrlError("no run folders given")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FlowrlError("flowrl plot needs matplotlib: pip install -e '.[bench]'") from None
    runs = [read_run(p) for p in paths]
    panels = [m for m in METRICS if any(m in r.curves for r in runs)]
    if not panels:
        raise FlowrlError(f"none of the runs logged {', '.join(METRICS)} yet")
    groups = group_by_seed(runs)
    stages = {r.stage for r in runs}
    if x_axis == "wall_clock":
        xlabel = "wall-clock (minutes since the run's first event)"
    elif stages == {"finetune"}:
        xlabel = "env steps"
    elif stages == {"pretrain"}:
        xlabel = "gradient steps"
    else:
        xlabel = "step (env steps for fine-tuning, gradient steps for pretraining)"
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    demos = [sorted({r.demonstrations for r in g if r.demonstrations is not None}) for g in groups]
    distinct = sorted({d for ds in demos for d in ds})
    ylims: dict[str, tuple[float, float]] = {}
    for ax, metric in zip(axes, panels):
        drawn_values: list[np.ndarray] = []
        for i, group in enumerate(groups):
            curves = [r.curves[metric] for r in group if metric in r.curves]
            if not curves:
                continue
            color = f"C{i % 10}"
            if len(curves) == 1:  # one run: the band is the spread over its evaluation's episodes
                c = curves[0]
                x, y, label = (c.steps if x_axis == "env_steps" else c.seconds), c.values, _label(group)
                band = None if c.spread is None else (y - c.spread, y + c.spread)
                if band is not None:
                    label += " (mean ± std over episodes)"
            else:  # seeds: the band is their spread
                x, y, low, high = _mean_band(curves, x_axis)
                label, band = _label(group), (low, high)
            x_plot = x / 60.0 if x_axis == "wall_clock" else x
            ax.plot(x_plot, y, color=color, marker="o" if len(y) < 30 else None, markersize=3, label=label)
            drawn_values.append(y)
            if band is not None:
                ax.fill_between(x_plot, *band, color=color, alpha=0.2, linewidth=0)
                drawn_values += list(band)
        ax.set_title(METRICS[metric])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if metric == "eval/success_rate":
            ax.set_ylim(-0.02, 1.02)
        elif metric in RETURN_METRICS:
            one = len(distinct) == 1
            for i, values in enumerate(demos):
                for value in values:
                    ax.axhline(value, color="0.35" if one else f"C{i % 10}", linestyle="--", linewidth=1.2,
                               label=f"demonstrations ({value:.0f})" if one else
                               f"demonstrations of {groups[i][0].path.resolve().name} ({value:.0f})")
            known = np.concatenate([v[np.isfinite(v)] for v in drawn_values] + [np.array([0.0, *distinct])])
            lo, hi = float(known.min()), float(known.max())
            pad = 0.05 * (hi - lo) if hi > lo else 1.0
            ax.set_ylim(lo - pad, hi + pad)  # 0 and the demonstrations' line always in view
        ylims[metric] = (float(ax.get_ylim()[0]), float(ax.get_ylim()[1]))
    axes[0].legend(fontsize=8)
    from flowrl.io import write_atomic

    out = Path(out)
    write_atomic(out, lambda p: fig.savefig(p, format="png", dpi=110))
    return {"out": str(out), "panels": panels, "groups": [[str(r.path) for r in g] for g in groups],
            "runs": runs, "demonstrations": distinct, "ylim": ylims, "figure": fig}


def summary(runs: list[Run]) -> str:
    """One line per run and metric: its last value, at which step, and after how long; and the
    demonstrations' mean return where known."""
    lines = []
    for r in runs:
        for metric, c in r.curves.items():
            lines.append(f"{r.path}: {metric} = {c.values[-1]:.4g} at step {int(c.steps[-1])} "
                         f"({c.seconds[-1] / 60:.1f} min), {len(c.steps)} points")
        if r.demonstrations is not None:
            lines.append(f"{r.path}: demonstrations' mean return = {r.demonstrations:.4g}")
    return "\n".join(lines)
