"""Camera images of batched MuJoCo envs: robomimic's cameras rendered for every env.

:class:`CameraRenderer` renders named cameras of each env's current state of the ``cpu`` backend with
MuJoCo's own renderer (offscreen OpenGL: EGL or OSMesa, :mod:`flowrl.envs.rendering`), as robosuite
renders them: collision geoms hidden (robosuite's geom group 0), the model's lights and materials.
:class:`WarpCameraRenderer` ray traces the same cameras of every world of the ``warp`` backend in one
batch with MuJoCo Warp's renderer, on the env's device. Images are uint8 ``(N, height, width, 3)``
RGB, top row first (as an image is displayed), from both; robosuite's own camera observations come
bottom row first under its default ``IMAGE_CONVENTION = "opengl"`` and equal these flipped vertically
(``tests/test_cameras.py`` checks the same state in all of them). :func:`camera_renderer` picks the
renderer of an env's backend.

OpenGL rendering is per env on the CPU (tens of milliseconds per image with a software OpenGL):
enough for datasets, checks and evaluation. The ray tracer's lighting differs slightly from OpenGL's
(a few grey levels on average), so a pixel policy is best trained and evaluated on images of one kind.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flowrl.errors import FlowrlError

ROBOMIMIC_CAMERAS = ("agentview", "robot0_eye_in_hand")
"""The cameras of robomimic's image datasets."""
DEFAULT_SIZE = 84
"""robomimic's image size (84 x 84)."""


def _check_cameras(task: str, names: Sequence[str], cameras: Sequence[str], height: int, width: int) -> None:
    """One-line errors for a bad image size and for ``cameras`` that are not among the scene's ``names``."""
    if height < 1 or width < 1:
        raise FlowrlError(f"camera images: size must be positive, got {height} x {width}")
    unknown = [c for c in cameras if c not in names]
    if unknown or not cameras:
        raise FlowrlError(f"camera images: {task} has no camera {', '.join(unknown) or '(none given)'}"
                          f" (it has: {', '.join(names) or 'none'})")


def _camera_ids(env: Any, cameras: Sequence[str], height: int, width: int) -> list[int]:
    """The model's ids of ``cameras`` (checked as :func:`_check_cameras` does)."""
    import mujoco

    model = env.model
    _check_cameras(env.task, [model.camera(i).name for i in range(model.ncam)], cameras, height, width)
    return [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, c) for c in cameras]


