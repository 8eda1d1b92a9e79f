"""Typed configuration: dataclasses are the schema and the documentation.

Each field carries its docstring right below it (read by :func:`describe`). A YAML preset holds
only what differs from these defaults; the CLI adds ``key=value`` overrides. OmegaConf merges the
three and rejects unknown keys and wrong types; :func:`validate` rejects bad values. Every error
names the key and stops before any work starts.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowrl.errors import FlowrlError

T = TypeVar("T")

EVAL_SEED = 100000
"""Env i of an evaluation is seeded ``EVAL_SEED + i`` unless told otherwise (``eval.seed``, ``flowrl eval --seed``)."""

MIN_SELECTION_EPISODES = 20
"""Fewest episodes per periodic evaluation for the ``best`` checkpoint they choose to stand for its run
folder (:func:`flowrl.checkpoint.resolve_checkpoint`): with fewer, the highest of several noisy
evaluations is mostly the luckiest, and the run folder means its last checkpoint."""


HEADS = ("reflow", "shortcut", "meanflow")
"""The velocity heads a policy can have (``policy.head``)."""


@dataclass
class PolicyConfig:
    head: str = "reflow"
    """Velocity head: `reflow` (rectified flow), `shortcut` (step-size conditioned, Frans et al. 2024) or `meanflow`
    (the average velocity over an interval, trained with SplitMeanFlow's interval-splitting identity: one step by
    construction)."""
    obs_history: int = 1
    """Number of past observations the policy is conditioned on (the current one included)."""
    horizon: int = 4
    """Length of the predicted action chunk."""
    act_steps: int = 4
    """How many actions of each chunk the env executes open loop before the policy is asked again."""
    k: int = 4
    """Default number of Euler steps K at inference (any K can be asked for at evaluation)."""
    hidden_dim: int = 512
    """Width of the residual MLP velocity network."""
    depth: int = 3
    """Number of residual blocks of the velocity network."""
    time_embed_dim: int = 32
    """Size of the sinusoidal embedding of t (and of the step size d for shortcut and meanflow heads)."""
    max_shortcut_steps: int = 128
    """Shortcut heads: finest step size is 1/max_shortcut_steps (a power of two)."""
    time_grids: dict[str, list[float]] = field(default_factory=dict)
    """Non-uniform Euler grids by K (`"4": [0, t_1, t_2, t_3, 1]`), used instead of t_k = k/K wherever the
    deterministic K-step sampler runs (evaluation, export, deployment); written by `flowrl distill --grid`,
    which chooses them for this policy's weights (fine-tuning drops them). Empty: the uniform grid for every K."""
    residual_hidden_dim: int = 0
    """Width of a contracting residual field added to the velocity (0: none; MLE fine-tuning's ResFT adds it)."""
    steering_hidden_dim: int = 0
    """Width of a steering head that chooses the flow's initial noise from the observation, x0 = mean(obs) +
    std * eps with eps ~ N(0, I) (0: none, x0 = eps; DSRL fine-tuning adds it and trains it alone)."""
    residual_gain_min: float = 0.0
    """The residual's damping gain is at least this (ResFT sets it above the frozen field's estimated
    Lipschitz bound, so the combined field contracts in the action)."""
    cameras: list[str] = field(default_factory=list)
    """Cameras the policy sees besides the state (pixel policies; e.g. [agentview]): their images are read
    from the dataset's obs/<camera>_image and encoded by flowrl.vision.ImageEncoder. Empty: state only."""
    image_size: int = 84
    """Height and width of the camera images."""
    image_features: int = 64
    """Features per camera image out of the image encoder."""
    image_shift: int = 4
    """Random-shift augmentation of the images while training, in pixels (0: none)."""
    image_jitter: float = 0.0
    """Photometric augmentation of the images while training: each image's contrast, brightness and
    per-channel gain scaled by random factors in [1 - image_jitter, 1 + image_jitter] (0: none), for
    policies evaluated on images drawn by another renderer than the one they trained on."""


@dataclass
class DataConfig:
    path: str = MISSING
    """Demonstration file (HDF5; our layout, D4RL, robomimic or Minari, detected automatically)."""
    max_episodes: int = 0
    """Use only the first N episodes (0: all)."""


