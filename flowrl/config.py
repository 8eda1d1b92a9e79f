"""Typed configuration: dataclasses are the schema and the documentation.

Each field carries its docstring right below it (read by :func:`describe`). A YAML preset holds
only what differs from these defaults; the CLI adds ``key=value`` overrides. OmegaConf merges the
three and rejects unknown keys and wrong types; :func:`validate` rejects bad values. Every error
names the key and stops before any work starts.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowrl.errors import FlowrlError

T = TypeVar("T")


@dataclass
class PolicyConfig:
    head: str = "reflow"
    """Velocity head: `reflow` (rectified flow) or `shortcut` (step-size conditioned, Frans et al. 2024)."""
    obs_history: int = 1
    """Number of past observations the policy is conditioned on (the current one included)."""
    horizon: int = 4
    """Length of the predicted action chunk."""
    act_steps: int = 4
    """How many actions of each chunk the env executes open loop before the policy is asked again."""
    num_steps: int = 4
    """Default number of Euler steps K at inference (any K can be asked for at evaluation)."""
    hidden_dim: int = 512
    """Width of the residual MLP velocity network."""
    depth: int = 3
    """Number of residual blocks of the velocity network."""
    time_embed_dim: int = 32
    """Size of the sinusoidal embedding of t (and of the step size d for shortcut heads)."""
    max_shortcut_steps: int = 128
    """Shortcut heads: finest step size is 1/max_shortcut_steps (a power of two)."""


@dataclass
class DataConfig:
    path: str = MISSING
    """Demonstration file (HDF5; our layout, D4RL, robomimic or Minari, detected automatically)."""
    max_episodes: int = 0
    """Use only the first N episodes (0: all)."""


@dataclass
class TrainConfig:
    steps: int = 20000
    """Gradient steps in total."""
    batch_size: int = 256
    """Samples (observation history, action chunk) per gradient step."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays the learning rate to lr * min_lr_ratio."""
    warmup_steps: int = 200
    """Linear learning-rate warm-up at the start."""
    weight_decay: float = 1e-6
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0: off)."""
    ema_decay: float = 0.995
    """Decay of the exponential moving average of the weights; the EMA weights are what is evaluated and saved."""
    time_sampling: str = "uniform"
    """Distribution of flow time t in [0, 1] for flow-matching rows: uniform or logit_normal."""
    shortcut_fraction: float = 0.25
    """Shortcut heads: fraction of each batch used for self-consistency rows."""
    log_every: int = 100
    """Write TensorBoard scalars every N steps."""
    checkpoint_every: int = 5000
    """Save a checkpoint every N steps (and always at the end)."""
    eval_every: int = 5000
    """Evaluate in simulation every N steps (0: only at the end)."""
    eval_episodes: int = 5
    """Episodes of each periodic evaluation during training."""


@dataclass
class EvalConfig:
    episodes: int = 10
    """Episodes per K in the final evaluation."""
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Numbers of Euler steps K to evaluate."""
    seed: int = 100000
    """Env i of evaluation episode batch is seeded with seed + i (disjoint from training seeds)."""
    backend: str = "auto"
    """Simulation backend (see flowrl.envs.make)."""
    max_envs: int = 64
    """At most this many envs are stepped together during evaluation."""


