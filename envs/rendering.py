"""Offscreen rendering of MuJoCo scenes into RGB arrays: videos (:mod:`flowrl.video`) and camera
observations (:mod:`flowrl.envs.cameras`).

Rendering needs an OpenGL context without a window: EGL (a GPU's, or Mesa's software EGL) or OSMesa.
``MUJOCO_GL=egl|osmesa|glfw`` picks one; unset, EGL is tried, then OSMesa. The context is made here,
so it does not matter which backend ``import mujoco`` chose earlier in the process.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from flowrl.errors import FlowrlError


def gl_backend() -> str:
    """The name (egl, osmesa, glfw) of the OpenGL backend :func:`gl_context` would use here, found by
    making a 1 x 1 context (for processes that must be told, e.g. robosuite's workers)."""
    ctx, name = _context(1, 1)
    ctx.free()
    return name


def gl_context(width: int, height: int) -> Any:
    """A current offscreen OpenGL context: ``MUJOCO_GL``'s backend when set to egl, osmesa or glfw,
    else EGL, then OSMesa. None working is a one-line FlowrlError that says what to set."""
    return _context(width, height)[0]


def _context(width: int, height: int) -> tuple[Any, str]:
    wanted = os.environ.get("MUJOCO_GL", "").strip().lower()
    order = [wanted] if wanted in ("egl", "osmesa", "glfw") else ["egl", "osmesa"]
    failures = []
    for name in order:
        try:
            if name == "egl":
                from mujoco.egl import GLContext
            elif name == "osmesa":
                from mujoco.osmesa import GLContext
            else:
                from mujoco.glfw import GLContext
            ctx = GLContext(width, height)
            ctx.make_current()
            return ctx, name
        except Exception as e:  # missing libraries raise ImportError, OSError, RuntimeError, ...
            lines = str(e).strip().splitlines() or [type(e).__name__]
            failures.append(f"{name}: {lines[0][:120]}")
    raise FlowrlError("cannot render: no offscreen OpenGL (" + "; ".join(failures) + "); set MUJOCO_GL=egl "
                      "(libEGL: a GPU driver's or Mesa's, apt install libegl1) or MUJOCO_GL=osmesa "
                      "(apt install libosmesa6)")


class MujocoRenderer:
    """Offscreen rendering of one MuJoCo model into RGB arrays, in an OpenGL context of its own."""

    def __init__(self, model: Any, width: int, height: int, hidden_geom_groups: tuple[int, ...] = ()) -> None:
        import mujoco

        self._ctx = gl_context(width, height)
        # the offscreen buffer must hold the frame; the model's default is 640 x 480
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), width)
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), height)
        self.model, self.width, self.height = model, width, height
        self._con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._con)
        self._scene = mujoco.MjvScene(model, maxgeom=10000)
        self._opt = mujoco.MjvOption()
        for group in hidden_geom_groups:
            self._opt.geomgroup[group] = 0
        self._viewport = mujoco.MjrRect(0, 0, width, height)
        self._rgb = np.empty((height, width, 3), dtype=np.uint8)

    def frame(self, data: Any, camera: Any) -> np.ndarray:
        import mujoco

        self._ctx.make_current()
        mujoco.mjv_updateScene(self.model, data, self._opt, None, camera, mujoco.mjtCatBit.mjCAT_ALL, self._scene)
        mujoco.mjr_render(self._viewport, self._scene, self._con)
        mujoco.mjr_readPixels(self._rgb, None, self._viewport, self._con)
        return np.flipud(self._rgb).copy()  # OpenGL's rows start at the bottom

    def close(self) -> None:
        if self._con is not None:
            self._con.free()
            self._con = None
        if self._ctx is not None:
            self._ctx.free()
            self._ctx = None


__all__ = ["MujocoRenderer", "gl_backend", "gl_context"]