@dataclass
class LoopConfig:
    """What the training loop every agent runs in reads from the agent's ``train`` section; an
    agent's config subclasses it. Its iterations are the agent's (a gradient step for behaviour
    cloning, a rollout and update for ReinFlow)."""

    max_minutes: float = 0.0
    """Wall-clock budget of this run (0: none): stop after the iteration that reaches it, with an
    evaluation and a checkpoint as at the end of the budget (--resume continues)."""
    log_every: int = 1
    """Write TensorBoard scalars every N iterations."""
    eval_every: int = 10
    """Evaluate the deterministic policy every N iterations and after the last (0: never while training, the
    starting policy included; the CLI's final evaluation is separate: --no-eval)."""
    eval_episodes: int = 10
    """Episodes of each periodic evaluation (their seeds are disjoint from `flowrl eval`'s). The best of
    these evaluations is saved as checkpoints/best; the run folder stands for it (in `flowrl eval RUN`,
    describe, export, --init and the final table) only with at least 20 episodes each, else for the
    last checkpoint."""
    checkpoint_every: int = 10
    """Save a checkpoint every N iterations (and at the end)."""
    stop_at_score: Optional[float] = None
    """Stop after the first periodic evaluation that reaches this score (success rate where the task
    reports success, else mean return), with a checkpoint (None: train to the budget)."""

    def validate(self, prefix: str = "train.") -> None:
        check_positive(self, prefix, "log_every", "eval_episodes", "checkpoint_every")
        check_non_negative(self, prefix, "eval_every", "max_minutes")


@dataclass
class GradientStepLoopConfig(LoopConfig):
    """The loop of an agent whose iterations are gradient steps on demonstrations (MLE, distillation):
    its intervals counted in gradient steps."""

    log_every: int = 50
    """Write TensorBoard scalars every N gradient steps."""
    eval_every: int = 500
    """Evaluate in simulation every N gradient steps (0: only at the end)."""
    eval_episodes: int = 5
    """Episodes of each periodic evaluation."""
    checkpoint_every: int = 500
    """Save a checkpoint every N gradient steps (and at the end)."""


@dataclass
class EvalConfig:
    episodes: int = 10
    """Episodes per K in the final evaluation."""
    k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Numbers of Euler steps K to evaluate."""
    seed: int = EVAL_SEED
    """Env i of the final evaluation is seeded with seed + i (the periodic evaluations during training,
    which choose the `best` checkpoint, use other seeds)."""
    backend: str = "auto"
    """Simulation backend (see flowrl.envs.make)."""
    max_envs: int = 0
    """At most this many envs are stepped together during evaluation (0: 64; robosuite, one worker
    process each: the number of CPU cores)."""
    end_on_success: bool = False
    """End each episode at its first success (tasks that report one), like robomimic's rollouts:
    same success rate, faster; return and length then count the steps up to the success."""


@dataclass
class PretrainConfig:
    algo: str = "bc"
    """The pretraining algorithm (`flowrl config describe pretrain` lists them)."""
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
    train: Any = None
    """The algorithm's settings (their keys depend on `algo`)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation at the end of training."""


@dataclass
class FinetuneConfig:
    algo: str = "reinflow"
    """The fine-tuning algorithm (`flowrl config describe finetune` lists them)."""
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
    train: Any = None
    """The algorithm's settings (their keys depend on `algo`)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation at the end of fine-tuning."""


def fail(key: str, message: str) -> None:
    """Reject a config value: one line naming the key."""
    raise FlowrlError(f"config: {key}: {message}")


