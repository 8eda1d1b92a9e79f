"""A fixed-rate control loop around a deployed policy, with deadline accounting.

A controller ticks at ``rate`` Hz: read an observation, send an action. The policy produces chunks;
the loop executes their first ``act_steps`` actions one per tick (receding horizon). Inference runs
in a worker thread so that the loop never blocks past a deadline:

- synchronous (default): when the queue is empty the loop asks for a chunk from the current
  observation history and waits for it until the tick's deadline (``deadline`` of the period,
  0.8 by default); a chunk that is not there in time is a **deadline miss**: the last safe action is
  held (sent again; before any action, ``safe_action``, by default the middle of the bounds) and the
  miss counted. When the late chunk arrives, its actions meant for the ticks already past are
  dropped (time alignment) and the rest are executed.
- asynchronous (``async_inference=True``, LeRobot's asynchronous inference): the next chunk is asked
  for as soon as the queue holds at most ``queue_threshold * act_steps`` actions, and computed
  while the current ones execute; an arriving chunk replaces the queue from the action aligned with
  the current tick. A miss is a tick with an empty queue.

Latencies (inference: from request to chunk; tick: from reading the observation to sending the
action) are kept and summarised as p50, p99 and max. :class:`SimulatedRobot` puts one env of our
tasks behind the robot interface for tests and ``flowrl deploy-sim``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from flowrl.deploy.runtime import DeployedPolicy
from flowrl.errors import FlowrlError


class Robot(Protocol):
    """What the control loop needs of a robot (real or simulated)."""

    def read_observation(self) -> np.ndarray:
        """The current observation (obs_dim,)."""
        ...

    def send_action(self, action: np.ndarray) -> None:
        """Apply one action (act_dim,) in env units."""
        ...


class SimulatedRobot:
    """One env of a task behind the :class:`Robot` interface; ``send_action`` steps it.

    An episode that ends is reset in the same step (``env.step``); ``episode_ended`` is then True until
    the next ``send_action`` and the episode's return and length are appended to ``episodes``."""

    def __init__(self, task: str, seed: int = 0, backend: str = "auto") -> None:
        from flowrl.envs import make

        self.env = make(task, 1, backend=backend, seed=seed)
        self._obs = self.env.reset()
        self.episode_return, self.episode_length = 0.0, 0
        self.episode_ended = False
        self.episodes: list[dict[str, float]] = []

    def read_observation(self) -> np.ndarray:
        return self._obs[0].detach().cpu().numpy()

    def send_action(self, action: np.ndarray) -> None:
        a = torch.as_tensor(np.asarray(action, dtype=np.float32)).view(1, -1)
        obs, reward, terminated, truncated, _ = self.env.step(a)
        self._obs = obs
        self.episode_return += float(reward[0])
        self.episode_length += 1
        self.episode_ended = bool(terminated[0] or truncated[0])
        if self.episode_ended:
            self.episodes.append({"return": self.episode_return, "length": self.episode_length})
            self.episode_return, self.episode_length = 0.0, 0

    def close(self) -> None:
        self.env.close()


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and max of latencies in milliseconds (NaN when there are none)."""
    if not seconds:
        return {"count": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    ms = np.asarray(seconds) * 1e3
    return {"count": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


@dataclass
class LoopStats:
    """What a control loop run measured."""

    rate_hz: float
    ticks: int = 0
    misses: int = 0
    """Ticks whose action was not ready by the deadline (the last safe action was held)."""
    overruns: int = 0
    """Ticks that started late because the previous one ran past its period."""
    dropped_actions: int = 0
    """Actions of late chunks skipped because their ticks had passed."""
    inference_s: list[float] = field(default_factory=list)
    tick_s: list[float] = field(default_factory=list)
    episodes: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"rate_hz": self.rate_hz, "ticks": self.ticks, "misses": self.misses, "overruns": self.overruns,
                "dropped_actions": self.dropped_actions, "inference": latency_summary(self.inference_s),
                "tick": latency_summary(self.tick_s), "episodes": self.episodes}

    def table(self) -> str:
        """The latency table ``flowrl deploy-sim`` prints."""
        rows = [("inference (request -> chunk)", latency_summary(self.inference_s)),
                ("tick (observation -> action)", latency_summary(self.tick_s))]
        lines = [f"{'':<30}{'count':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"]
        for name, s in rows:
            lines.append(f"{name:<30}{s['count']:>7}{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}{s['max_ms']:>9.3f}")
        pct = 100.0 * self.misses / max(self.ticks, 1)
        lines.append(f"ticks {self.ticks} at {self.rate_hz:g} Hz, deadline misses {self.misses} ({pct:.1f}%), "
                     f"overruns {self.overruns}, stale actions dropped {self.dropped_actions}")
        return "\n".join(lines)


class ControlLoop:
    """Runs ``policy`` on ``robot`` at ``rate_hz`` (module doc: deadlines, holding, async inference)."""

    def __init__(self, policy: DeployedPolicy, robot: Robot, rate_hz: float, deadline: float = 0.8,
                 async_inference: bool = False, queue_threshold: float = 0.5,
                 safe_action: np.ndarray | None = None, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate_hz > 0:
            raise FlowrlError(f"rate must be > 0 Hz, got {rate_hz}")
        if not 0.0 < deadline <= 1.0:
            raise FlowrlError(f"deadline must be a fraction of the period in (0, 1], got {deadline}")
        if not 0.0 <= queue_threshold <= 1.0:
            raise FlowrlError(f"queue threshold must be in [0, 1], got {queue_threshold}")
        if policy.temporal_ensemble is not None:
            raise FlowrlError("the control loop executes chunks (receding horizon); temporal ensembling runs "
                              "through policy.act in a loop of your own")
        self.policy, self.robot = policy, robot
        self.period = 1.0 / rate_hz
        self.deadline = deadline * self.period
        self.async_inference, self.queue_threshold = async_inference, queue_threshold
        mid = 0.5 * (policy.action_low + policy.action_high)
        self.safe_action = np.asarray(mid if safe_action is None else safe_action, dtype=np.float32)
        if self.safe_action.shape != (policy.act_dim,):
            raise FlowrlError(f"safe action must have shape ({policy.act_dim},), got {self.safe_action.shape}")
        self.clock, self.sleep = clock, sleep
        self.stats = LoopStats(rate_hz)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowrl-inference")

    def _infer(self, history: np.ndarray) -> tuple[np.ndarray, float]:
        start = self.clock()
        chunk = self.policy.infer(history[None])[0]
        return chunk, self.clock() - start

    def run(self, ticks: int | None = None, episodes: int | None = None, seed: int = 0) -> LoopStats:
        """Tick until ``ticks`` ticks or ``episodes`` episodes of the robot (it must count them in
        ``episodes`` and flag ``episode_ended``, as :class:`SimulatedRobot` does) have passed."""
        if ticks is None and episodes is None:
            raise FlowrlError("give the number of ticks or of episodes to run")
        stats, policy = self.stats, self.policy
        policy.reset(seed)
        queue: deque[np.ndarray] = deque()
        pending: Future | None = None
        pending_tick = 0
        last_action = self.safe_action
        low = max(1, int(np.floor(self.queue_threshold * policy.act_steps)))
        start = self.clock()
        tick = 0
        try:
            while True:
                if ticks is not None and tick >= ticks:
                    break
                if episodes is not None and len(getattr(self.robot, "episodes", [])) >= episodes:
                    break
                t0 = start + tick * self.period
                now = self.clock()
                if now < t0:
                    self.sleep(t0 - now)
                elif now - t0 > self.deadline:
                    stats.overruns += 1
                tick_start = self.clock()
                history = policy.push_observation(self.robot.read_observation())
                need = (len(queue) <= low) if self.async_inference else not queue
                if need and pending is None:
                    pending, pending_tick = self._pool.submit(self._infer, history.copy()), tick
                if pending is not None and (self.async_inference is False or not queue):
                    # wait for the chunk until this tick's deadline (async: only when nothing is queued)
                    remaining = t0 + self.deadline - self.clock()
                    if remaining > 0:
                        try:
                            pending.result(timeout=remaining)
                        except TimeoutError:
                            pass
                if pending is not None and pending.done():
                    chunk, latency = pending.result()
                    stats.inference_s.append(latency)
                    actions = chunk if self.async_inference else chunk[:policy.act_steps]
                    stale = tick - pending_tick
                    stats.dropped_actions += min(stale, len(actions))
                    queue = deque(actions[stale:])
                    pending = None
                if queue:
                    action = queue.popleft()
                else:
                    action = last_action
                    stats.misses += 1
                self.robot.send_action(action)
                last_action = action
                stats.tick_s.append(self.clock() - tick_start)
                stats.ticks += 1
                tick += 1
                if getattr(self.robot, "episode_ended", False):
                    if pending is not None:
                        pending.result()  # the old episode's chunk: finished, then discarded
                        pending = None
                    queue.clear()
                    policy.reset(seed + len(getattr(self.robot, "episodes", [])))
                    last_action = self.safe_action
        finally:
            if pending is not None:
                pending.cancel()
        stats.episodes = list(getattr(self.robot, "episodes", []))
        return stats

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def run_simulated(policy: DeployedPolicy, task: str, rate_hz: float, episodes: int = 1, seed: int = 0,
                  async_inference: bool = False, queue_threshold: float = 0.5, deadline: float = 0.8,
                  backend: str = "auto") -> LoopStats:
    """``episodes`` episodes of ``policy`` on a :class:`SimulatedRobot` of ``task`` at ``rate_hz``."""
    if episodes < 1:
        raise FlowrlError(f"episodes must be >= 1, got {episodes}")
    robot = SimulatedRobot(task, seed=seed, backend=backend)
    if robot.env.obs_dim != policy.obs_dim or robot.env.act_dim != policy.act_dim:
        robot.close()
        raise FlowrlError(f"the policy reads {policy.obs_dim} and writes {policy.act_dim} numbers; task {task} "
                          f"has observations of {robot.env.obs_dim} and actions of {robot.env.act_dim}")
    loop = ControlLoop(policy, robot, rate_hz, deadline=deadline, async_inference=async_inference,
                       queue_threshold=queue_threshold)
    try:
        return loop.run(episodes=episodes, seed=seed)
    finally:
        loop.close()
        robot.close()
