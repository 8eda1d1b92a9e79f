"""Camera images of batched MuJoCo envs: robomimic's cameras rendered for every env of the ``cpu`` backend.

:class:`CameraRenderer` renders named cameras of each env's current state with MuJoCo's own renderer
(offscreen OpenGL: EGL or OSMesa, :mod:`flowrl.envs.rendering`), as robosuite renders them: collision
geoms hidden (robosuite's geom group 0), the model's lights and materials. Images are uint8
``(N, height, width, 3)`` RGB, top row first (as an image is displayed); robosuite's own camera
observations come bottom row first under its default ``IMAGE_CONVENTION = "opengl"`` and equal
these flipped vertically (``tests/test_cameras.py`` checks the same state in both).

Rendering is per env on the CPU (tens of milliseconds per image with a software OpenGL): enough for
datasets, checks and evaluation, not for training at scale; batched rendering on the GPU belongs to
the ``warp`` backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flowrl.errors import FlowrlError

ROBOMIMIC_CAMERAS = ("agentview", "robot0_eye_in_hand")
"""The cameras of robomimic's image datasets."""
DEFAULT_SIZE = 84
"""robomimic's image size (84 x 84)."""


class CameraRenderer:
    """RGB images from named cameras of every env of a ``cpu``-backend env (``flowrl.envs.make(...,
    backend="cpu")``), e.g. robosuite's scenes. Use as a context manager or call :meth:`close`."""

    def __init__(self, env: Any, cameras: Sequence[str] = ROBOMIMIC_CAMERAS, height: int = DEFAULT_SIZE,
                 width: int = DEFAULT_SIZE) -> None:
        import mujoco

        from flowrl.envs.rendering import MujocoRenderer

        if not hasattr(env, "batch") or not hasattr(env, "model"):
            raise FlowrlError(f"camera images: the {type(env).__name__} env renders none (the cpu backend does)")
        if height < 1 or width < 1:
            raise FlowrlError(f"camera images: size must be positive, got {height} x {width}")
        model = env.model
        names = [model.camera(i).name for i in range(model.ncam)]
        unknown = [c for c in cameras if c not in names]
        if unknown or not cameras:
            raise FlowrlError(f"camera images: {env.task_def.info.name} has no camera {', '.join(unknown) or '(none given)'}"
                              f" (it has: {', '.join(names) or 'none'})")
        self.env, self.cameras, self.height, self.width = env, tuple(cameras), height, width
        self._cams = {}
        for name in self.cameras:
            cam = mujoco.MjvCamera()
            cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
            cam.fixedcamid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
            self._cams[name] = cam
        self._renderer: Any = MujocoRenderer(model, width, height, hidden_geom_groups=(0,))  # robosuite's collision geoms
        self._data = mujoco.MjData(model)

    def render(self, ids: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{camera: (n, height, width, 3) uint8}`` for the envs ``ids`` (default: all), in that order."""
        import mujoco

        if self._renderer is None:
            raise FlowrlError("camera images: the renderer is closed")
        n_envs = self.env.num_envs
        envs = range(n_envs) if ids is None else [int(i) for i in torch.as_tensor(ids).flatten().tolist()]
        bad = [i for i in envs if not 0 <= i < n_envs]
        if bad:
            raise FlowrlError(f"camera images: env ids {bad} out of range (the env has {n_envs})")
        out = {c: torch.empty((len(envs), self.height, self.width, 3), dtype=torch.uint8) for c in self.cameras}
        for row, i in enumerate(envs):
            self.env.batch.get_data(i, self._data)
            mujoco.mj_forward(self.env.model, self._data)  # positions of the current state, cameras, lights
            for name, cam in self._cams.items():
                out[name][row] = torch.from_numpy(self._renderer.frame(self._data, cam))
        return out

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def __enter__(self) -> CameraRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CameraRenderer", "DEFAULT_SIZE", "ROBOMIMIC_CAMERAS"]
