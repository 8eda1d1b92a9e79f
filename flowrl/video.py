"""Videos of a policy's episodes, rendered offscreen and written as mp4.

What a video shows, and why:

- exactly one episode, run as an evaluation runs it (:func:`flowrl.rollout.run_episodes` on the task's
  ``cpu`` backend, robosuite's tasks on their shipped scenes), seeded as the evaluation's first env
  (``seed``), from its first state to its end: the states are kept after each step before the env
  resets, so no frame shows the next episode's reset pose;
- from the task's first camera (``Task.cameras``: robosuite's ``agentview``, the view robomimic's image
  policies see), else from a camera that tracks the robot's torso (gymnasium's default renderer leaves
  a free camera, and a robot that walks away leaves the picture);
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
    """One episode of a MuJoCo task on the cpu backend (gymnasium v5 to the bit; robosuite's scenes), run by
    :func:`flowrl.rollout.run_episodes` as an evaluation runs it, seeded as the evaluation's env 0.

    The states after every step are kept (before the env resets an ended episode) and every ``stride``-th is
    drawn, from the task's first camera (``Task.cameras``) or one that tracks the torso. An episode that ends
    in a termination ends on its last frame before the terminal state; one cut at the horizon or at its success
    (``end_on_success``) also shows its last state when that falls on a frame."""
    import mujoco

    from flowrl.envs import make, resolve_task
    from flowrl.rollout import run_episodes

    info = resolve_task(task)
    env = make(info.name, 1, backend="cpu", seed=seed)
    states: list[tuple[np.ndarray, np.ndarray]] = []
    terminations: list[bool] = []  # whether each step terminated the episode

    def keep() -> None:
        qpos, qvel = env.get_state()
        states.append((qpos[0].cpu().numpy(), qvel[0].cpu().numpy()))

    def after_step(j: int, terminated: torch.Tensor, truncated: torch.Tensor) -> None:
        keep()  # steps after a success cut (end_on_success) in the same chunk are kept too, never shown
        terminations.append(bool(terminated[0]))

    try:
        stride, fps = frame_stride(1.0 / env.dt)
        env.reset(seed=seed)  # the first state; run_episodes resets to the same one (the same seed)
        model = env.batch.get_model(0)  # the episode's model (a task may draw parts of it at each reset)
        keep()
        out = run_episodes(env, policy, seed, after_step=after_step,
                           on_chunk=(lambda obs, chunk, result, active: result.success) if end_on_success else None)
    finally:
        env.close()
    length = int(out["lengths"][0])
    shown = list(range(0, length, stride))
    if length % stride == 0 and not terminations[length - 1]:
        shown.append(length)
    draw = renderer(model, *size) if renderer else MujocoRenderer(model, *size, info.hidden_geom_groups)
    camera = fixed_camera(model, info.cameras[:1]) if info.cameras else tracking_camera(model)
    data = mujoco.MjData(model)
    frames = []
    try:
        for t in shown:
            data.qpos[:], data.qvel[:] = states[t]
            mujoco.mj_forward(model, data)
            frames.append(draw.frame(data, camera))
    finally:
        draw.close()
    success = bool(out["success"][0]) if bool(out["has_success"]) else None
    return EpisodeVideo(frames, fps, stride, length, float(out["returns"][0]), success, shown)


def episode_video(task: str, policy: Any, k: int | None = None, seed: int | None = None, end_on_success: bool = False,
                  size: tuple[int, int] = DEFAULT_SIZE, renderer: RendererFactory | None = None, *,
                  num_steps: int | None = None) -> EpisodeVideo:
    """The frames of one seeded episode of ``policy`` (a FlowPolicy at K = ``k``, default 4, or any
    ChunkPolicy) on ``task``, on the cpu backend (:func:`mujoco_episode`). ``num_steps`` is the old name of ``k``."""
    k = renamed_argument("episode_video", "num_steps", "k", num_steps, k)
    k = 4 if k is None else k
    from flowrl.envs import resolve_task
    from flowrl.evaluation import EVAL_SEED

    seed = EVAL_SEED if seed is None else seed
    info = resolve_task(task)
    if "cpu" not in info.backends:
        raise FlowrlError(f"cannot render {info.name}: videos render on the cpu backend, and it runs on "
                          f"{', '.join(info.backends)}")
    return mujoco_episode(info.name, _chunk_policy(policy, k, seed), seed, end_on_success, size, renderer)


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
