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

from flowrl.config import PolicyConfig, from_dict, to_dict, validate_policy
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

    ``path`` may also be a run folder, which means its ``best`` checkpoint if it has one, else its
    newest (:func:`resolve_checkpoint`, as every command takes it). A malformed checkpoint raises
    :class:`FlowrlError` with one line naming the file."""
    folder = resolve_checkpoint(path)
    config = read_config(folder)
    if not (folder / MODEL).is_file():
        raise FlowrlError(f"{folder}: missing {MODEL}")
    try:
        pcfg = from_dict(PolicyConfig, config["policy"])
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
    """A checkpoint folder as given, or a run folder's ``best`` checkpoint if it has one, else its newest."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    if (path / "checkpoints" / "best" / CONFIG).is_file():
        return path / "checkpoints" / "best"
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if not path.exists():
        raise FlowrlError(f"checkpoint not found: {path}")
    raise FlowrlError(f"{path}: neither a checkpoint (no {CONFIG}) nor a run folder with checkpoints/")
