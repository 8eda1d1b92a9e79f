"""Videos of a policy's episodes, rendered offscreen and written as mp4.

What a video shows, and why:

- exactly one episode, seeded as the evaluation's first env (``seed``), from its first state to its
  end: a frame is taken only while the episode runs, so no frame of the next episode's reset pose;
- locomotion from a camera that tracks the robot's torso (gymnasium's default renderer leaves a free
  camera, and a robot that walks away leaves the picture); robosuite from its ``agentview`` camera,
  the view robomimic's image policies see;
- at the env's own rate, 1/dt steps per second of simulated time: every ``stride``-th step is
  kept and written at ``rate / stride`` fps, so the video plays in real time (Hopper: 125 Hz,
  every 5th step at 25 fps; robosuite: 20 Hz, every step at 20 fps).

Rendering needs an OpenGL context without a window (:mod:`flowrl.envs.rendering`): EGL (a GPU's,
or Mesa's software EGL) or OSMesa; ``MUJOCO_GL=egl|osmesa|glfw`` picks one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from flowrl.config import renamed_argument
from flowrl.envs.rendering import MujocoRenderer
from flowrl.errors import FlowrlError

DEFAULT_SIZE = (512, 384)
"""(width, height) of the frames."""
MAX_FPS = 60.0
"""Frames per second above which steps are subsampled (players and codecs handle up to ~60 well)."""
MIN_FPS = 15.0
"""Lowest frame rate ``frame_stride`` accepts when it looks for an integer frame rate."""


def frame_stride(rate_hz: float, max_fps: float = MAX_FPS) -> tuple[int, float]:
    """``(stride, fps)`` for an env stepping at ``rate_hz`` steps per simulated second: keep every
    ``stride``-th step and write at ``fps = rate_hz / stride``, so the video plays in real time.

    The smallest stride that brings the frame rate to at most ``max_fps`` is taken, or a slightly
    larger one that makes the frame rate an integer (>= ``MIN_FPS``), which every player and
    container represents exactly (125 Hz: stride 5, 25 fps rather than stride 3, 41.67 fps)."""
    if not rate_hz > 0 or not math.isfinite(rate_hz):
        raise ValueError(f"rate must be a positive number of steps per second, got {rate_hz}")
    first = max(1, math.ceil(rate_hz / max_fps - 1e-9))
    for stride in range(first, first + 4):
        fps = rate_hz / stride
        if fps >= MIN_FPS and abs(fps - round(fps)) < 1e-6:
            return stride, float(round(fps))
    return first, rate_hz / first


# -- offscreen rendering ---------------------------------------------------------------------------
class FrameRenderer(Protocol):
    """Turns a simulation state into an RGB frame; tests stand in a stub that needs no OpenGL."""

    def frame(self, data: Any, camera: Any) -> np.ndarray:
        """(height, width, 3) uint8 image of ``data`` (an ``mujoco.MjData``, forwarded) seen from ``camera``."""
        ...

    def close(self) -> None:
        ...


RendererFactory = Callable[[Any, int, int], FrameRenderer]
"""``(mujoco.MjModel, width, height) -> FrameRenderer``."""


def tracking_camera(model: Any, body: int = 1, distance: float = 3.5) -> Any:
    """A side-view camera (looking along +y, the robots walk along +x) that tracks the centre of mass
    of ``body``'s subtree (body 1: the locomotion robots' torso, so the whole robot)."""
    import mujoco

    cam = mujoco.MjvCamera()
    cam.type = mujoco.mjtCamera.mjCAMERA_TRACKING
    cam.trackbodyid = body
    cam.distance = distance
    cam.elevation = -15.0
    cam.azimuth = 90.0
    return cam


def fixed_camera(model: Any, names: tuple[str, ...]) -> Any:
    """The model's first camera among ``names`` (robosuite: ``agentview``)."""
    import mujoco

    for name in names:
        cam_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
        if cam_id >= 0:
            cam = mujoco.MjvCamera()
            cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
            cam.fixedcamid = cam_id
            return cam
    raise FlowrlError(f"the scene has none of the cameras {', '.join(names)}")


