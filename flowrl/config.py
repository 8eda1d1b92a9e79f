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
    end_on_success: bool = False
    """End each episode at its first success (tasks that report one), like robomimic's rollouts:
    same success rate, faster; return and length then count the steps up to the success."""


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


@dataclass
class ReinFlowConfig:
    env_steps: int = 8_000_000
    """Budget of environment steps in total (one iteration is num_envs * rollout_steps * act_steps)."""
    max_minutes: float = 0.0
    """Wall-clock budget of this run's fine-tuning (0: none): stop after the iteration that reaches it,
    with a checkpoint and an evaluation as at the end of the env-step budget (--resume continues)."""
    num_envs: int = 256
    """Environments stepped together."""
    rollout_steps: int = 80
    """Policy decisions (action chunks) per env per iteration."""
    num_steps: int = 0
    """Euler steps K of the noisy chain (0: the pretrained policy's K)."""
    gamma: float = 0.99
    """Discount per decision (per action chunk)."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    actor_lr: float = 4.5e-5
    """Learning rate of the velocity field and the noise head, cosine-decayed to actor_lr_min."""
    actor_lr_min: float = 2e-5
    """Final actor learning rate."""
    critic_lr: float = 6.5e-4
    """Learning rate of the critic, cosine-decayed to critic_lr_min."""
    critic_lr_min: float = 3e-4
    """Final critic learning rate."""
    update_epochs: int = 5
    """Passes over each iteration's data."""
    minibatch_size: int = 2560
    """Decisions per gradient step."""
    clip_coef: float = 0.01
    """PPO clip range of the probability ratio."""
    target_kl: float = 0.0
    """Stop an iteration's epochs once the approximate KL exceeds this (0: never)."""
    ent_coef: float = 0.03
    """Weight of the entropy bonus of the injected noise."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    w2_coef: float = 0.0
    """Weight of the W2 regulariser toward the frozen pretrained policy (same initial noise, no injection)."""
    max_grad_norm: float = 1.0
    """Clip each network's gradient norm to this (0: off)."""
    sigma_min: float = 0.10
    """Lower bound of the injected noise std (normalised action units)."""
    sigma_max: float = 0.24
    """Upper bound of the injected noise std at the start."""
    sigma_hold: float = 0.35
    """Fraction of iterations the upper bound is held before its cosine decay."""
    sigma_final_mix: float = 0.7
    """The upper bound decays to (1 - mix) * sigma_min + mix * sigma_max."""
    logprob_normalization: str = "mean"
    """`mean`: the ratio uses the chain log-likelihood divided by its number of noisy elements (K*horizon*act_dim), a per-element geometric-mean ratio; `sum`: the exact joint ratio."""
    reward_scaling: bool = True
    """Divide rewards by a running std of the discounted return."""
    critic_warmup_iterations: int = 2
    """Iterations at the start that train only the critic."""
    critic_hidden_dim: int = 256
    """Width of the critic MLP."""
    critic_depth: int = 3
    """Hidden layers of the critic MLP."""
    noise_hidden_dim: int = 128
    """Width of the noise head MLP."""
    backend: str = "auto"
    """Simulation backend for rollouts (see flowrl.envs.make)."""
    sim_threads: int = 0
    """Threads of the cpu backend (0: all cores)."""
    terminate_on_success: bool = False
    """robosuite tasks: a training episode ends (terminated, no bootstrap) at its first success, so the
    return is the discounted time to success instead of the steps spent successful until the horizon."""
    eval_every: int = 10
    """Evaluate the deterministic policy every N iterations (and at the end)."""
    eval_episodes: int = 10
    """Episodes of each evaluation."""
    checkpoint_every: int = 10
    """Save a checkpoint every N iterations (and at the end)."""


@dataclass
class FinetuneConfig:
    task: str = ""
    """Task name (empty: the pretrained checkpoint's task)."""
    seed: int = 0
    """Seed of everything random in fine-tuning."""
    device: str = "auto"
    """Torch device: cpu, cuda, cuda:N or auto."""
    threads: int = 0
    """Torch CPU threads (0: torch's default)."""
    init: str = ""
    """The pretrained checkpoint to fine-tune (the CLI's --init)."""
    train: ReinFlowConfig = field(default_factory=ReinFlowConfig)
    """ReinFlow PPO."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation at the end of fine-tuning."""


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
    from flowrl.envs import canonical_task

    try:
        canonical_task(cfg.task)
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


def validate_finetune(cfg: FinetuneConfig) -> None:
    from flowrl.envs import BACKENDS

    if not cfg.init:
        _fail("init", "the pretrained checkpoint is required (--init PATH)")
    if cfg.task:
        from flowrl.envs import canonical_task

        try:
            canonical_task(cfg.task)
        except FlowrlError as e:
            _fail("task", str(e))
    validate_device(cfg.device)
    t = cfg.train
    _check_positive(t, "train.", "env_steps", "num_envs", "rollout_steps", "actor_lr", "critic_lr", "update_epochs",
                    "minibatch_size", "clip_coef", "sigma_min", "sigma_max", "eval_every", "eval_episodes",
                    "checkpoint_every", "critic_hidden_dim", "critic_depth", "noise_hidden_dim")
    for name in ("num_steps", "target_kl", "ent_coef", "vf_coef", "w2_coef", "max_grad_norm", "actor_lr_min",
                 "critic_lr_min", "critic_warmup_iterations", "sim_threads", "max_minutes"):
        if getattr(t, name) < 0:
            _fail(f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    for name in ("gamma", "gae_lambda", "sigma_hold", "sigma_final_mix"):
        if not 0 <= getattr(t, name) <= 1:
            _fail(f"train.{name}", f"must be in [0, 1], got {getattr(t, name)}")
    if t.sigma_min > t.sigma_max:
        _fail("train.sigma_min", f"must be <= sigma_max ({t.sigma_max}), got {t.sigma_min}")
    if t.logprob_normalization not in ("mean", "sum"):
        _fail("train.logprob_normalization", f"must be mean or sum, got '{t.logprob_normalization}'")
    if t.backend not in (*BACKENDS, "auto"):
        _fail("train.backend", f"must be one of {', '.join((*BACKENDS, 'auto'))}, got '{t.backend}'")
    validate_eval(cfg.eval)


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
