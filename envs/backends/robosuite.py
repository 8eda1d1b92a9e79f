"""Backend ``robosuite``: robosuite's own manipulation envs, one worker process per env.

Panda arm(s) with robosuite's default BASIC composite controller (OSC_POSE arm, gripper),
low-dimensional observations under robomimic's keys (``object``, ``robot0_eef_pos``,
``robot0_eef_quat``, ``robot0_gripper_qpos``, and ``robot1_*`` for two arms) concatenated in sorted
key order (the order our robomimic reader uses), episodes that end only as truncations at the
horizon (robosuite's tasks have no terminal states), ``info["success"]`` per env, and per-env
seeding that reseeds each env's own generator in place and never touches numpy's global one.
``terminate_on_success=True`` ends an episode as a termination at its first success instead
(robomimic's ``terminate_on_success``): the goal-reaching form of the task that RL fine-tuning uses.
An episode that ends inside an action chunk takes no further actions: its worker resets it at the
chunk boundary. Each worker applies :mod:`flowrl.envs.backends.robosuite_compat` before it builds its env.
The tasks and their facts are :class:`flowrl.envs.tasks.robosuite_scenes.RobosuiteTask` objects in the registry.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch

from flowrl.envs.base import BatchedEnv, ChunkResult, env_device
from flowrl.envs.registry import Task
from flowrl.errors import FlowrlError


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


def robomimic_env_args(info: Task, horizon: int | None = None) -> dict[str, Any]:
    """robomimic's ``env_args`` record of a robosuite task (a :class:`flowrl.envs.tasks.robosuite_scenes.RobosuiteTask`,
    written into robomimic-layout datasets)."""
    return {"env_name": info.env_name, "type": 1,
            "env_kwargs": {"robots": info.robosuite_robots, "controller": "BASIC (OSC_POSE arm)",
                           "horizon": horizon or info.max_episode_steps, "reward_shaping": False,
                           "use_camera_obs": False}}


def obs_keys(num_robots: int) -> list[str]:
    keys = ["object"]
    for r in range(num_robots):
        keys += [f"robot{r}_eef_pos", f"robot{r}_eef_quat", f"robot{r}_gripper_qpos"]
    return sorted(keys)


def flatten_obs(obs: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(obs["object-state" if k == "object" else k], dtype=np.float64).ravel()
                           for k in keys])


class ChunkReply(NamedTuple):
    """What a worker sends back for one action chunk: per step taken (it stops at the episode's
    end), and the observation at the chunk boundary (the next episode's first if this one ended)."""

    rewards: list[float]
    successes: list[bool]
    step_obs: list[np.ndarray]
    terminated: bool
    truncated: bool
    episode_return: float
    episode_length: int
    obs: np.ndarray
    step_images: list[dict[str, np.ndarray]] | None = None
    """Each step's camera images (captured every step only)."""
    final_images: dict[str, np.ndarray] | None = None
    """The last state's camera images where the episode ended (any capture)."""


def _worker(conn: Any, env_name: str, robots: Any, horizon: int, terminate_on_success: bool,
            gl: str | None = None) -> None:
    # importing robosuite sets MUJOCO_GL=egl, which a machine without EGL fails on: workers that render
    # get the backend the parent found working, the others none
    os.environ["MUJOCO_GL"] = gl or "disable"
    render = gl is not None
    from flowrl.envs.backends.robosuite_compat import apply

    apply()
    import robosuite

    # renderer="mujoco": robosuite's hard reset then frees the old simulator (and its offscreen GL context)
    # before building the next; with its default "mjviewer" every reset leaves the old ones to the garbage
    # collector, and a rendering worker's memory grows by gigabytes over tens of resets
    env = robosuite.make(env_name, robots=robots, has_renderer=False, has_offscreen_renderer=render,
                         use_camera_obs=False, ignore_done=True, horizon=horizon, reward_shaping=False,
                         renderer="mujoco")
    keys = obs_keys(len(env.robots))
    low, high = env.action_spec
    first = env.reset()
    layout = [(k, int(np.asarray(first["object-state" if k == "object" else k]).size)) for k in keys]
    conn.send((layout, low, high, list(env.sim.model.camera_names)))
    ret, length = 0.0, 0
    capture: tuple[list[str], int, int, bool] | None = None  # cameras, height, width, after every step

    def images() -> dict[str, np.ndarray]:
        """robosuite's own offscreen render of each captured camera, top row first (its images come
        bottom row first)."""
        assert capture is not None
        cameras, height, width, _ = capture
        return {c: np.ascontiguousarray(env.sim.render(width=width, height=height, camera_name=c)[::-1])
                for c in cameras}
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
        elif cmd == "chunk":  # (T, act_dim) actions, until the episode ends; one reply
            rewards, successes, step_obs, step_images = [], [], [], []
            terminated = truncated = False
            flat = None
            for action in arg:
                obs, reward, _, _ = env.step(action)
                success = bool(env._check_success())
                ret, length = ret + float(reward), length + 1
                flat = flatten_obs(obs, keys)
                rewards.append(float(reward))
                successes.append(success)
                step_obs.append(flat)
                if capture is not None and capture[3]:
                    step_images.append(images())
                terminated = success and terminate_on_success
                truncated = length >= horizon
                if terminated or truncated:
                    break
            reply = ChunkReply(rewards, successes, step_obs, terminated, truncated, ret, length, flat,
                               step_images or None)
            if terminated or truncated:
                if capture is not None:  # the last state's images, before the reset replaces it
                    reply = reply._replace(final_images=step_images[-1] if step_images else images())
                ret, length = 0.0, 0
                reply = reply._replace(obs=flatten_obs(env.reset(), keys))
            conn.send(reply)
        elif cmd == "capture":  # (cameras, height, width, every step) or None
            capture = arg
            conn.send(True)
        elif cmd == "render":
            conn.send(images())
        elif cmd == "close":
            env.close()
            conn.close()
            return
        else:  # the parent runs other code than this worker (e.g. the package changed on disk mid-run)
            raise RuntimeError(f"robosuite worker: unknown command {cmd!r}")


class RobosuiteEnv(BatchedEnv):
    """N robosuite envs in N worker processes (spawned, so each applies the compatibility layer)."""

    def __init__(self, info: Task, num_envs: int, device: str | torch.device = "cpu", seed: int | None = None,
                 horizon: int | None = None, terminate_on_success: bool = False, render: bool = False) -> None:
        """``render``: the workers get robosuite's offscreen renderer (EGL or OSMesa) for camera images
        (:class:`flowrl.envs.cameras.RobosuiteCameraRenderer`)."""
        if importlib.util.find_spec("robosuite") is None:  # not imported here: it changes os.environ
            raise FlowrlError("robosuite is not installed; see the README (robosuite)")
        self.task = info.name
        self.num_envs = num_envs
        self.device = env_device(device)
        self.max_episode_steps = horizon or info.max_episode_steps
        env_name, robots = info.env_name, info.robosuite_robots
        self._seed = seed
        gl = None
        if render:
            from flowrl.envs.rendering import gl_backend

            gl = gl_backend()  # a one-line error here rather than dead workers
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        with single_threaded_blas_children():
            for _ in range(num_envs):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, env_name, robots, self.max_episode_steps,
                                                         terminate_on_success, gl),
                                   daemon=True)
                proc.start()
                self._conns.append(parent)
                self._procs.append(proc)
        layout, low, high, cameras = self._recv(0)
        for i in range(1, num_envs):
            self._recv(i)
        self.renders = render
        self.camera_names: list[str] = cameras
        self._capture: tuple[list[str], int, int, bool] | None = None
        self.obs_layout: list[tuple[str, int]] = layout  # (robomimic key, size) in observation order
        obs_dim = sum(size for _, size in layout)
        if tuple(layout) != info.obs_layout:
            self.close()
            raise FlowrlError(f"{self.task}: robosuite's observation layout {layout} differs from the registered "
                              f"{list(info.obs_layout)} (another robosuite version?)")
        self.env_args = robomimic_env_args(info, self.max_episode_steps)
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

    def capture_images(self, cameras: list[str] | None, height: int = 0, width: int = 0,
                       every_step: bool = False) -> None:
        """From the next chunk on, the workers render ``cameras`` at the end of each episode (before its
        reset) and, with ``every_step``, after every step; ``step_chunk`` returns them in its ``info``
        (``final_images``, ``step_images``). ``None`` stops the capture."""
        if cameras is not None and not self.renders:
            raise FlowrlError(f"{self.task}: this robosuite env renders no images; make it with render=True")
        self._capture = None if cameras is None else (list(cameras), height, width, every_step)
        if not self._conns:  # closed: no workers to tell
            return
        for i in range(self.num_envs):
            self._send(i, ("capture", self._capture))
        for i in range(self.num_envs):
            self._recv(i)

    def render_images(self, ids: list[int]) -> dict[str, np.ndarray]:
        """``{camera: (len(ids), H, W, 3) uint8}`` of the captured cameras, rendered by robosuite in the
        workers ``ids`` from their current states, top row first."""
        if self._capture is None:
            raise FlowrlError(f"{self.task}: no cameras to render (capture_images first)")
        for i in ids:
            self._send(i, ("render", None))
        shots = [self._recv(i) for i in ids]
        cameras, height, width, _ = self._capture
        return {c: np.stack([s[c] for s in shots]) if shots else np.zeros((0, height, width, 3), np.uint8)
                for c in cameras}

    def step_chunk(self, actions: torch.Tensor, record_obs: bool = False,
                   after_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> ChunkResult:
        """A (N, T, act_dim) chunk in one round trip per worker (the workers step it: no ``after_step``;
        camera images come back in ``info``, see :meth:`capture_images`)."""
        if after_step is not None:
            raise FlowrlError(f"{self.task}: the robosuite backend steps a chunk inside its worker processes; "
                              "per-step hooks need the cpu or warp backend")
        actions = self.check_actions(actions, chunk=True)
        act = np.clip(actions.detach().cpu().numpy().astype(np.float64), self.single_action_space.low,
                      self.single_action_space.high)
        for i, a in enumerate(act):
            self._send(i, ("chunk", a))
        replies: list[ChunkReply] = [self._recv(i) for i in range(self.num_envs)]
        n, horizon = act.shape[:2]
        rewards = np.zeros((n, horizon))
        success = np.zeros((n, horizon), dtype=bool)
        valid = np.zeros((n, horizon), dtype=bool)
        step_obs = np.zeros((n, horizon, self.obs_dim)) if record_obs else None
        for i, r in enumerate(replies):
            k = len(r.rewards)
            rewards[i, :k], success[i, :k], valid[i, :k] = r.rewards, r.successes, True
            if step_obs is not None:
                step_obs[i, :k] = r.step_obs
        final_obs = np.stack([r.step_obs[-1] for r in replies])
        return ChunkResult(self._t(np.stack([r.obs for r in replies])), self._t(rewards), self._t(valid, torch.bool),
                           self._t([r.terminated for r in replies], torch.bool),
                           self._t([r.truncated and not r.terminated for r in replies], torch.bool),
                           self._t(final_obs), self._t([r.episode_return for r in replies]),
                           self._t([r.episode_length for r in replies], torch.int64), self._t(success, torch.bool),
                           None if step_obs is None else self._t(step_obs), self._captured(replies, horizon))

    def _captured(self, replies: list[ChunkReply], horizon: int) -> dict[str, Any]:
        """The chunk's camera images as ``info`` entries: ``final_images`` {camera: (N, H, W, 3)} (zeros
        where the episode did not end) and, captured every step, ``step_images`` {camera: (N, T, H, W, 3)}
        (zeros after an episode's end)."""
        if self._capture is None:
            return {}
        cameras, height, width, every_step = self._capture
        n = len(replies)
        final = {c: torch.zeros((n, height, width, 3), dtype=torch.uint8) for c in cameras}
        steps = {c: torch.zeros((n, horizon, height, width, 3), dtype=torch.uint8) for c in cameras} if every_step else None
        for i, r in enumerate(replies):
            for c in cameras:
                if r.final_images is not None:
                    final[c][i] = torch.from_numpy(r.final_images[c])
                if steps is not None and r.step_images:
                    steps[c][i, :len(r.step_images)] = torch.from_numpy(np.stack([s[c] for s in r.step_images]))
        return {"final_images": final, **({"step_images": steps} if steps is not None else {})}

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