# -- episodes -----------------------------------------------------------------------------------------
@dataclass
class EpisodeVideo:
    """The frames of one episode and what they show."""

    frames: list[np.ndarray]
    fps: float
    stride: int
    """Env steps per frame."""
    length: int
    """Env steps of the episode."""
    episode_return: float
    success: bool | None = None
    frame_steps: list[int] = field(default_factory=list)
    """The env step each frame shows (0: the first observation)."""


def _chunk_policy(policy: Any, k: int, seed: int) -> Any:
    """A FlowPolicy at K = ``k`` (initial noise from a generator seeded like the evaluation's),
    or any ChunkPolicy as it is."""
    from flowrl.policy import FlowPolicy, require_state_only
    from flowrl.rollout import FlowChunkPolicy

    require_state_only(policy, "video")  # the episodes below feed the policy states only
    if isinstance(policy, FlowPolicy):
        gen = torch.Generator(device=policy.obs_mean.device).manual_seed(seed)
        return FlowChunkPolicy(policy, k, gen)
    return policy


def mujoco_episode(task: str, policy: Any, seed: int, end_on_success: bool = False,
                   size: tuple[int, int] = DEFAULT_SIZE, renderer: RendererFactory | None = None) -> EpisodeVideo:
    """One episode of a MuJoCo task (locomotion) on the cpu backend, which is gymnasium v5 to the bit.

    The env is stepped one action at a time through :meth:`BatchedEnv.step_chunk`; a frame of the
    state after step t is taken while the episode runs (every ``stride``-th step), from a camera that
    tracks the torso. The step that ends the episode is not drawn: the env has already reset it."""
    import mujoco

    from flowrl.envs import make
    from flowrl.rollout import ObsHistory

    env = make(task, 1, backend="cpu", seed=seed)
    try:
        model = env.model
        data = mujoco.MjData(model)
        stride, fps = frame_stride(1.0 / env.dt)
        draw = (renderer or MujocoRenderer)(model, *size)
        camera = tracking_camera(model)
        frames, steps = [], []

        def take(t: int) -> None:
            qpos, qvel = env.get_state()
            data.qpos[:], data.qvel[:] = qpos[0].cpu().numpy(), qvel[0].cpu().numpy()
            mujoco.mj_forward(model, data)
            frames.append(draw.frame(data, camera))
            steps.append(t)

        try:
            obs = env.reset(seed=seed)
            history = ObsHistory(obs, policy.obs_history)
            take(0)
            t, ret, success, done = 0, 0.0, None, False
            no_reset = torch.zeros(1, dtype=torch.bool)
            while not done:
                chunk = policy.act_chunk(history.get())[:, :policy.act_steps]
                for j in range(chunk.shape[1]):
                    r = env.step_chunk(chunk[:, j:j + 1])
                    t += 1
                    ret += float(r.rewards[0, 0])
                    if r.success is not None:
                        success = bool(success) or bool(r.success[0, 0])
                    done = bool(r.done[0]) or (end_on_success and bool(success))
                    if done:
                        break
                    history.push(r.obs, no_reset)
                    if t % stride == 0:
                        take(t)
        finally:
            draw.close()
    finally:
        env.close()
    return EpisodeVideo(frames, fps, stride, t, ret, success, steps)


