"""Backend ``cpu``: ``mujoco.batch.Batch`` stepping N simulations on a thread pool.

float64 and bit-identical to ``mj_step``; the state arrays of the batch are shared with torch
without copies (qpos, qvel, ctrl), derived fields are read through views of the batch's output
arrays. Model fields a task varies per episode are the batch's per-simulation fields (``expand``);
after writing them, ``mj_setConst`` runs per simulation, so every constant MuJoCo derives from them
(subtree masses, inverse weights at qpos0, ...) is what compiling that model would give. Task logic
comes from the task object (:mod:`flowrl.envs.tasks`), stepping logic from
:mod:`flowrl.envs.backends.mujoco`.
"""

from __future__ import annotations

import warnings

import mujoco
import numpy as np
import torch
from mujoco.batch import Batch

from flowrl.envs.backends.mujoco import MujocoEnv
from flowrl.envs.tasks.base import MujocoTask


def _view(array: np.ndarray) -> torch.Tensor:
    """A torch view of a (possibly read-only) numpy array that the batch updates in place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays: we never write through these views
        return torch.from_numpy(array)


class MujocoBatchEnv(MujocoEnv):
    """N copies of a MuJoCo task on ``mujoco.batch`` (threads: 0 means all cores)."""

    def __init__(self, task: MujocoTask, num_envs: int, device: str | torch.device = "cpu",
                 seed: int | None = None, threads: int = 0, terminate_on_success: bool = False) -> None:
        model = task.load_model()
        # MuJoCo would silently restart a diverged simulation from qpos0; we want to see it, reset it
        # with proper reset noise and count it.
        model.opt.disableflags |= int(mujoco.mjtDisableBit.mjDSBL_AUTORESET)
        super().__init__(task, model, num_envs, device, seed, torch.device("cpu"), torch.float64, terminate_on_success)
        self.batch = Batch(model, num_envs, threads, persistent=True)
        self.qpos = _view(self.batch.bind("qpos"))
        self.qvel = _view(self.batch.bind("qvel"))
        self.ctrl = _view(self.batch.bind("ctrl"))
        self.state = {"qpos": self.qpos, "qvel": self.qvel}
        for name in task.derived_fields:
            self.state[name] = _view(self.batch.bind(name))
        for name in task.varied_model_fields:
            self.model_fields[name] = torch.from_numpy(self.batch.expand(name))
        if task.needs_contact_forces:
            self.state["cfrc_ext"] = torch.zeros((num_envs, model.nbody, 6), dtype=torch.float64)
            self._datas = [mujoco.MjData(model) for _ in range(num_envs)]

    def _simulate(self) -> None:
        """``frame_skip`` substeps of ``mj_step``, then, where contact forces are observed, the
        ``mj_rnePostConstraint`` that gymnasium runs after its step, on each simulation's MjData
        (the batch has no such call; the forces of the fused ``mj_step`` differ from it)."""
        self.batch.step(nstep=self.task_def.frame_skip)
        if self.task_def.needs_contact_forces:
            self._contact_forces()

    def _substep(self) -> None:
        self.batch.step(nstep=1)

    def _contact_forces(self) -> None:
        out = self.state["cfrc_ext"].numpy()
        for i, data in enumerate(self._datas):
            self.batch.get_data(i, data)
            mujoco.mj_rnePostConstraint(self.model, data)
            out[i] = data.cfrc_ext

    def _forward(self, ids: np.ndarray | torch.Tensor | None) -> None:
        self.batch.forward(None if ids is None else np.asarray(ids))

    def _clear(self, ids: np.ndarray | torch.Tensor) -> None:
        self.batch.reset(np.asarray(ids), stage=int(mujoco.mjtStage.mjSTAGE_NONE))

    def _model_changed(self, mask: torch.Tensor) -> None:
        self.batch.set_const(mask.cpu().numpy())

    def _warmstart(self) -> torch.Tensor:
        return torch.from_numpy(self.batch.bind("qacc_warmstart"))

    def _backend_bad(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.batch.status) != 0)
