"""robosuite's manipulation tasks as a batched env: one worker process per env.

Panda arm(s) with robosuite's default BASIC composite controller (OSC_POSE arm, gripper),
low-dimensional observations under robomimic's keys (``object``, ``robot0_eef_pos``,
``robot0_eef_quat``, ``robot0_gripper_qpos``, and ``robot1_*`` for two arms) concatenated in sorted
key order (the order our robomimic reader uses), episodes that end only as truncations at the
horizon (robosuite's tasks have no terminal states), ``info["success"]`` per env, and per-env
seeding that reseeds each env's own generator in place and never touches numpy's global one.
``terminate_on_success=True`` ends an episode as a termination at its first success instead
(robomimic's ``terminate_on_success``): the goal-reaching form of the task that RL fine-tuning uses.
Each worker applies :mod:`flowrl.envs.robosuite_compat` before it builds its env.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch

from flowrl.envs.base import BatchedEnv
from flowrl.errors import FlowrlError

TASKS = {"Lift": ("Lift", "Panda", 400), "PickPlaceCan": ("PickPlaceCan", "Panda", 400),
         "NutAssemblySquare": ("NutAssemblySquare", "Panda", 400),
         "TwoArmTransport": ("TwoArmTransport", ["Panda", "Panda"], 800)}


BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextmanager
def single_threaded_blas_children() -> Iterator[None]:
    """Processes started inside inherit one BLAS/OpenMP thread unless the user set a number.

    robosuite's controllers do small numpy linear algebra at every physics step; left alone, each
    worker's BLAS sizes its pool to the whole machine, so N workers on N cores start N x N threads
    that compete for the cores (on the 2-core dev machine: 4 threads per worker and 10% fewer steps/s).
    """
    saved = {k: os.environ.get(k) for k in BLAS_THREAD_VARS}
    for k in BLAS_THREAD_VARS:
        os.environ.setdefault(k, "1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def robosuite_task(name: str) -> str:
    """``Lift``, ``lift`` or ``robosuite/lift`` -> ``Lift``; an unknown name is a FlowrlError listing the known."""
    wanted = name.strip().split("/", 1)[-1].lower()
    for known in TASKS:
        if known.lower() == wanted:
            return known
    raise FlowrlError(f"unknown robosuite task '{name}'; known: " + ", ".join(f"robosuite/{t}" for t in TASKS))


def obs_keys(num_robots: int) -> list[str]:
    keys = ["object"]
    for r in range(num_robots):
        keys += [f"robot{r}_eef_pos", f"robot{r}_eef_quat", f"robot{r}_gripper_qpos"]
    return sorted(keys)


def flatten_obs(obs: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(obs["object-state" if k == "object" else k], dtype=np.float64).ravel()
                           for k in keys])


class StepResult(NamedTuple):
    """What a worker sends back for one step (``next_obs``: the next episode's first observation
    when this one ended, else ``obs``)."""

    obs: np.ndarray
    reward: float
    terminated: bool
    truncated: bool
    success: bool
    episode_return: float
    episode_length: int
    next_obs: np.ndarray


def _worker(conn: Any, task: str, horizon: int, terminate_on_success: bool) -> None:
    # workers never render; importing robosuite sets MUJOCO_GL=egl, which a machine without EGL fails on
    os.environ["MUJOCO_GL"] = "disable"
    from flowrl.envs.robosuite_compat import apply

    apply()
    import robosuite

    name, robots, _ = TASKS[task]
    env = robosuite.make(name, robots=robots, has_renderer=False, has_offscreen_renderer=False,
                         use_camera_obs=False, ignore_done=True, horizon=horizon, reward_shaping=False)
    keys = obs_keys(len(env.robots))
    low, high = env.action_spec
    first = env.reset()
    layout = [(k, int(np.asarray(first["object-state" if k == "object" else k]).size)) for k in keys]
    conn.send((layout, low, high))
    ret, length = 0.0, 0
    while True:
        try:
            cmd, arg = conn.recv()
        except (EOFError, OSError):  # the parent went away without closing us
            return
        if cmd == "reset":
            if arg is not None:  # in place: the placement samplers hold references to env.rng
                env.rng.bit_generator.state = np.random.default_rng(arg).bit_generator.state
            ret, length = 0.0, 0
            conn.send(flatten_obs(env.reset(), keys))
        elif cmd == "chunk":  # (T, act_dim) actions: T steps, one reply
            results = []
            for action in arg:
                obs, reward, _, _ = env.step(action)
                success = bool(env._check_success())
                ret, length = ret + float(reward), length + 1
                terminated = success and terminate_on_success
                truncated = length >= horizon and not terminated
                flat = flatten_obs(obs, keys)
                result = StepResult(flat, float(reward), terminated, truncated, success, ret, length, flat)
                if terminated or truncated:
                    ret, length = 0.0, 0
                    result = result._replace(next_obs=flatten_obs(env.reset(), keys))
                results.append(result)
            conn.send(results)
        elif cmd == "close":
            env.close()
            conn.close()
            return
        else:  # the parent runs other code than this worker (e.g. the package changed on disk mid-run)
            raise RuntimeError(f"robosuite worker: unknown command {cmd!r}")


class RobosuiteEnv(BatchedEnv):
    """N robosuite envs in N worker processes (spawned, so each applies the compatibility layer)."""

    def __init__(self, task: str, num_envs: int, device: str | torch.device = "cpu", seed: int | None = None,
                 horizon: int | None = None, terminate_on_success: bool = False) -> None:
        task = robosuite_task(task)
        if importlib.util.find_spec("robosuite") is None:  # not imported here: it changes os.environ
            raise FlowrlError("robosuite is not installed; see the README (robosuite)")
        self.task = f"robosuite/{task}"
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.max_episode_steps = horizon or TASKS[task][2]
        self._seed = seed
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        with single_threaded_blas_children():
            for _ in range(num_envs):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, task, self.max_episode_steps, terminate_on_success),
                                   daemon=True)
                proc.start()
                self._conns.append(parent)
                self._procs.append(proc)
        layout, low, high = self._recv(0)
        for i in range(1, num_envs):
            self._recv(i)
        self.obs_layout: list[tuple[str, int]] = layout  # (robomimic key, size) in observation order
        obs_dim = sum(size for _, size in layout)
        self.env_args = {"env_name": TASKS[task][0], "type": 1,
                         "env_kwargs": {"robots": TASKS[task][1], "controller": "BASIC (OSC_POSE arm)",
                                        "horizon": self.max_episode_steps, "reward_shaping": False,
                                        "use_camera_obs": False}}
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float64)
        self.single_action_space = gym.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)

    def _dead(self, i: int) -> FlowrlError:
        self.close()
        return FlowrlError(f"{self.task}: worker process {i} exited (its error, if any, is printed above)")

    def _send(self, i: int, message: tuple[str, Any]) -> None:
        try:
            self._conns[i].send(message)
        except (BrokenPipeError, OSError):
            raise self._dead(i) from None

    def _recv(self, i: int) -> Any:
        try:
            return self._conns[i].recv()
        except (EOFError, OSError):
            raise self._dead(i) from None

    def _t(self, x: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=self.device)

    def reset(self, seed: int | None = None) -> torch.Tensor:
        seed = self._seed if seed is None else seed
        for i in range(self.num_envs):
            self._send(i, ("reset", None if seed is None else seed + i))
        return self._t(np.stack([self._recv(i) for i in range(self.num_envs)]))

    def step(self, action: torch.Tensor):
        expected = (self.num_envs, *self.single_action_space.shape)
        if tuple(action.shape) != expected:
            raise FlowrlError(f"{self.task}: actions of shape {tuple(action.shape)}, expected {expected}")
        return self.step_chunk(action.unsqueeze(1))[0]

    def step_chunk(self, actions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor, dict[str, Any]]]:
        """All T steps of a (N, T, act_dim) chunk in one round trip per worker (a list of ``step`` results):
        4-action chunks ran 1.02-1.24x faster than single steps on a 16-core machine
        (benchmarks/results/robosuite_throughput_h200_16core.txt)."""
        if actions.dim() != 3 or tuple(actions.shape[::2]) != (self.num_envs, self.act_dim):
            raise FlowrlError(f"{self.task}: action chunks of shape {tuple(actions.shape)}, expected "
                              f"({self.num_envs}, T, {self.act_dim})")
        act = np.clip(actions.detach().cpu().numpy().astype(np.float64), self.single_action_space.low,
                      self.single_action_space.high)
        for i, a in enumerate(act):
            self._send(i, ("chunk", a))
        per_env: list[list[StepResult]] = [self._recv(i) for i in range(self.num_envs)]
        return [self._batch([steps[j] for steps in per_env]) for j in range(act.shape[1])]

    def _batch(self, results: list[StepResult]):
        """One step's replies of all workers as ``step``'s batched tensors."""
        terminated = self._t([r.terminated for r in results], torch.bool)
        truncated = self._t([r.truncated for r in results], torch.bool)
        info = {"final_obs": self._t(np.stack([r.obs for r in results])), "done_mask": truncated | terminated,
                "success": self._t([r.success for r in results], torch.bool),
                "episode_return": self._t([r.episode_return for r in results]),
                "episode_length": self._t([r.episode_length for r in results], torch.int64)}
        next_obs = self._t(np.stack([r.next_obs for r in results]))
        return next_obs, self._t([r.reward for r in results]), terminated, truncated, info

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        self._conns, self._procs = [], []