def robosuite_episode(task: str, policy: Any, seed: int, end_on_success: bool = False,
                      size: tuple[int, int] = DEFAULT_SIZE, renderer: RendererFactory | None = None) -> EpisodeVideo:
    """One episode of a robosuite task in this process, seeded as the evaluation's env 0 (its
    generator reseeded with ``seed`` before the reset, as the worker processes do), from robosuite's
    ``agentview`` camera at the controller's rate (20 Hz)."""
    from flowrl.envs import resolve_task
    from flowrl.envs.backends.robosuite import flatten_obs, obs_keys
    from flowrl.envs.backends.robosuite_compat import apply
    from flowrl.rollout import ObsHistory

    info = resolve_task(task)
    apply()  # MuJoCo >= 3.10 fixes; quiets robosuite's routine log lines before it is imported
    import robosuite

    env = robosuite.make(info.extra["env_name"], robots=info.extra["robots"], has_renderer=False,
                         has_offscreen_renderer=False, use_camera_obs=False, ignore_done=True,
                         horizon=info.max_episode_steps, reward_shaping=False)
    draw: FrameRenderer | None = None
    try:
        env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        keys = obs_keys(len(env.robots))
        obs = flatten_obs(env.reset(), keys)
        model, data = env.sim.model._model, env.sim.data._data  # after the reset: a hard reset rebuilds the sim
        stride, fps = frame_stride(float(env.control_freq))
        # robosuite's collision geoms (group 0) hidden, as its own renderer does
        draw = renderer(model, *size) if renderer else MujocoRenderer(model, *size, hidden_geom_groups=(0,))
        camera = fixed_camera(model, ("agentview", "frontview"))
        low, high = env.action_spec
        history = ObsHistory(torch.as_tensor(obs).unsqueeze(0), policy.obs_history)
        frames, steps = [draw.frame(data, camera)], [0]
        t, ret, success, done = 0, 0.0, False, False
        no_reset = torch.zeros(1, dtype=torch.bool)
        while not done:
            chunk = policy.act_chunk(history.get())[0, :policy.act_steps].detach().cpu().numpy()
            for action in chunk:
                o, reward, _, _ = env.step(np.clip(action.astype(np.float64), low, high))
                t += 1
                ret += float(reward)
                success = success or bool(env._check_success())
                done = t >= info.max_episode_steps or (end_on_success and success)
                if t % stride == 0 or done:  # robosuite does not reset by itself: the last state is drawn
                    frames.append(draw.frame(data, camera))
                    steps.append(t)
                if done:
                    break
                history.push(torch.as_tensor(flatten_obs(o, keys)).unsqueeze(0), no_reset)
    finally:
        if draw is not None:
            draw.close()
        env.close()
    return EpisodeVideo(frames, fps, stride, t, ret, success, steps)


def episode_video(task: str, policy: Any, k: int | None = None, seed: int | None = None, end_on_success: bool = False,
                  size: tuple[int, int] = DEFAULT_SIZE, renderer: RendererFactory | None = None, *,
                  num_steps: int | None = None) -> EpisodeVideo:
    """The frames of one seeded episode of ``policy`` (a FlowPolicy at K = ``k``, default 4, or any
    ChunkPolicy) on ``task``: robosuite tasks in robosuite, MuJoCo tasks on the cpu backend.
    ``num_steps`` is the old name of ``k``."""
    k = renamed_argument("episode_video", "num_steps", "k", num_steps, k)
    k = 4 if k is None else k
    from flowrl.envs import is_robosuite, resolve_task
    from flowrl.evaluation import EVAL_SEED

    seed = EVAL_SEED if seed is None else seed
    info = resolve_task(task)
    chunk_policy = _chunk_policy(policy, k, seed)
    if is_robosuite(info.name):
        return robosuite_episode(info.name, chunk_policy, seed, end_on_success, size, renderer)
    if info.task is None:
        raise FlowrlError(f"cannot render {info.name}: it has no MuJoCo scene (videos need a MuJoCo or robosuite task)")
    return mujoco_episode(info.name, chunk_policy, seed, end_on_success, size, renderer)


def write_mp4(path: str | Path, frames: list[np.ndarray], fps: float) -> Path:
    """Write ``frames`` as an H.264 mp4 at ``fps`` (atomically: a failed write leaves no partial file)."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio writes mp4 with)
    except ImportError:
        raise FlowrlError("videos need the video extra: pip install -e '.[video]'") from None
    if not frames:
        raise FlowrlError(f"{path}: no frames to write")
    from flowrl.io import write_atomic

    path = Path(path)
    write_atomic(path, lambda p: imageio.mimwrite(p, frames, fps=fps, format="FFMPEG", codec="libx264",
                                                  macro_block_size=8))
    return path


def record_video(policy: Any, task: str, k: int | None = None, path: str | Path | None = None,
                 seed: int | None = None, end_on_success: bool = False, size: tuple[int, int] = DEFAULT_SIZE,
                 renderer: RendererFactory | None = None, *, num_steps: int | None = None) -> Path:
    """One rendered episode of the deterministic policy at K = ``k``, written to ``path`` as mp4 in
    real time (see the module docstring). Returns ``path``. ``num_steps`` is the old name of ``k``."""
    k = renamed_argument("record_video", "num_steps", "k", num_steps, k, required=True)
    if path is None:
        raise TypeError("record_video() missing required argument: 'path'")
    video = episode_video(task, policy, k, seed, end_on_success, size, renderer)
    return write_mp4(path, video.frames, video.fps)
