"""The JSON that travels with an exported policy (``<export file>.json``) and its checks.

What a controller must know to run an export: task, dims, K, horizon, act_steps, obs_history,
head (and the shortcut step size), observation layout, action bounds, flowrl version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flowrl
from flowrl.errors import FlowrlError
from flowrl.io import read_json

META_FORMAT = "flowrl.export/1"


def export_metadata(policy: Any, config: dict[str, Any], num_steps: int, fmt: str) -> dict[str, Any]:
    """The facts a controller needs to run the export, written beside it as JSON."""
    cfg = policy.cfg
    return {
        "format": META_FORMAT,
        "export_format": fmt,
        "task": config.get("task"),
        "obs_dim": policy.obs_dim,
        "act_dim": policy.act_dim,
        "num_steps": num_steps,
        "horizon": cfg.horizon,
        "act_steps": cfg.act_steps,
        "obs_history": cfg.obs_history,
        "head": cfg.head,
        "step_size": 1.0 / num_steps if cfg.head == "shortcut" else None,
        "observation_layout": config.get("observation_layout"),
        "action_low": [float(v) for v in policy.action_low.cpu()],
        "action_high": [float(v) for v in policy.action_high.cpu()],
        "inputs": {"obs": ["batch", cfg.obs_history, policy.obs_dim], "noise": ["batch", cfg.horizon, policy.act_dim]},
        "outputs": {"actions": ["batch", cfg.horizon, policy.act_dim]},
        "flowrl_version": flowrl.__version__,
    }


def metadata_path(path: str | Path) -> Path:
    """Where the JSON of an export lives: ``<export file>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON beside an export, checked enough to drive a runtime; a bad one is a one-line error."""
    mpath = metadata_path(path)
    if not mpath.is_file():
        raise FlowrlError(f"{path}: no {mpath.name} beside it (written by `flowrl export`)")
    meta = read_json(mpath)
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise FlowrlError(f"{mpath}: not a flowrl export description (format {META_FORMAT} expected)")
    for key in ("obs_dim", "act_dim", "num_steps", "horizon", "act_steps", "obs_history"):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FlowrlError(f"{mpath}: '{key}' must be a positive integer, got {v!r}")
    if meta["act_steps"] > meta["horizon"]:
        raise FlowrlError(f"{mpath}: act_steps ({meta['act_steps']}) > horizon ({meta['horizon']})")
    return meta