class _Renderer:
    """What the renderers share: a context manager that closes them."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _env_ids(ids: Sequence[int] | np.ndarray | torch.Tensor | None, n_envs: int) -> list[int] | None:
    if ids is None:
        return None
    envs = [int(i) for i in torch.as_tensor(ids).flatten().tolist()]
    bad = [i for i in envs if not 0 <= i < n_envs]
    if bad:
        raise FlowrlError(f"camera images: env ids {bad} out of range (the env has {n_envs})")
    return envs


def camera_renderer(env: Any, cameras: Sequence[str] = ROBOMIMIC_CAMERAS, height: int = DEFAULT_SIZE,
                    width: int = DEFAULT_SIZE) -> "CameraRenderer | WarpCameraRenderer | RobosuiteCameraRenderer":
    """The renderer of ``env``'s backend: MuJoCo Warp's batched ray tracer on the warp backend, MuJoCo's
    OpenGL renderer on the cpu backend, robosuite's own in its workers on the robosuite backend (made
    with ``render=True``); other envs render none (a one-line error)."""
    if hasattr(env, "wp_device"):
        return WarpCameraRenderer(env, cameras, height, width)
    if hasattr(env, "capture_images"):
        return RobosuiteCameraRenderer(env, cameras, height, width)
    return CameraRenderer(env, cameras, height, width)


class CameraRenderer(_Renderer):
    """RGB images from named cameras of every env of a ``cpu``-backend env (``flowrl.envs.make(...,
    backend="cpu")``), e.g. robosuite's scenes. Use as a context manager or call :meth:`close`."""

    def __init__(self, env: Any, cameras: Sequence[str] = ROBOMIMIC_CAMERAS, height: int = DEFAULT_SIZE,
                 width: int = DEFAULT_SIZE) -> None:
        import mujoco

        from flowrl.envs.rendering import MujocoRenderer

        if not hasattr(env, "batch") or not hasattr(env, "model"):
            raise FlowrlError(f"camera images: the {type(env).__name__} env renders none (the cpu, warp and "
                              "robosuite backends do)")
        model = env.model
        ids = _camera_ids(env, cameras, height, width)
        self.env, self.cameras, self.height, self.width = env, tuple(cameras), height, width
        self._cams = {}
        for name, cam_id in zip(self.cameras, ids):
            cam = mujoco.MjvCamera()
            cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
            cam.fixedcamid = cam_id
            self._cams[name] = cam
        self._varied = bool(env.model_fields)  # then each world is drawn with its own model
        if self._varied:
            model = copy.copy(model)
        self._renderer: Any = MujocoRenderer(model, width, height, env.task_def.hidden_geom_groups)
        self._model, self._data = model, mujoco.MjData(model)

    def render(self, ids: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{camera: (n, height, width, 3) uint8}`` for the envs ``ids`` (default: all), in that order."""
        import mujoco

        if self._renderer is None:
            raise FlowrlError("camera images: the renderer is closed")
        envs = _env_ids(ids, self.env.num_envs)
        envs = range(self.env.num_envs) if envs is None else envs
        out = {c: torch.empty((len(envs), self.height, self.width, 3), dtype=torch.uint8) for c in self.cameras}
        for row, i in enumerate(envs):
            if self._varied:
                self.env.batch.get_model(i, self._model)
            self.env.batch.get_data(i, self._data)
            mujoco.mj_forward(self._model, self._data)  # positions of the current state, cameras, lights
            for name, cam in self._cams.items():
                out[name][row] = torch.from_numpy(self._renderer.frame(self._data, cam))
        return out

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


class WarpCameraRenderer(_Renderer):
    """RGB images from named cameras of every world of a ``warp``-backend env, ray traced in one batch by
    MuJoCo Warp (``create_render_context`` / ``render`` / ``get_rgb``) on the env's device, the task's
    ``hidden_geom_groups`` left out (robosuite's collision geoms) as the OpenGL renderer leaves them out.
    :meth:`render` returns tensors on that device."""

    def __init__(self, env: Any, cameras: Sequence[str] = ROBOMIMIC_CAMERAS, height: int = DEFAULT_SIZE,
                 width: int = DEFAULT_SIZE) -> None:
        import mujoco_warp as mjw
        import warp as wp

        if not hasattr(env, "wp_device"):
            raise FlowrlError(f"camera images: the {type(env).__name__} env is not a warp-backend env")
        ids = _camera_ids(env, cameras, height, width)
        self.env, self.cameras, self.height, self.width = env, tuple(cameras), height, width
        model = env.model
        self._mjw, self._wp = mjw, wp
        shown = [g for g in (0, 1, 2) if g not in env.task_def.hidden_geom_groups]
        with wp.ScopedDevice(env.wp_device):
            self._context = mjw.create_render_context(
                model, nworld=env.num_envs, cam_res=(width, height), render_rgb=True, render_depth=False,
                enabled_geom_groups=shown, cam_active=[i in ids for i in range(model.ncam)])
            self._rgb = {name: wp.zeros((env.num_envs, height, width), dtype=wp.vec3f) for name in self.cameras}
        active = sorted(set(ids))  # the context's images are in the model's camera order
        self._slot = {name: active.index(cam_id) for name, cam_id in zip(self.cameras, ids)}

    def render(self, ids: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{camera: (n, height, width, 3) uint8}`` on the env's device for the envs ``ids`` (default:
        all; every world is traced either way), in that order."""
        if self._context is None:
            raise FlowrlError("camera images: the renderer is closed")
        envs = _env_ids(ids, self.env.num_envs)
        mjw, wp, env = self._mjw, self._wp, self.env
        out = {}
        if str(env.wp_device).startswith("cuda"):
            torch.cuda.synchronize()  # the env's last step may still run on torch's stream
        with wp.ScopedDevice(env.wp_device):
            mjw.kinematics(env.m, env.d)  # poses of the current state (a step leaves its last substep's)
            mjw.camlight(env.m, env.d)
            mjw.refit_bvh(env.m, env.d, self._context)
            mjw.render(env.m, env.d, self._context)
            for name in self.cameras:
                mjw.get_rgb(self._context, self._slot[name], self._rgb[name])
            wp.synchronize_device(env.wp_device)  # before torch reads the buffers on its own stream
        for name in self.cameras:
            image = (wp.to_torch(self._rgb[name]) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
            out[name] = image if envs is None else image[torch.as_tensor(envs, dtype=torch.long, device=image.device)]
        return out

    def close(self) -> None:
        self._context = None


class RobosuiteCameraRenderer(_Renderer):
    """RGB images from named cameras of every env of a ``robosuite``-backend env made with ``render=True``,
    rendered by robosuite itself in its worker processes (its offscreen renderer, as its camera
    observations), top row first. A chunk is stepped inside the workers, so images between decisions and
    at episode ends come back with the chunk (``captures_in_chunk``; see
    :meth:`flowrl.envs.backends.robosuite.RobosuiteEnv.capture_images`) instead of from a per-step hook."""

    captures_in_chunk = True

    def __init__(self, env: Any, cameras: Sequence[str] = ROBOMIMIC_CAMERAS, height: int = DEFAULT_SIZE,
                 width: int = DEFAULT_SIZE, every_step: bool = False) -> None:
        _check_cameras(env.task, env.camera_names, cameras, height, width)
        if not env.renders:
            raise FlowrlError(f"camera images: this {env.task} robosuite env renders none; make it with "
                              "render=True (robosuite's offscreen renderer in each worker)")
        self.env, self.cameras, self.height, self.width = env, tuple(cameras), height, width
        self.capture(every_step)

    def capture(self, every_step: bool) -> None:
        """Images at episode ends (and with ``every_step`` after every step) from the next chunk on."""
        self.env.capture_images(list(self.cameras), self.height, self.width, every_step)

    def render(self, ids: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{camera: (n, height, width, 3) uint8}`` for the envs ``ids`` (default: all), in that order."""
        envs = _env_ids(ids, self.env.num_envs)
        images = self.env.render_images(list(range(self.env.num_envs)) if envs is None else envs)
        return {c: torch.from_numpy(images[c]) for c in self.cameras}

    def close(self) -> None:
        self.env.capture_images(None)  # stop rendering every chunk's images (nothing once the env is closed)


__all__ = ["CameraRenderer", "DEFAULT_SIZE", "ROBOMIMIC_CAMERAS", "RobosuiteCameraRenderer", "WarpCameraRenderer",
           "camera_renderer"]