@dataclass
class PretrainConfig:
    task: str = MISSING
    """Task name, e.g. Hopper, Walker2d (case-insensitive)."""
    seed: int = 0
    """Seed of everything random in training."""
    device: str = "auto"
    """Torch device: cpu, cuda, cuda:N or auto (cuda when available)."""
    threads: int = 0
    """Torch CPU threads (0: torch's default)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The policy's architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """The demonstrations."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Behaviour cloning."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation at the end of training."""


def _fail(key: str, message: str) -> None:
    raise FlowrlError(f"config: {key}: {message}")


def _check_positive(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            _fail(f"{prefix}{name}", f"must be > 0, got {getattr(obj, name)}")


def validate_policy(p: PolicyConfig, prefix: str = "policy.") -> None:
    if p.head not in ("reflow", "shortcut"):
        _fail(f"{prefix}head", f"must be reflow or shortcut, got '{p.head}'")
    _check_positive(p, prefix, "obs_history", "horizon", "act_steps", "num_steps", "hidden_dim", "depth",
                    "time_embed_dim", "max_shortcut_steps")
    if p.act_steps > p.horizon:
        _fail(f"{prefix}act_steps", f"must be <= horizon ({p.horizon}), got {p.act_steps}")
    if p.time_embed_dim % 2:
        _fail(f"{prefix}time_embed_dim", f"must be even, got {p.time_embed_dim}")
    m = p.max_shortcut_steps
    if m & (m - 1):
        _fail(f"{prefix}max_shortcut_steps", f"must be a power of two, got {m}")


def validate_pretrain(cfg: PretrainConfig) -> None:
    from flowrl.envs import resolve_task

    try:
        resolve_task(cfg.task)
    except FlowrlError as e:
        _fail("task", str(e))
    if cfg.seed < 0:
        _fail("seed", f"must be >= 0, got {cfg.seed}")
    validate_device(cfg.device)
    validate_policy(cfg.policy)
    t = cfg.train
    _check_positive(t, "train.", "steps", "batch_size", "lr", "log_every", "checkpoint_every", "eval_episodes")
    if not 0 <= t.min_lr_ratio <= 1:
        _fail("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    if not 0 <= t.ema_decay < 1:
        _fail("train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    if t.time_sampling not in ("uniform", "logit_normal"):
        _fail("train.time_sampling", f"must be uniform or logit_normal, got '{t.time_sampling}'")
    if not 0 < t.shortcut_fraction < 1:
        _fail("train.shortcut_fraction", f"must be in (0, 1), got {t.shortcut_fraction}")
    for name in ("warmup_steps", "eval_every", "grad_clip", "weight_decay"):
        if getattr(t, name) < 0:
            _fail(f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    validate_eval(cfg.eval)
    if cfg.data.max_episodes < 0:
        _fail("data.max_episodes", f"must be >= 0, got {cfg.data.max_episodes}")


def validate_eval(e: EvalConfig, prefix: str = "eval.") -> None:
    from flowrl.envs import BACKENDS

    _check_positive(e, prefix, "episodes", "max_envs")
    if not e.steps or any(k < 1 for k in e.steps):
        _fail(f"{prefix}steps", f"must be a non-empty list of integers >= 1, got {list(e.steps)}")
    if e.backend not in (*BACKENDS, "auto"):
        _fail(f"{prefix}backend", f"must be one of {', '.join((*BACKENDS, 'auto'))}, got '{e.backend}'")


def validate_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        _fail("device", f"not a torch device: '{device}'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        _fail("device", f"'{device}' asked for but CUDA is not available")


def resolve_device(device: str) -> "Any":
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_config(schema: type[T], preset: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Merge defaults, a YAML preset and ``key=value`` overrides into a typed ``schema`` object."""
    base = OmegaConf.structured(schema)
    layers = []
    if preset is not None:
        path = Path(preset)
        if not path.is_file():
            raise FlowrlError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # yaml.YAMLError and friends
            raise FlowrlError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(layers[-1], type(base)):
            raise FlowrlError(f"{path}: must hold a mapping of keys to values")
    for item in overrides:
        if "=" not in item:
            raise FlowrlError(f"override '{item}' is not key=value")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(base, *layers)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise FlowrlError(f"config: {missing[0]}: required but not set")
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise FlowrlError(f"config: {key}: {msg}") from None
    return obj  # type: ignore[return-value]


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(schema: type[T], data: dict[str, Any]) -> T:
    """Rebuild a typed config from a plain dict (e.g. a checkpoint's config.json)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data)))
    except OmegaConfBaseException as e:
        raise FlowrlError(f"config: {getattr(e, 'full_key', '?')}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def field_docs(schema: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(schema)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf key of ``schema``, nested sections flattened."""
    rows = []
    docs = field_docs(schema)
    defaults = OmegaConf.structured(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            sub = f.default_factory()  # type: ignore[misc]
            rows.extend(describe(type(sub), prefix=f"{key}."))
        else:
            value = OmegaConf.select(defaults, f.name, default="???", throw_on_missing=False)
            shown = "(required)" if OmegaConf.is_missing(defaults, f.name) else str(
                OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
            rows.append((key, shown, docs.get(f.name, "")))
    return rows
