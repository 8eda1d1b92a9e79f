"""The one training loop every agent runs in.

An agent (:class:`Agent`) keeps its algorithm in its own file: ``train_iteration`` does one
iteration (a gradient step, or a rollout and an update) and returns its log scalars, and
``state_components`` names everything its training state consists of. :class:`Trainer` does the
rest, the same way for every agent: a progress bar with rate and ETA, Ctrl-C (checkpoint, then
exit), periodic evaluation and checkpoints, ``best`` (the starting policy is a candidate when the
agent fine-tunes) and the last checkpoint, ``train.max_minutes``, TensorBoard, the final
evaluation table and exact resume (the training state saved and restored whole). Under torchrun
(:mod:`flowrl.distributed`) every rank runs the loop; rank 0 alone evaluates and writes, and a stop
(Ctrl-C, the time limit) taken on any rank is taken on all at the same iteration.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from flowrl import distributed
from flowrl.checkpoint import save_checkpoint
from flowrl.config import LoopConfig, renamed_argument, to_dict
from flowrl.envs import resolve_task
from flowrl.errors import FlowrlError, Interrupted
from flowrl.evaluation import SELECTION_SEED, Evaluator
from flowrl.policy import FlowPolicy
from flowrl.run import RunFolder, format_eval_table, stop_on_ctrl_c


class Agent(ABC):
    """What the training loop needs of an algorithm."""

    algo: str
    """The name it is registered under (``flowrl.registry``)."""
    stage: str
    """``pretrain`` or ``finetune``."""
    cfg: Any
    """The stage config; ``cfg.train`` is a :class:`flowrl.config.LoopConfig`."""
    task: str
    device: torch.device
    iterations: int
    """Iterations in the whole budget."""
    steps_per_iteration: int = 1
    """How far one iteration advances ``step``, the x axis of logs and checkpoints (gradient steps,
    env steps)."""
    step_unit: str = "step"
    evaluate_at_start: bool = False
    """Evaluate the starting policy before the first iteration (fine-tuning: it is a candidate for best)."""
    evaluates_in_simulation: bool = True
    """False for an agent whose policies are not rolled out in simulation: no periodic or final evaluation."""
    supports_distributed: bool = False
    """The agent shards its data or envs over torchrun's ranks and averages its gradients
    (:mod:`flowrl.distributed`); others refuse to run on more than one rank."""

    @property
    @abstractmethod
    def policy(self) -> FlowPolicy:
        """The deterministic policy that is evaluated, saved and deployed."""

    @abstractmethod
    def train_iteration(self, iteration: int) -> dict[str, float]:
        """One iteration; returns TensorBoard scalars (SB3's names where they exist)."""

    @abstractmethod
    def state_components(self) -> dict[str, Any]:
        """Everything the next iterations depend on, by name: modules, optimisers, schedulers,
        generators, envs with ``get_full_state``, dataclasses of counters and statistics."""

    def resumable_keys(self) -> tuple[str, ...]:
        """Config keys that may change when a run is resumed (its budget and time limit)."""
        return ("train.max_minutes",)

    optional_state: tuple[str, ...] = ()
    """Training-state components a checkpoint may lack (per-rank state such as running episodes, which a
    checkpoint of a distributed run does not hold): left as built, and passed to :meth:`on_resume`."""

    def on_resume(self, missing: list[str] | None = None) -> None:
        """Called after the training state was restored."""

    def checkpoint_info(self) -> dict[str, Any]:
        """Facts for ``config.json`` beyond the loop's own (e.g. the dataset or the initial checkpoint)."""
        return {}

    def postfix(self, logs: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows beside the rate."""
        return {}

    def release_rollout_envs(self) -> None:
        """Free what training needed but evaluation does not (robosuite's rollout workers)."""

    def close(self) -> None:
        """Release every env the agent holds."""


# -- whole-state save and restore ----------------------------------------------------------------

def capture(components: dict[str, Any]) -> dict[str, Any]:
    """The state of every component, as tensors and plain containers (``torch.load(weights_only=True)``)."""
    out: dict[str, Any] = {}
    for name, obj in components.items():
        if isinstance(obj, torch.Generator):
            out[name] = obj.get_state()
        elif hasattr(obj, "get_full_state"):
            out[name] = obj.get_full_state()
        elif hasattr(obj, "state_dict"):
            out[name] = obj.state_dict()
        elif dataclasses.is_dataclass(obj):
            out[name] = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        else:
            raise TypeError(f"cannot save training-state component '{name}' of type {type(obj).__name__}")
    return out


def restore(components: dict[str, Any], state: dict[str, Any], optional: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` into ``components``; returns the ``optional`` ones the state lacks (left as they are)."""
    missing = []
    for name, obj in components.items():
        if name not in state:
            if name in optional:
                missing.append(name)
                continue
            raise FlowrlError(f"training state lacks '{name}' (written by another version of the agent?)")
        value = state[name]
        if isinstance(obj, torch.Generator):
            obj.set_state(value)
        elif hasattr(obj, "set_full_state"):
            obj.set_full_state(value)
        elif hasattr(obj, "load_state_dict"):
            obj.load_state_dict(value)
        else:
            for f in dataclasses.fields(obj):
                if f.name not in value:  # a field newer than the checkpoint keeps its default
                    continue
                current = getattr(obj, f.name)
                loaded = value[f.name]
                if isinstance(current, torch.Tensor):
                    loaded = loaded.to(current.device)
                elif hasattr(current, "maxlen"):  # a deque keeps its window
                    loaded = type(current)(loaded, maxlen=current.maxlen)
                setattr(obj, f.name, loaded)
    return missing


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if hasattr(value, "maxlen") or isinstance(value, (list, tuple)):
        return list(value)
    return value


# -- the loop ------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoopState:
    """The loop's own counters, saved with the agent's state."""

    iteration: int = 0
    wall_clock: float = 0.0
    best_score: float = -math.inf
    """Success rate where the task reports success, else mean return, of the ``best`` checkpoint."""
    best_step: int = -1
    eval_history: list = dataclasses.field(default_factory=list)
    """Learning curve: one record per evaluation (iteration, step, wall clock, return, success)."""
    iteration_seconds: list = dataclasses.field(default_factory=list)


class Trainer:
    """Runs an agent to its budget in a run folder: ``Trainer(agent, out).fit()``."""

    def __init__(self, agent: Agent, out: str | Path, resume: bool = False, progress: bool = True) -> None:
        self.dist = distributed.current()
        if self.dist.active and not agent.supports_distributed:
            raise FlowrlError(f"algorithm '{agent.algo}' does not run on several ranks yet (WORLD_SIZE="
                              f"{self.dist.world_size}); run it in one process")
        self.agent = agent
        self.loop: LoopConfig = agent.cfg.train
        self.progress = progress and self.dist.is_main
        self.state = LoopState()
        self.evaluator = Evaluator.from_config(agent.task, agent.cfg.eval, agent.device)
        self.on_eval: Any = None  # called after each evaluation (benchmarks stream their curves)
        self._stop_requested = self._score_reached = False
        self.run = RunFolder(out)
        started = self.run.start(agent.cfg, resume, resumable_keys=agent.resumable_keys()) if self.dist.is_main else False
        started = self.dist.broadcast_object(started)
        if resume and started:
            self._restore()
        elif resume:
            print(f"--resume: {self.run.path} has no checkpoint yet; starting from the beginning", file=sys.stderr)

    @property
    def step(self) -> int:
        return self.state.iteration * self.agent.steps_per_iteration

    # -- checkpoints -----------------------------------------------------------------------------
    def _components(self) -> dict[str, Any]:
        return {"loop": self.state, **self.agent.state_components()}

    def info(self) -> dict[str, Any]:
        a = self.agent
        layout = resolve_task(a.task).obs_layout
        return {"task": a.task, "stage": a.stage, "algorithm": a.algo, "step": self.step,
                "iteration": self.state.iteration, "observation_layout": [list(p) for p in layout],
                **a.checkpoint_info(), "run_config": to_dict(a.cfg)}

    def save(self) -> Path:
        """Write the checkpoint of this step (rank 0; the others only return its path)."""
        path = self.run.checkpoint_dir(self.step)
        if not self.dist.is_main:
            return path
        state = {"components": capture(self._components()), "torch_rng": torch.get_rng_state()}
        return save_checkpoint(path, self.agent.policy, self.info(), state)

    def _restore(self) -> None:
        latest = self.run.latest_checkpoint()
        assert latest is not None
        from flowrl.checkpoint import load_train_state

        state = load_train_state(latest)
        if "components" not in state:
            raise FlowrlError(f"{latest}: training state of an older flowrl; it cannot be resumed by this one")
        missing = restore(self._components(), state["components"], self.agent.optional_state)
        torch.set_rng_state(state["torch_rng"])
        self.agent.on_resume(missing)
        if not self.dist.is_main:
            return
        print(f"resumed {self.run.path} at iteration {self.state.iteration} ({self.step} {self.agent.step_unit}s)",
              file=sys.stderr)

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, k: int | None = None, episodes: int | None = None, seed: int | None = None, *,
                 num_steps: int | None = None) -> dict[str, float]:
        """The deployed policy at K = ``k`` on ``episodes`` seeded episodes (the eval section's seed
        unless given); periodic and final evaluations share one set of envs (robosuite's are worker
        processes). ``num_steps`` is the old name of ``k``."""
        k = renamed_argument("Trainer.evaluate", "num_steps", "k", num_steps, k, required=True)
        if episodes is None:
            raise TypeError("Trainer.evaluate() missing required argument: 'episodes'")
        policy = self.agent.policy
        was_training = policy.training
        policy.eval()
        try:
            return self.evaluator(policy, k, episodes, seed)
        finally:
            policy.train(was_training)

    def _periodic_eval(self, writer: Any, bar: Any) -> None:
        if not self.dist.is_main or not self.agent.evaluates_in_simulation:
            return
        k = self.agent.policy.cfg.k
        r = self.evaluate(k, self.loop.eval_episodes, SELECTION_SEED)
        writer.add_scalar("eval/mean_reward", r["return_mean"], self.step)
        writer.add_scalar("eval/std_reward", r["return_std"], self.step)  # the episodes' spread (flowrl plot's band)
        writer.add_scalar("eval/mean_ep_length", r["length_mean"], self.step)
        unit = self.agent.step_unit.replace(" ", "_") + "s"  # env_steps, steps
        record = {"iteration": self.state.iteration, unit: self.step, "wall_clock_s": round(self.state.wall_clock, 2),
                  "return_mean": r["return_mean"], "return_std": r["return_std"], "return_min": r["return_min"],
                  "return_max": r["return_max"], "length_mean": r["length_mean"]}
        text = f"eval return {r['return_mean']:.1f} ± {r['return_std']:.1f}"
        if "success_rate" in r:
            writer.add_scalar("eval/success_rate", r["success_rate"], self.step)
            record["success_rate"] = r["success_rate"]
            text += f", success {100 * r['success_rate']:.0f}%"
        self.state.eval_history.append(record)
        bar.write(f"{self.agent.step_unit} {self.step} (iteration {self.state.iteration}): {text} "
                  f"(K={k}, {self.loop.eval_episodes} episodes)")
        score = r.get("success_rate", r["return_mean"])
        if self.loop.stop_at_score is not None and score >= self.loop.stop_at_score:
            self._score_reached = True
        if score > self.state.best_score:
            self.state.best_score, self.state.best_step = score, self.step
            save_checkpoint(self.run.checkpoints / "best", self.agent.policy, {**self.info(), "eval": r})
        if self.on_eval is not None:
            self.on_eval()

    # -- the loop --------------------------------------------------------------------------------
    def _say(self, bar: Any, text: str) -> None:
        if self.dist.is_main:
            bar.write(text)

    def _target_reached(self) -> bool:
        return self.loop.stop_at_score is not None and self.dist.any(self._score_reached)

    def request_stop(self, *_: Any) -> None:
        """Finish the current iteration, save a checkpoint and stop (what Ctrl-C does)."""
        self._stop_requested = True

    def resume_hint(self) -> str:
        return f"continue with: flowrl {self.agent.stage} --resume --out {self.run.path}"

    def fit(self) -> FlowPolicy:
        """Train to the budget, ``train.max_minutes``, ``train.stop_at_score`` or Ctrl-C, whichever comes
        first."""
        a, loop, st = self.agent, self.loop, self.state
        deadline = time.time() + 60.0 * loop.max_minutes if loop.max_minutes else math.inf
        writer = self.run.writer(purge_step=self.step if self.step else None) if self.dist.is_main else _NoWriter()
        bar = tqdm(total=a.iterations * a.steps_per_iteration, initial=self.step, unit=a.step_unit, unit_scale=True,
                   desc=f"{a.algo} {a.task}", disable=not self.progress, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        self._stop_requested = self._score_reached = False
        try:
            with stop_on_ctrl_c(self.request_stop):
                if st.iteration == 0 and loop.eval_every and a.evaluate_at_start:
                    self._periodic_eval(writer, bar)
                reached = self._target_reached()
                if reached:  # the starting policy already scores enough: its checkpoint ends the run
                    self.save()
                while st.iteration < a.iterations and not reached:
                    if self.dist.any(self._stop_requested):
                        raise KeyboardInterrupt
                    start = time.time()
                    logs = a.train_iteration(st.iteration)
                    st.iteration += 1
                    elapsed = time.time() - start
                    st.wall_clock += elapsed
                    st.iteration_seconds.append(elapsed)
                    bar.update(a.steps_per_iteration)
                    if st.iteration % loop.log_every == 0 or st.iteration == a.iterations:
                        logs["time/fps"] = a.steps_per_iteration / max(elapsed, 1e-9)
                        for k, v in logs.items():
                            if v is not None:
                                writer.add_scalar(k, v, self.step)
                        bar.set_postfix(a.postfix(logs), refresh=False)
                    out_of_time = self.dist.any(time.time() >= deadline)
                    last = st.iteration == a.iterations or out_of_time
                    if loop.eval_every and (st.iteration % loop.eval_every == 0 or last):
                        self._periodic_eval(writer, bar)
                    reached = self._target_reached()
                    if st.iteration % loop.checkpoint_every == 0 or last or reached:
                        self.save()
                    if out_of_time and st.iteration < a.iterations:
                        self._say(bar, f"stopped at the time limit (train.max_minutes={loop.max_minutes:g}) after "
                                       f"iteration {st.iteration} of {a.iterations}; {self.resume_hint()}")
                        break
                if reached and st.iteration < a.iterations:
                    self._say(bar, f"stopped at iteration {st.iteration}: the evaluation reached train.stop_at_score="
                                   f"{loop.stop_at_score:g}")
        except KeyboardInterrupt:
            self.save()
            bar.close()
            self.run.close()
            raise Interrupted(f"interrupted at iteration {st.iteration}; checkpoint saved, {self.resume_hint()}") from None
        bar.close()
        writer.flush()
        return a.policy

    def final_evaluation(self) -> list[dict[str, float]]:
        """The eval section's episodes at each of its K, of the checkpoint the run folder stands for
        (:func:`flowrl.checkpoint.checkpoint_choice`: ``best`` when the periodic evaluations that chose it
        ran at least :data:`flowrl.config.MIN_SELECTION_EPISODES` episodes, else the last), loaded from
        disk: the policy ``flowrl eval RUN``, describe and export take, so this table is theirs. Printed,
        naming the checkpoint and why it was chosen, and added to ``eval.json`` (rank 0; the others
        return no rows)."""
        self.agent.release_rollout_envs()
        if not self.dist.is_main:
            return []
        if not self.agent.evaluates_in_simulation:
            print(f"no evaluation: {self.agent.algo} does not evaluate in simulation", file=sys.stderr)
            return []
        from flowrl.checkpoint import checkpoint_choice, load_policy

        checkpoint, why = checkpoint_choice(self.run.path)
        policy, config = load_policy(checkpoint, self.agent.device)
        step = config.get("step", self.step)
        e = self.agent.cfg.eval
        rows = [self.evaluator(policy, k, e.episodes) for k in e.k]
        writer = self.run.writer()
        for r in rows:
            writer.add_scalar(f"eval/mean_reward_K{r['k']}", r["return_mean"], step)
        writer.flush()
        extra = {k: v for k, v in self.agent.checkpoint_info().items() if k in ("init", "dataset_return_mean")}
        self.run.append_eval({"checkpoint": str(checkpoint), "chosen": why, "task": self.agent.task, "step": step,
                              "stage": self.agent.stage, **extra, "results": rows})
        title = f"evaluation of {checkpoint} (step {step}; {why}) on {self.agent.task}, {e.episodes} episodes per K"
        if "dataset_return_mean" in extra:
            title += f" (demonstrations: {extra['dataset_return_mean']:.1f})"
        print(format_eval_table(rows, title))
        return rows

    def close(self) -> None:
        self.agent.close()
        self.evaluator.close()
        self.run.close()


class _NoWriter:
    """The TensorBoard writer of ranks other than 0."""

    def add_scalar(self, *_: Any, **__: Any) -> None:
        pass

    def flush(self) -> None:
        pass


def mean_or_none(values: Any) -> float | None:
    return float(np.mean(values)) if len(values) else None
