"""Backend ``warp``: MuJoCo Warp, float32, all N simulations in GPU kernels.

The state arrays of MuJoCo Warp are shared with torch without copies (``wp.to_torch``); on a
CUDA device the ``frame_skip`` physics steps of one env step (and the contact-force pass where the
task reads ``cfrc_ext``) are captured once as a CUDA graph and replayed. Tasks with a per-substep
controller run each substep as ``step1`` (kinematics, mass matrix, bias forces) -> the controller's
torch code -> ``step2`` (actuation, constraints, integration), as robosuite runs ``mj_step1`` /
``mj_step2``; on CUDA the whole control step (goal, every substep's torques and physics) is one
CUDA graph holding both Warp's and torch's kernels, captured on first use on a torch stream that
Warp shares. It also runs on Warp's CPU device (slowly), so tests cover its code on machines
without a GPU.

Contact and constraint buffers are per world and sized per task (the registry's ``warp_buffers``:
measured to hold each task with margin); a world whose buffers overflow
is reset and counted like a diverged one (overflow leaves its results undefined).

Model fields a task varies per episode get a leading world dimension (``put_model``'s ``batch_sizes``), which
MuJoCo Warp's kernels index per world. The task supplies the fields MuJoCo derives from others too (subtree
masses, inverse weights at qpos0), which MuJoCo Warp's ``set_const`` would recompute for every world at each reset.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from flowrl.envs.backends.mujoco import MujocoEnv
from flowrl.envs.base import env_device
from flowrl.envs.tasks.base import MujocoTask
from flowrl.errors import FlowrlError

NOT_IN_WARP_MODEL = ("bvh_aabb",)
"""Model fields a task may vary that MuJoCo Warp's model lacks: C MuJoCo's bounding volumes of bodies (MuJoCo Warp's
broadphase bounds each geom: geom_aabb, geom_rbound)."""


def warp_available() -> bool:
    try:
        import mujoco_warp  # noqa: F401
        import warp  # noqa: F401
    except ImportError:
        return False
    return True


class MujocoWarpEnv(MujocoEnv):
    """N copies of a MuJoCo task on MuJoCo Warp (``device``: cuda, cuda:N or cpu).

    Autoresets draw their noise on the device and reset by mask (``batched_autoreset``): float32 already
    rules out bit parity with gymnasium's per-env reset sequence, and a host loop over thousands of
    finishing envs, or a host round trip at every chunk's end, would cost more than the physics.
    """

    batched_autoreset = True

    def __init__(self, task: MujocoTask, num_envs: int, device: str | torch.device = "cuda",
                 seed: int | None = None, nconmax: int | None = None, njmax: int | None = None,
                 terminate_on_success: bool = False, capture_controller: bool = True) -> None:
        if not warp_available():
            raise FlowrlError("the warp backend needs mujoco-warp and warp-lang: pip install 'flowrl[warp]'")
        import mujoco
        import mujoco_warp as mjw
        import warp as wp

        model = task.load_model()
        if model.opt.solver == int(mujoco.mjtSolver.mjSOL_PGS):
            raise FlowrlError(f"{task.name} uses the PGS solver, which MuJoCo Warp lacks; "
                              "use the Newton variant (task Humanoid-Newton)")
        torch_device = env_device(device)
        super().__init__(task, model, num_envs, torch_device, seed, torch_device, torch.float32, terminate_on_success)
        wp.config.quiet = True
        wp.init()
        self.wp, self.mjw = wp, mjw
        self.wp_device = f"cuda:{torch_device.index}" if torch_device.type == "cuda" else "cpu"
        con, efc = task.warp_buffers
        varied = [name for name in task.varied_model_fields if name not in NOT_IN_WARP_MODEL]
        with wp.ScopedDevice(self.wp_device):
            self.m = mjw.put_model(model, batch_sizes=dict.fromkeys(varied, num_envs))
            self.d = mjw.make_data(model, nworld=num_envs, nconmax=nconmax or con, njmax=njmax or efc)
        self.m.opt.warn_overflow = 0  # overflows are handled per world: reset and counted in info
        view = wp.to_torch
        self.qpos, self.qvel, self.ctrl = view(self.d.qpos), view(self.d.qvel), view(self.d.ctrl)
        self.state = {"qpos": self.qpos, "qvel": self.qvel}
        for name in task.derived_fields:
            self.state[name] = view(getattr(self.d, name))
        self.model_fields = {name: view(getattr(self.m, name)) for name in varied}
        self._reset_mask = wp.zeros(num_envs, dtype=bool, device=self.wp_device)
        self._mask = wp.to_torch(self._reset_mask)
        self._overflow = wp.to_torch(self.d.overflow)
        self._warm = wp.to_torch(self.d.qacc_warmstart)
        self._graphs: dict[str, Any] = {}
        self.capture_controller = capture_controller and self.wp_device != "cpu"
        """On CUDA, capture a controlled task's whole control step as one graph (else: one graph per physics
        stage, the controller's torch code launched between them)."""
        self._control_graph: torch.cuda.CUDAGraph | None = None
        self._action_in: torch.Tensor | None = None

    def _run(self, name: str, fn: Any) -> None:
        """Run ``fn`` (a sequence of MuJoCo Warp calls); on CUDA, as a graph captured on first use,
        since launching its many kernels one by one from Python would cost more than the physics."""
        wp = self.wp
        with wp.ScopedDevice(self.wp_device):
            if self.wp_device == "cpu":
                fn()
                return
            if name not in self._graphs:
                fn()  # compile and load the kernels before capturing them
                with wp.ScopedCapture() as capture:
                    fn()
                self._graphs[name] = capture.graph
            wp.capture_launch(self._graphs[name])

    def _physics(self) -> None:
        for _ in range(self.task_def.frame_skip):
            self.mjw.step(self.m, self.d)
        if self.task_def.needs_contact_forces:
            self.mjw.rne_postconstraint(self.m, self.d)

    def _simulate(self) -> None:
        self._run("step", self._physics)

    def _run_physics(self, action: torch.Tensor) -> None:
        if self.controller is None:
            super()._run_physics(action)
            return
        if self._action_in is None:
            self._action_in = torch.zeros(action.shape, dtype=self.dtype, device=self.sim_device)
        self._action_in.copy_(action)
        if not self.capture_controller:
            with self.wp.ScopedDevice(self.wp_device):
                self._control_step(graphs=self.wp_device != "cpu")
        elif self._control_graph is None:
            self._capture_control_step()
        else:
            self._control_graph.replay()

    def _control_step(self, graphs: bool) -> None:
        """One env step of a controlled task from ``_action_in``: the goal on the first substep's kinematics, then
        at each substep ``step1`` -> torques -> ``step2``. ``graphs``: launch ``step1``/``step2`` as Warp graphs
        (one per stage) rather than kernel by kernel."""
        mjw, m, d, controller = self.mjw, self.m, self.d, self.controller
        run = self._run if graphs else (lambda _name, fn: fn())
        for i in range(self.task_def.frame_skip):
            run("step1", lambda: mjw.step1(m, d))
            if i == 0:
                controller.set_goal(self.state, self._action_in)
            self.ctrl.copy_(controller.ctrl(self.state))
            run("step2", lambda: mjw.step2(m, d))
        if self.task_def.needs_contact_forces:
            mjw.rne_postconstraint(m, d)

    def _capture_control_step(self) -> None:
        """Run this control step eagerly on a side stream (it loads the kernels and initialises cuBLAS), then
        capture the same work, Warp's kernels and torch's, as one CUDA graph on that stream. Should the capture
        fail, later steps fall back to one graph per physics stage, with a warning saying why."""
        wp = self.wp
        current = torch.cuda.current_stream(self.sim_device)
        stream = torch.cuda.Stream(self.sim_device)
        warp_stream = wp.stream_from_torch(stream)
        stream.wait_stream(current)
        with torch.cuda.stream(stream), wp.ScopedDevice(self.wp_device), wp.ScopedStream(warp_stream):
            self._control_step(graphs=False)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    with wp.ScopedCapture(stream=warp_stream, external=True):
                        self._control_step(graphs=False)
            except Exception as err:  # noqa: BLE001 - any capture failure leaves a working, slower path
                self.capture_controller = False
                warnings.warn(f"{self.task}: the control step could not be captured as one CUDA graph ({err}); "
                              "substeps run as separate graphs", RuntimeWarning, stacklevel=3)
        current.wait_stream(stream)
        if self.capture_controller:
            self._control_graph = graph

    def _contact_forces(self) -> None:
        self._run("contact_forces", lambda: self.mjw.rne_postconstraint(self.m, self.d))

    def _forward(self, ids: np.ndarray | None) -> None:
        # After per-env resets only tasks that read derived fields need them now; every step
        # recomputes them anyway.
        if ids is None or self.task_def.derived_fields:
            self._run("forward", lambda: self.mjw.forward(self.m, self.d))

    def _clear(self, ids: np.ndarray | torch.Tensor) -> None:
        mask = torch.zeros(self.num_envs, dtype=torch.bool, device=self.sim_device)
        mask[torch.as_tensor(ids, device=self.sim_device)] = True
        self._clear_where(mask)

    def _forward_where(self, mask: torch.Tensor) -> None:
        if self.task_def.derived_fields:  # as _forward after per-env resets: every world
            self._forward(None)

    def _clear_where(self, mask: torch.Tensor) -> None:
        self._mask.copy_(mask)
        self._run("reset", lambda: self.mjw.reset_data(self.m, self.d, reset=self._reset_mask))
        self._overflow.masked_fill_(self._mask, 0)

    def _warmstart(self) -> torch.Tensor:
        return self._warm

    def _backend_bad(self) -> torch.Tensor:
        """Worlds whose contact or constraint buffers overflowed during the step (per-world bitmask)."""
        return self._overflow != 0
