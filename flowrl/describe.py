"""What a checkpoint expects and produces: the facts needed to run it anywhere else (a real robot,
another simulator, an exported model).

``flowrl describe CHECKPOINT`` (and ``flowrl eval CHECKPOINT --info``) print :func:`format_description`
of :func:`describe_checkpoint`: the task, the policy (head, K, chunk, history, parameters), the
observation's named parts in order with their index ranges, and the action's dimensions with their
bounds. The layout is the one recorded in the checkpoint's config.json (``observation_layout``,
written since checkpoints record it); older checkpoints fall back to the task registry's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowrl.errors import FlowrlError


def layout_parts(layout: Any, obs_dim: int) -> list[dict[str, Any]]:
    """``[(name, size), ...]`` (as the registry and config.json hold it) -> parts with their index
    ranges ``{"name", "start", "size"}``; an empty layout is one unnamed vector. A layout whose sizes
    do not add up to ``obs_dim`` is an error: it would mislead whoever wires a robot to it."""
    parts, start = [], 0
    for item in layout or ():
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], int) and item[1] > 0):
            raise FlowrlError(f"observation layout: expected [name, size] pairs, got {item!r}")
        parts.append({"name": item[0], "start": start, "size": item[1]})
        start += item[1]
    if parts and start != obs_dim:
        raise FlowrlError(f"observation layout: sizes add up to {start}, the observation has {obs_dim}")
    return parts


def action_names(task_info: Any, act_dim: int) -> list[str]:
    """Names of the action's dimensions where the task fixes them (``Task.action_names``), else ``a[i]``."""
    if task_info is not None and len(task_info.action_names) == act_dim:
        return list(task_info.action_names)
    return [f"a[{i}]" for i in range(act_dim)]


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """Everything :func:`format_description` prints, as plain data (``flowrl describe --json``)."""
    from flowrl.checkpoint import load_policy, resolve_checkpoint

    folder = resolve_checkpoint(path)
    policy, config = load_policy(folder)
    task_name = config.get("task")
    task_info, task_note = None, ""
    if task_name:
        from flowrl.envs import resolve_task

        try:
            task_info = resolve_task(task_name)
        except FlowrlError:
            task_note = "not a registered task here (a plugin not installed?)"
    obs_dim, act_dim = policy.obs_dim, policy.act_dim
    if "observation_layout" in config:
        layout, source = config["observation_layout"], "recorded in the checkpoint"
    elif task_info is not None:
        layout, source = task_info.obs_layout, "from the task registry (the checkpoint predates recorded layouts)"
    else:
        layout, source = [], "unknown"
    try:
        parts = layout_parts(layout, obs_dim)
    except FlowrlError as e:
        raise FlowrlError(f"{folder}/config.json: {e}") from None
    low = policy.action_low.detach().cpu().tolist()
    high = policy.action_high.detach().cpu().tolist()
    pcfg = policy.cfg
    return {
        "checkpoint": str(folder),
        "task": task_name,
        "task_description": task_info.description if task_info is not None else task_note,
        "horizon": task_info.max_episode_steps if task_info is not None else None,
        "stage": config.get("stage"),
        "algorithm": config.get("algorithm"),
        "step": config.get("step"),
        "policy": {"head": pcfg.head, "k": pcfg.k, "horizon": pcfg.horizon,
                   "act_steps": pcfg.act_steps, "obs_history": pcfg.obs_history, "hidden_dim": pcfg.hidden_dim,
                   "depth": pcfg.depth, "steering_hidden_dim": pcfg.steering_hidden_dim,
                   "parameters": sum(p.numel() for p in policy.parameters())},
        "observation": {"dim": obs_dim, "layout": parts, "layout_source": source},
        "action": {"dim": act_dim, "names": action_names(task_info, act_dim), "low": low, "high": high},
    }


def format_description(d: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe_checkpoint`'s result."""
    p, obs, act = d["policy"], d["observation"], d["action"]
    lines = [f"checkpoint   {d['checkpoint']}"]
    task = d["task"] or "(not recorded)"
    extra = [x for x in (d.get("task_description"), f"episodes of {d['horizon']} steps" if d.get("horizon") else "")
             if x]
    lines.append(f"task         {task}" + (f"  ({'; '.join(extra)})" if extra else ""))
    if d.get("stage"):
        lines.append(f"trained by   {d['stage']}" + (f" ({d['algorithm']})" if d.get("algorithm") else "")
                     + (f", step {d['step']}" if d.get("step") is not None else ""))
    lines.append(f"policy       {p['head']} head, K = {p['k']} Euler steps by default (any K works), "
                 f"chunks of {p['horizon']} actions of which {p['act_steps']} are executed, "
                 f"{p['obs_history']} observation(s) of history, {p['parameters']:,} parameters "
                 f"({p['depth']} x {p['hidden_dim']} residual MLP"
                 + (", and a steering head that chooses its initial noise: DSRL" if p.get("steering_hidden_dim") else "")
                 + ")")
    lines.append("")
    hist = f"; the policy reads the last {p['obs_history']}, oldest first" if p["obs_history"] > 1 else ""
    lines.append(f"observation  {obs['dim']} float values per step{hist}")
    if obs["layout"]:
        lines.append(f"  {'index':<10} {'size':>4}  name    ({obs['layout_source']})")
        for part in obs["layout"]:
            s, n = part["start"], part["size"]
            idx = f"{s}" if n == 1 else f"{s}-{s + n - 1}"
            lines.append(f"  {idx:<10} {n:>4}  {part['name']}")
    else:
        lines.append(f"  (one vector of {obs['dim']})")
    lines.append("")
    lines.append(f"action       {act['dim']} float values per step, in env units; the policy's output is clipped "
                 "to these bounds")
    lines.append(f"  {'index':<6} {'name':<16} {'low':>9} {'high':>9}")
    for i, (name, lo, hi) in enumerate(zip(act["names"], act["low"], act["high"])):
        lines.append(f"  {i:<6} {name:<16} {lo:>9.4g} {hi:>9.4g}")
    return "\n".join(lines)
