"""The JSON that travels with an exported policy (``<export file>.json``) and its checks.

What a controller must know to run an export: task, dims, K, the K + 1 times of its Euler grid
(``time_grid``), horizon, act_steps, obs_history, head (and the uniform step size of heads that take one), observation layout, action bounds, the graph's inputs and
outputs, flowrl version. A pixel policy's JSON also has ``cameras``, ``image_size`` and
``image_inputs`` (the graph inputs ``image_<camera>``, uint8, in the order of ``cameras``); a
state-only policy's has none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flowrl
from flowrl.errors import FlowrlError
from flowrl.io import read_json
from flowrl.sampler import uniform_times

META_FORMAT = "flowrl.export/2"
"""The format of the JSON written now; its K is ``k``."""

OLD_META_FORMATS = ("flowrl.export/1",)
"""Formats still read: ``flowrl.export/1`` (older flowrl) named K ``num_steps``."""


def image_input_name(camera: str) -> str:
    """The graph input of an export that carries ``camera``'s images: ``image_<camera>``."""
    return f"image_{camera}"


def export_metadata(policy: Any, config: dict[str, Any], k: int, fmt: str) -> dict[str, Any]:
    """The facts a controller needs to run the export at K = ``k``, written beside it as JSON."""
    cfg = policy.cfg
    times = policy.time_grid(k) if hasattr(policy, "time_grid") else uniform_times(k)  # stand-ins: uniform
    meta: dict[str, Any] = {
        "format": META_FORMAT,
        "export_format": fmt,
        "task": config.get("task"),
        "obs_dim": policy.obs_dim,
        "act_dim": policy.act_dim,
        "k": k,
        "horizon": cfg.horizon,
        "act_steps": cfg.act_steps,
        "obs_history": cfg.obs_history,
        "head": cfg.head,
        "step_size": 1.0 / k if getattr(policy, "takes_step_size", False) and times == uniform_times(k) else None,
        "time_grid": times,
        "observation_layout": config.get("observation_layout"),
        "action_low": [float(v) for v in policy.action_low.cpu()],
        "action_high": [float(v) for v in policy.action_high.cpu()],
        "inputs": {"obs": ["batch", cfg.obs_history, policy.obs_dim], "noise": ["batch", cfg.horizon, policy.act_dim]},
        "outputs": {"actions": ["batch", cfg.horizon, policy.act_dim]},
        "flowrl_version": flowrl.__version__,
    }
    if getattr(policy, "uses_images", False):  # stand-ins of tests and tools are state-only
        size = cfg.image_size
        names = [image_input_name(c) for c in cfg.cameras]
        meta["cameras"] = list(cfg.cameras)
        meta["image_size"] = size
        meta["image_inputs"] = names
        meta["inputs"].update({n: ["batch", cfg.obs_history, size, size, 3] for n in names})
        meta["input_dtypes"] = {"obs": "float32", "noise": "float32", **{n: "uint8" for n in names}}
    return meta


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
    if not isinstance(meta, dict) or meta.get("format") not in (META_FORMAT, *OLD_META_FORMATS):
        raise FlowrlError(f"{mpath}: not a flowrl export description (format {META_FORMAT} expected)")
    if meta["format"] in OLD_META_FORMATS and "k" not in meta and "num_steps" in meta:
        meta["k"] = meta.pop("num_steps")  # written by an older flowrl
    for key in ("obs_dim", "act_dim", "k", "horizon", "act_steps", "obs_history"):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FlowrlError(f"{mpath}: '{key}' must be a positive integer, got {v!r}")
    if meta["act_steps"] > meta["horizon"]:
        raise FlowrlError(f"{mpath}: act_steps ({meta['act_steps']}) > horizon ({meta['horizon']})")
    cameras = meta.get("cameras")
    if cameras is not None:  # a pixel policy's export
        if not isinstance(cameras, list) or not all(isinstance(c, str) and c for c in cameras):
            raise FlowrlError(f"{mpath}: 'cameras' must be a list of camera names, got {cameras!r}")
        size = meta.get("image_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise FlowrlError(f"{mpath}: 'image_size' must be a positive integer, got {size!r}")
    return meta