def check_positive(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            fail(f"{prefix}{name}", f"must be > 0, got {getattr(obj, name)}")


def check_non_negative(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            fail(f"{prefix}{name}", f"must be >= 0, got {getattr(obj, name)}")


def check_fraction(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        if not 0 <= getattr(obj, name) <= 1:
            fail(f"{prefix}{name}", f"must be in [0, 1], got {getattr(obj, name)}")


def validate_policy(p: PolicyConfig, prefix: str = "policy.") -> None:
    if p.head not in HEADS:
        fail(f"{prefix}head", f"must be one of {', '.join(HEADS)}, got '{p.head}'")
    check_positive(p, prefix, "obs_history", "horizon", "act_steps", "k", "hidden_dim", "depth",
                   "time_embed_dim", "max_shortcut_steps")
    check_non_negative(p, prefix, "residual_hidden_dim", "residual_gain_min", "image_shift")
    check_positive(p, prefix, "image_size", "image_features")
    if not 0 <= p.image_jitter < 1:
        fail(f"{prefix}image_jitter", f"must be in [0, 1), got {p.image_jitter}")
    if len(set(p.cameras)) != len(p.cameras):
        fail(f"{prefix}cameras", f"names a camera twice: {list(p.cameras)}")
    if p.act_steps > p.horizon:
        fail(f"{prefix}act_steps", f"must be <= horizon ({p.horizon}), got {p.act_steps}")
    if p.time_embed_dim % 2:
        fail(f"{prefix}time_embed_dim", f"must be even, got {p.time_embed_dim}")
    m = p.max_shortcut_steps
    if m & (m - 1):
        fail(f"{prefix}max_shortcut_steps", f"must be a power of two, got {m}")
    for key, times in p.time_grids.items():
        problem = time_grid_problem(key, times)
        if problem:
            fail(f"{prefix}time_grids.{key}", problem)


def time_grid_problem(key: str, times: list[float]) -> str | None:
    """Why ``times`` is not a K-step Euler grid for K = ``key`` (one line), or None: K + 1 strictly
    increasing times from 0 to 1."""
    if not str(key).isdigit() or int(key) < 1:
        return f"the key must be a number of steps K >= 1, got '{key}'"
    k = int(key)
    if len(times) != k + 1:
        return f"a grid of K = {k} steps has {k + 1} times, got {len(times)}"
    if times[0] != 0.0 or times[-1] != 1.0:
        return f"must start at 0 and end at 1, got {times[0]} and {times[-1]}"
    if any(b <= a for a, b in zip(times, times[1:])):
        return f"times must increase strictly, got {list(times)}"
    return None


def _validate_task(task: str) -> None:
    from flowrl.envs import canonical_task

    try:
        canonical_task(task)
    except FlowrlError as e:
        fail("task", str(e))


def validate_pretrain(cfg: PretrainConfig, for_run: bool = True) -> None:
    """Reject bad values; ``for_run=False`` (``flowrl config show``) skips what only a run needs (a usable
    device on this machine)."""
    _validate_task(cfg.task)
    if cfg.seed < 0:
        fail("seed", f"must be >= 0, got {cfg.seed}")
    if for_run:
        validate_device(cfg.device)
    validate_policy(cfg.policy)
    cfg.train.validate()
    validate_eval(cfg.eval)
    if cfg.data.max_episodes < 0:
        fail("data.max_episodes", f"must be >= 0, got {cfg.data.max_episodes}")


def validate_finetune(cfg: FinetuneConfig, for_run: bool = True) -> None:
    """Reject bad values; ``for_run=False`` (``flowrl config show``) skips what only a run needs (the
    pretrained checkpoint, given at run time with --init, and a usable device on this machine)."""
    if for_run and not cfg.init:
        fail("init", "the pretrained checkpoint is required (--init PATH)")
    if cfg.task:
        _validate_task(cfg.task)
    if for_run:
        validate_device(cfg.device)
    cfg.train.validate()
    validate_eval(cfg.eval)


def validate_backend(backend: str, key: str) -> None:
    from flowrl.envs import BACKENDS

    if backend not in (*BACKENDS, "auto"):
        fail(key, f"must be one of {', '.join((*BACKENDS, 'auto'))}, got '{backend}'")


def validate_eval(e: EvalConfig, prefix: str = "eval.") -> None:
    check_positive(e, prefix, "episodes")
    check_non_negative(e, prefix, "max_envs")
    if not e.k or any(k < 1 for k in e.k):
        fail(f"{prefix}k", f"must be a non-empty list of integers >= 1, got {list(e.k)}")
    validate_backend(e.backend, f"{prefix}backend")


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used by this torch on this machine (one line), or None when it can:
    not a torch device, CUDA asked of a CPU-only build or of a machine without a visible GPU, a
    CUDA index beyond the GPUs present, MPS where there is none. ``auto`` always can."""
    import torch

    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return "not a torch device (cpu, cuda, cuda:N, mps or auto)"
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            return f"this torch ({torch.__version__}) has no CUDA; use cpu (or auto), or install a CUDA build of torch"
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine (no GPU visible to torch); use cpu (or auto)"
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return f"this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine; use cpu (or auto)"
    return None


def check_device(device: str, flag: str = "--device") -> None:
    """A command-line device that cannot be used: one line naming the flag and the value."""
    problem = device_problem(device)
    if problem:
        raise FlowrlError(f"{flag} {device}: {problem}")


def validate_device(device: str) -> None:
    """A config's ``device`` key that cannot be used: one line naming the key."""
    problem = device_problem(device)
    if problem:
        fail("device", f"'{device}': {problem}")


def resolve_device(device: str) -> "Any":
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup_torch(cfg: Any) -> "Any":
    """A stage config's torch device (``device``), with torch's CPU threads set from ``threads`` (0: torch's
    default)."""
    import torch

    from flowrl.distributed import rank_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return rank_device(resolve_device(cfg.device))


STAGE_CONFIGS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}


def stage_schema(stage: str, algo: str | None = None) -> type:
    """The config schema of a stage with the ``train`` section of ``algo`` (the stage's default
    algorithm when None), from the agent registry."""
    from flowrl.registry import DEFAULT_ALGO, agent_info

    base = STAGE_CONFIGS[stage]
    algo = algo or DEFAULT_ALGO[stage]
    train_cls = agent_info(stage, algo).config_class()
    return dataclasses.make_dataclass(base.__name__, [("algo", str, field(default=algo)),
                                                      ("train", train_cls, field(default_factory=train_cls))],
                                      bases=(base,))


def _last_value(layers: list[Any], key: str) -> str | None:
    """What the last layer that sets top-level ``key`` (``algo``, ``task``) sets it to."""
    found = None
    for layer in layers:
        value = OmegaConf.select(layer, key, default=None)
        if value is not None:
            found = str(value)
    return found


RUN_TIME_KEYS = {"pretrain": (), "finetune": ("init",)}
"""Keys a stage's presets leave to the command line (``flowrl finetune CONFIG --init RUN``):
``flowrl config show`` prints them as unset (``???``)."""


def load_stage_config(stage: str, presets: list[str | Path] | str | Path | None = None,
                      overrides: list[str] | tuple[str, ...] = (), for_run: bool = True) -> Any:
    """A stage's config (``pretrain`` or ``finetune``): defaults, presets (later ones win) and overrides
    merged, with the ``train`` section of the algorithm they name; validated (``for_run=False``: without
    what only a run needs, :data:`RUN_TIME_KEYS` and a usable device). A preset of the other stage is
    one line saying so and naming the command that takes it."""
    layers = _layers(presets, overrides)
    algo = _last_value(layers, "algo")
    other = "finetune" if stage == "pretrain" else "pretrain"
    if algo is not None and _stage_of_algo(algo) == other:
        _wrong_stage(stage, presets, f"algo: {algo}")
    schema = stage_schema(stage, algo)
    task = _last_value(layers, "task")  # none: a fine-tune of the checkpoint's task, or validation's error
    task_layer = _task_defaults(task, schema) if task else None
    try:
        cfg = _merge(schema, layers if task_layer is None else [task_layer, *layers])
    except FlowrlError:
        preset_layers = layers[:-1] or layers  # the last layer holds the command line's overrides
        if algo is None and _fits(other, preset_layers):  # the presets' keys are the other stage's
            _wrong_stage(stage, presets)
        raise
    (validate_pretrain if stage == "pretrain" else validate_finetune)(cfg, for_run)
    return cfg


def _task_defaults(task: str, schema: type) -> Any:
    """The task's ``config_defaults`` (:class:`flowrl.envs.Task`) that ``schema`` has, as the layer under
    every preset; None when there are none (or the task is unknown: validation says so)."""
    from flowrl.envs import resolve_task
    from flowrl.registry import agents

    try:
        defaults = resolve_task(task).config_defaults
    except FlowrlError:
        return None
    base = OmegaConf.structured(schema)
    known = {key: value for key, value in defaults.items() if _has_key(base, key)}
    for key in defaults.keys() - known.keys():  # another stage's or algorithm's key is fine; no one's is a typo
        if not any(_has_key(OmegaConf.structured(stage_schema(stage, algo)), key)
                   for stage in STAGE_CONFIGS for algo in agents(stage)):
            raise FlowrlError(f"task {task}: config_defaults has '{key}', which no stage's config has")
    if not known:
        return None
    layer = OmegaConf.create()
    for key, value in known.items():
        OmegaConf.update(layer, key, value)
    return layer


def _stage_of_algo(algo: str) -> str | None:
    from flowrl.registry import agents

    stages = [stage for stage in STAGE_CONFIGS if algo in agents(stage)]
    return stages[0] if len(stages) == 1 else None


def _fits(stage: str, layers: list[Any]) -> bool:
    """Whether ``layers`` merge into ``stage``'s schema (its default algorithm) without an unknown key
    or a wrong type."""
    try:
        _merge(stage_schema(stage), layers, warn=False)
    except FlowrlError:
        return False
    return True


def _wrong_stage(stage: str, presets: Any, evidence: str = "") -> None:
    other = "finetune" if stage == "pretrain" else "pretrain"
    names = [str(p) for p in (presets if isinstance(presets, list) else [presets] if presets else [])]
    what = " + ".join(names) if names else "the overrides"
    command = f"flowrl {other} {' '.join(names) or 'CONFIG'}" + (" --init RUN" if other == "finetune" else "")
    raise FlowrlError(f"{what} is a {other} config" + (f" ({evidence})" if evidence else "")
                      + f", not a {stage} one: run it with `{command}`")


def load_config(schema: type[T], preset: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Merge defaults, a YAML preset and ``key=value`` overrides into a typed ``schema`` object."""
    return _merge(schema, _layers(preset, overrides))


def detect_stage(preset: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Whether a preset configures pretraining or fine-tuning: by the stage of the algorithm it names,
    else by its sections (pretraining has ``data``, fine-tuning ``init``)."""
    from flowrl.registry import agents

    layers = _layers(preset, overrides)
    algo = _last_value(layers, "algo")
    if algo is not None:
        for stage in STAGE_CONFIGS:
            if algo in agents(stage):
                return stage
    keys = {k for layer in layers for k in layer}
    return "pretrain" if "data" in keys or "policy" in keys else "finetune"


def _layers(presets: list[str | Path] | str | Path | None, overrides: list[str] | tuple[str, ...]) -> list[Any]:
    layers = []
    if presets is None:
        presets = []
    elif not isinstance(presets, list):
        presets = [presets]
    for preset in presets:
        path = Path(preset)
        if not path.is_file():
            raise FlowrlError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # yaml.YAMLError and friends
            raise FlowrlError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
        if not OmegaConf.is_dict(layers[-1]):
            raise FlowrlError(f"{path}: must hold a mapping of keys to values")
    for item in overrides:
        if "=" not in item:
            raise FlowrlError(f"override '{item}' is not key=value")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise FlowrlError(f"overrides: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None
    return layers


def yaml_problem(e: BaseException) -> str:
    """PyYAML's error in one line with its line and column (1-based, as editors count): ``line 3, column
    5: mapping values are not allowed here``; ``(while scanning a quoted scalar that starts at line 2,
    column 7)`` follows where PyYAML names what it was reading."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if not problem:
        lines = str(e).strip().splitlines()
        return lines[0] if lines else type(e).__name__
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = f"{where}{problem}"
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        at = (f" that starts at line {context_mark.line + 1}, column {context_mark.column + 1}"
              if context_mark is not None else "")
        text += f" ({context}{at})"
    return text


RENAMED_KEYS = {
    "policy.num_steps": "policy.k",
    "eval.steps": "eval.k",
    "train.num_steps": "train.k",
}
"""Config keys still read under an old name (old: new). K, the number of Euler steps, is ``k``
everywhere; ``steps`` is a budget of gradient steps and ``env_steps`` one of env steps. Where a schema
has the new key and not the old one (``train.num_steps`` is ReinFlow's and MLE's K; behaviour cloning
has neither), a preset or override naming the old key is read as the new one with one
:class:`RenamedWarning`; a checkpoint written under the old names loads the same way, silently."""


class RenamedWarning(FutureWarning):
    """A config key or command-line flag given by its old name, read as its new one (the ``flowrl``
    command prints it as one ``flowrl: note:`` line). A FutureWarning, which Python shows by default, so
    that scripts using the library see it too."""


def warn_renamed(old: str, new: str, where: str = "config", stacklevel: int = 3) -> None:
    """The one warning that ``old`` is now ``new``: ``config: policy.num_steps is now policy.k``.
    ``stacklevel`` 3 points the warning at the caller of the function that calls this one."""
    warnings.warn(f"{where}: {old} is now {new}", RenamedWarning, stacklevel=stacklevel)


def renamed_argument(where: str, old: str, new: str, old_value: Any, new_value: Any,
                     required: bool = False) -> Any:
    """The value of a keyword argument ``new`` of ``where`` that callers may still pass by its old name
    ``old`` (both default to None): ``old_value`` with one :class:`RenamedWarning` pointed at the
    caller of ``where`` when only the old name is given, else ``new_value``. Both given is a one-line
    error naming both; neither, when ``required``, a TypeError like Python's for a missing argument."""
    if old_value is not None:
        if new_value is not None:
            raise FlowrlError(f"{where}: {old} is the old name of {new}; give only {new}")
        warn_renamed(old, new, where, stacklevel=4)
        return old_value
    if new_value is None and required:
        raise TypeError(f"{where}() missing required argument: '{new}'")
    return new_value


def _has_key(node: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not OmegaConf.is_dict(node) or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def _section(layer: Any, dotted: str) -> Any:
    """The mapping at ``dotted`` in ``layer`` ("" for the layer itself), or None."""
    node = layer
    for part in filter(None, dotted.split(".")):
        node = node.get(part) if OmegaConf.is_dict(node) else None
    return node if OmegaConf.is_dict(node) else None


def rename_old_keys(base: Any, layers: list[Any], prefix: str = "", warn: bool = True) -> list[Any]:
    """``layers`` with every old key of :data:`RENAMED_KEYS` that ``base`` (the structured schema they
    merge into, whose keys sit under ``prefix``, e.g. ``policy.``) has renamed moved to its new name,
    and one :class:`RenamedWarning` per old key found (``warn``). A layer giving both names is a
    one-line error. The layers given are not changed."""
    renames = []
    for old, new in RENAMED_KEYS.items():
        if old.startswith(prefix) and new.startswith(prefix):
            old_rel, new_rel = old[len(prefix):], new[len(prefix):]
            if _has_key(base, new_rel) and not _has_key(base, old_rel):
                renames.append((old, new, old_rel, new_rel))
    found: list[tuple[str, str]] = []
    out = []
    for layer in layers:
        layer = copy.deepcopy(layer)  # a few keys: the caller's layers stay as given
        for old, new, old_rel, new_rel in renames:
            where, _, old_leaf = old_rel.rpartition(".")
            section = _section(layer, where)
            if section is None or old_leaf not in section:
                continue
            new_leaf = new_rel.rpartition(".")[2]  # every rename stays within its section
            if new_leaf in section:
                fail(old, f"is the old name of {new}, which is also given; keep only {new}")
            section[new_leaf] = section._get_node(old_leaf)
            del section[old_leaf]
            if (old, new) not in found:
                found.append((old, new))
        out.append(layer)
    if warn:
        for old, new in found:
            warn_renamed(old, new)
    return out


def _merge(schema: type[T], layers: list[Any], warn: bool = True) -> T:
    try:
        base = OmegaConf.structured(schema)
        layers = rename_old_keys(base, layers, warn=warn)
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


def from_dict(schema: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Rebuild a typed config from a plain dict (e.g. a checkpoint's config.json), whose keys sit under
    ``prefix`` in a stage config (``policy.`` for a checkpoint's policy); keys of :data:`RENAMED_KEYS`
    written by an older flowrl are read under their new names, without a warning (a record, not
    something the user wrote)."""
    try:
        base = OmegaConf.structured(schema)
        layers = rename_old_keys(base, [OmegaConf.create(data)], prefix, warn=False)
        return OmegaConf.to_object(OmegaConf.merge(base, *layers))
    except OmegaConfBaseException as e:
        raise FlowrlError(f"config: {getattr(e, 'full_key', '?')}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def field_docs(schema: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (and of the dataclasses it extends)."""
    docs: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError):  # made at run time (stage_schema): its fields' docs are its bases'
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
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
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(sub := factory()):
            rows.extend(describe(type(sub), prefix=f"{key}."))
        else:
            value = OmegaConf.select(defaults, f.name, default="???", throw_on_missing=False)
            shown = "(required)" if OmegaConf.is_missing(defaults, f.name) else str(
                OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
            rows.append((key, shown, docs.get(f.name, "")))
    return rows
