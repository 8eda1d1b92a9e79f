"""Self-describing checkpoint folders (LeRobot's layout), written atomically.

``<folder>/config.json``        what the policy is (architecture, task, dims) and the run config
``<folder>/model.safetensors``  the deployed weights, normalisation statistics included
``<folder>/train_state.pt``     optional: optimiser, schedule, RNG, step and anything else needed to
                                resume exactly; tensors and plain containers only, loaded with
                                ``weights_only=True``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flowrl.config import MIN_SELECTION_EPISODES, PolicyConfig, from_dict, to_dict, validate_policy
from flowrl.datasets import Episodes, read_dataset
from flowrl.errors import FlowrlError
from flowrl.io import atomic_path, read_json
from flowrl.policy import FlowPolicy

CONFIG = "config.json"
MODEL = "model.safetensors"
TRAIN_STATE = "train_state.pt"
FORMAT = "flowrl.policy/1"


def save_checkpoint(folder: str | Path, policy: FlowPolicy, info: dict[str, Any] | None = None,
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write the policy (and optionally the training state) into ``folder`` as one atomic step."""
    folder = Path(folder)
    config = {
        "format": FORMAT,
        "policy": to_dict(policy.cfg),
        "obs_dim": policy.obs_dim,
        "act_dim": policy.act_dim,
        **(info or {}),
    }
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
        save_file(state, str(tmp / MODEL), metadata={"format": FORMAT})
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict, checked enough that reading it cannot crash later:
    a JSON object of our format whose ``policy`` is an object and whose dims are positive ints.
    Anything else is a :class:`FlowrlError` naming the file (a user may hand us any folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FlowrlError(f"checkpoint not found: {folder}")
    path = folder / CONFIG
    if not path.is_file():
        raise FlowrlError(f"{folder}: not a checkpoint, missing {CONFIG}")
    config = read_json(path)
    if not isinstance(config, dict):
        raise FlowrlError(f"{path}: not a flowrl policy checkpoint (a JSON {type(config).__name__}, "
                          "expected an object)")
    if config.get("format") != FORMAT:
        raise FlowrlError(f"{path}: not a flowrl policy checkpoint (format {config.get('format')!r})")
    if not isinstance(config.get("policy"), dict):
        raise FlowrlError(f"{path}: 'policy' must be an object, got {type(config.get('policy')).__name__}")
    for key in ("obs_dim", "act_dim"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlowrlError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    if "task" in config and not isinstance(config["task"], str):
        raise FlowrlError(f"{path}: 'task' must be a string, got {config['task']!r}")
    return config


def load_policy(path: str | Path, device: str | torch.device = "cpu") -> tuple[FlowPolicy, dict[str, Any]]:
    """The policy stored in a checkpoint folder and its config.json, ready to ``predict``.

    ``path`` may also be a run folder, which means the checkpoint :func:`resolve_checkpoint` picks (as
    every command takes it: ``best`` when chosen on enough episodes, else the last). A malformed
    checkpoint raises :class:`FlowrlError` with one line naming the file."""
    folder = resolve_checkpoint(path)
    config = read_config(folder)
    if not (folder / MODEL).is_file():
        raise FlowrlError(f"{folder}: missing {MODEL}")
    try:
        pcfg = from_dict(PolicyConfig, config["policy"], prefix="policy.")  # older flowrl's num_steps is k
        validate_policy(pcfg)
        policy = FlowPolicy(pcfg, int(config["obs_dim"]), int(config["act_dim"]))
    except KeyError as e:
        raise FlowrlError(f"{folder / CONFIG}: missing key {e}") from None
    except FlowrlError as e:
        raise FlowrlError(f"{folder / CONFIG}: {e}") from None
    except (TypeError, ValueError) as e:
        raise FlowrlError(f"{folder / CONFIG}: invalid policy ({str(e).splitlines()[0]})") from None
    try:
        state = load_file(str(folder / MODEL))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise FlowrlError(f"{folder / MODEL}: corrupt weights file ({str(e).splitlines()[0]})") from None
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"shape of '{wrong[0]}' is {tuple(state[wrong[0]].shape)}, config says "
                  f"{tuple(expected[wrong[0]].shape)}" if wrong else f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        raise FlowrlError(f"{folder / MODEL}: weights do not match config.json ({detail})")
    policy.load_state_dict(state)
    return policy.to(device).eval(), config


def load_init(init: str | Path, task: str, device: str | torch.device) -> tuple[FlowPolicy, dict[str, Any], str,
                                                                             dict[str, Any]]:
    """A fine-tuning's starting point: the policy of ``init`` (a checkpoint, or the one a run folder stands
    for), its config.json, the task (``task``, else the checkpoint's; canonical) and what the fine-tuning's
    checkpoints record of where they started (``init``: path, step, stage)."""
    from flowrl.envs import canonical_task

    folder = resolve_checkpoint(init)
    policy, config = load_policy(folder, device)
    if not (task or config.get("task")):
        raise FlowrlError(f"{folder / CONFIG}: missing key 'task'")
    info = {"path": str(folder), "step": config.get("step"), "stage": config.get("stage")}
    return policy, config, canonical_task(task or config["task"]), info


def recorded_dataset(folder: str | Path) -> str | None:
    """The demonstrations a checkpoint's policy descends from: its config.json's ``dataset.path``
    (behaviour cloning, MLE, distillation), else that of the checkpoint it was fine-tuned from
    (``init.path``, followed back through fine-tunings of fine-tunings); None when no link records one."""
    seen: set[Path] = set()
    folder = Path(folder)
    while folder not in seen:
        seen.add(folder)
        config = read_config(folder)
        path = (config.get("dataset") or {}).get("path")
        if path:
            return str(path)
        init = (config.get("init") or {}).get("path")
        if not init or not (Path(init) / CONFIG).is_file():
            return None
        folder = Path(init)
    return None


def demonstrations_of(folder: str | Path, policy: FlowPolicy, data: str, max_episodes: int,
                      with_actions: bool = True) -> tuple[Episodes, str]:
    """The demonstrations a fine-tuning of the checkpoint in ``folder`` works on: ``data`` when given, else
    those the checkpoint descends from (:func:`recorded_dataset`); cut to ``max_episodes`` and checked against
    ``policy``'s observation dims (and action dims, ``with_actions``). Returns them with their path."""
    path = data or recorded_dataset(folder)
    if not path:
        raise FlowrlError(f"{folder}: records no demonstrations (nor does any checkpoint it was fine-tuned from); "
                          "name them (train.data=PATH)")
    episodes = read_dataset(path).head(max_episodes)
    if episodes.obs_dim != policy.obs_dim or (with_actions and episodes.act_dim != policy.act_dim):
        raise FlowrlError(f"{path}: obs/act dims {episodes.obs_dim}/{episodes.act_dim} differ from the "
                          f"policy's {policy.obs_dim}/{policy.act_dim}")
    return episodes, str(path)


def load_train_state(folder: str | Path) -> dict[str, Any]:
    """The training state saved beside a checkpoint (to resume exactly); garbage is a FlowrlError."""
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        raise FlowrlError(f"{folder}: missing {TRAIN_STATE}; cannot resume from it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors for damaged files
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise FlowrlError(f"{path}: corrupt training state ({lines[0]})") from None
    if not isinstance(state, dict):
        raise FlowrlError(f"{path}: corrupt training state (a {type(state).__name__}, expected a dict)")
    return state


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step-numbered checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the checkpoint a run folder stands for (:func:`checkpoint_choice`)."""
    return checkpoint_choice(path)[0]


def checkpoint_choice(path: str | Path) -> tuple[Path, str]:
    """The checkpoint ``path`` stands for and why, in words (empty for a checkpoint folder given as such).

    A run folder stands for its ``best`` checkpoint when the periodic evaluation that chose it ran at
    least :data:`flowrl.config.MIN_SELECTION_EPISODES` episodes (recorded in ``best/config.json``), else
    for its last (highest step) checkpoint: the best of a few short evaluations is mostly the luckiest
    one. Every command that takes a run folder uses this rule, and the training's final table is of the
    same checkpoint."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path, ""
    found = list_checkpoints(path)
    best = path / "checkpoints" / "best"
    if (best / CONFIG).is_file():
        episodes = selection_episodes(best)
        if episodes is not None and episodes >= MIN_SELECTION_EPISODES:
            return best, f"`best`, chosen on {episodes} episodes per evaluation"
        if not found:
            return best, "`best`, the run's only checkpoint"
        chosen_on = (f"{episodes} episodes per evaluation" if episodes is not None
                     else "an unrecorded number of episodes")
        return found[-1], (f"the last checkpoint: `best` was chosen on {chosen_on}, fewer than "
                           f"{MIN_SELECTION_EPISODES}")
    if found:
        return found[-1], "the last checkpoint"
    if not path.exists():
        raise FlowrlError(f"checkpoint not found: {path}")
    raise FlowrlError(f"{path}: neither a checkpoint (no {CONFIG}) nor a run folder with checkpoints/")


def selection_episodes(folder: str | Path) -> int | None:
    """Episodes of the periodic evaluation that chose a ``best`` checkpoint (its config.json's
    ``eval.episodes``), None when it records none; an unreadable config.json is a one-line error naming it."""
    try:
        episodes = read_json(Path(folder) / CONFIG)["eval"]["episodes"]
    except (KeyError, TypeError):
        return None
    return episodes if isinstance(episodes, int) and not isinstance(episodes, bool) else None
