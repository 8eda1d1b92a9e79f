"""The stepping logic every MuJoCo backend shares: task terms, resets, seeding, bad states.

A backend subclass only moves physics: it exposes its state as torch tensors (``qpos``, ``qvel``,
``ctrl`` and the derived fields the task reads, in ``state``; the model fields the task varies per
world, in ``model_fields``) and implements ``_simulate``, ``_substep``, ``_forward``, ``_clear`` and
access to the solver warm start. The task (:class:`flowrl.envs.tasks.base.MujocoTask`) supplies every
term.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from flowrl.envs.base import BatchedEnv, env_device
from flowrl.envs.tasks.base import ModelFields, MujocoTask, NumpyDraws, TorchDraws
from flowrl.errors import FlowrlError


class MujocoEnv(BatchedEnv):
    """N copies of a MuJoCo task; see :class:`BatchedEnv` for the interface."""

    qpos: torch.Tensor
    qvel: torch.Tensor
    ctrl: torch.Tensor
    state: dict[str, torch.Tensor]
    model_fields: dict[str, torch.Tensor]
    """Per-world views, (N, ...), of the model fields the task varies (its ``varied_model_fields``) that the
    backend's model holds; the task's values for a field it does not hold are not written."""

    def __init__(self, task: MujocoTask, model: Any, num_envs: int, device: str | torch.device,
                 seed: int | None, sim_device: torch.device, dtype: torch.dtype,
                 terminate_on_success: bool = False) -> None:
        self.task_def = task
        self.task = task.name
        self.model = model
        self.num_envs = num_envs
        self.device = env_device(device)
        self.sim_device, self.dtype = sim_device, dtype
        self.max_episode_steps = task.max_episode_steps
        self.dt = task.dt(model)
        low, high = task.action_bounds(model)
        self.single_action_space = gym.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (task.obs_dim,), np.float64)
        self._low = torch.as_tensor(low, device=sim_device)
        self._high = torch.as_tensor(high, device=sim_device)
        self.controller = task.controller(model, num_envs, sim_device, dtype)
        if terminate_on_success and not task.has_success:
            raise FlowrlError(f"terminate_on_success: task {task.name} reports no success")
        self.terminate_on_success = terminate_on_success
        """End an episode as a termination at its first success (robomimic's goal-reaching form)."""
        self.model_info = {"body_mass": torch.as_tensor(model.body_mass, device=sim_device, dtype=dtype)}
        self.qpos0 = model.qpos0.copy()
        self._seed = seed
        self.rngs = [np.random.default_rng(None if seed is None else seed + i) for i in range(num_envs)]
        self._tracked = torch.zeros(num_envs, dtype=dtype, device=sim_device)  # the task's tracked quantity now
        k = task.observation_memory_dim
        self._memory = torch.zeros((num_envs, k), dtype=dtype, device=sim_device) if k else None
        self.bad_state_count = torch.zeros((), dtype=torch.int64, device=sim_device)  # a tensor: no sync per step
        self._reset_gen = torch.Generator(device=sim_device)
        if seed is not None:
            self._reset_gen.manual_seed(seed)
        self._qpos0 = torch.as_tensor(self.qpos0, dtype=dtype, device=sim_device)
        self.model_fields = {}

    # -- what a backend provides ---------------------------------------------------------------
    @abstractmethod
    def _simulate(self) -> None:
        """``frame_skip`` physics steps from ``ctrl``; then ``cfrc_ext`` if the task reads it."""

    def _substep(self) -> None:
        """One physics step from ``ctrl``, for :meth:`_run_physics`'s controller loop (a backend that runs
        controlled steps its own way, like warp, need not provide it)."""
        raise NotImplementedError(f"{type(self).__name__} runs controlled steps in its own _run_physics")

    def _contact_forces(self) -> None:
        """``cfrc_ext`` after the last substep, for tasks that read it."""

    @abstractmethod
    def _forward(self, ids: np.ndarray | None) -> None:
        """Recompute derived fields at the current state (of ``ids``, or of every env)."""

    @abstractmethod
    def _clear(self, ids: np.ndarray) -> None:
        """Reset the simulations ``ids`` to the model's defaults (warm start included)."""

    @abstractmethod
    def _warmstart(self) -> torch.Tensor:
        """The solver's warm start, (N, nv), writable."""

    def _backend_bad(self) -> torch.Tensor:
        """Envs the simulator itself flags (errors, buffer overflows)."""
        return torch.zeros(self.num_envs, dtype=torch.bool, device=self.sim_device)

    def _model_changed(self, mask: torch.Tensor) -> None:
        """The model fields of the worlds where ``mask`` were written: recompute what the backend derives from
        them (nothing by default)."""

    # -- shared logic --------------------------------------------------------------------------
    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.device == self.device else x.to(self.device)

    def _obs(self) -> torch.Tensor:
        if self._memory is None:  # tasks without memory may define observation(s) alone
            return self.task_def.observation(self.state)
        return self.task_def.observation(self.state, self._memory)

    def _remember(self, ids: torch.Tensor | None = None) -> None:
        """Keep what the next step's observation reads of the current state (of envs ``ids``, or of all)."""
        if self._memory is None:
            return
        memory = self.task_def.observation_memory(self.state)
        if ids is None:
            self._memory.copy_(memory)
        else:
            self._memory[ids] = memory[ids]

    def _run_physics(self, action: torch.Tensor) -> None:
        """One env step: the action straight into ``ctrl`` for ``frame_skip`` substeps, or through
        the task's controller: its goal set once, its output recomputed before every substep from
        the forwarded state (as robosuite runs its controllers)."""
        controller = self.controller
        if controller is None:
            self.ctrl.copy_(action)
            self._simulate()
            return
        self._forward(None)
        controller.set_goal(self.state, action)
        for i in range(self.task_def.frame_skip):
            if i:
                self._forward(None)
            self.ctrl.copy_(controller.ctrl(self.state))
            self._substep()
        if self.task_def.needs_contact_forces:
            self._contact_forces()

    def _reset_ids(self, ids: np.ndarray | torch.Tensor) -> None:
        """New episodes in envs ``ids``, each drawn from its env's own numpy generator (gymnasium's
        per-env reset sequence): ``reset`` and the autoresets of backends without ``batched_autoreset``."""
        if len(ids) == 0:
            return
        self._clear(ids)
        idx = torch.as_tensor(ids, device=self.sim_device)
        draws = NumpyDraws([self.rngs[i] for i in idx.cpu().tolist()])
        model = self.task_def.reset_model(draws)
        qpos, qvel = self.task_def.reset(draws, torch.as_tensor(self.qpos0), self.model.nv)
        if model:
            mask = torch.zeros(self.num_envs, dtype=torch.bool, device=self.sim_device)
            mask[idx] = True
            self._write_model(model, mask, idx)
        self.qpos[idx] = qpos.to(self.sim_device, self.dtype)
        self.qvel[idx] = qvel.to(self.sim_device, self.dtype)
        self._forward(ids)
        reset_controller = getattr(self.controller, "reset", None)
        if reset_controller is not None:  # per-episode controller state (robosuite: nullspace target, gripper)
            reset_controller(self.state, idx)
        self._tracked[idx] = self.task_def.tracked(self.state, self.model_info)[idx].to(self.dtype)
        if self._memory is not None:
            self._memory[idx] = 0.0  # an episode's first observation remembers no previous step
        if self.task_def.needs_contact_forces:
            self.state["cfrc_ext"][idx] = 0.0  # gymnasium runs no mj_rnePostConstraint after a reset

    def _write_model(self, fields: ModelFields, mask: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write the task's model values (:meth:`MujocoTask.reset_model`) into the worlds where ``mask``: the
        values' rows are those worlds' in the order of ``ids``, or (``ids`` None) every world's, kept where
        ``mask`` (batched resets: no read-back from the device)."""
        for name, (elements, values) in fields.items():
            view = self.model_fields.get(name)
            if view is None:
                continue
            cols = torch.as_tensor(elements, device=view.device)
            values = values.to(view.device, view.dtype).reshape(*values.shape[:2], *view.shape[2:])
            if ids is None:
                keep = mask.view(-1, *[1] * (values.dim() - 1))
                view[:, cols] = torch.where(keep, values, view[:, cols])
            else:
                view[ids.to(view.device)[:, None], cols] = values
        self._model_changed(mask)

    def reset(self, seed: int | None = None) -> torch.Tensor:
        seed = self._seed if seed is None else seed
        if seed is not None:
            self.rngs = [np.random.default_rng(seed + i) for i in range(self.num_envs)]
            self._reset_gen.manual_seed(seed)
        self._reset_ids(np.arange(self.num_envs))
        self._clear_counters()
        obs = self._obs()
        self._remember()
        return self._out(obs)

    def _step(self, action: torch.Tensor, alive: torch.Tensor):
        given = torch.as_tensor(action).detach().to(self.sim_device)
        given = given if given.is_floating_point() else given.double()
        given = torch.minimum(torch.maximum(given, self._low.to(given.dtype)), self._high.to(given.dtype))
        before = self._tracked.clone()
        self._run_physics(given)
        self._tracked.copy_(self.task_def.tracked(self.state, self.model_info))
        obs = self._obs()
        self._remember()
        reward, terminated = self.task_def.reward_and_termination(self.state, before, self._tracked, self.dt, given)
        bad = ~(torch.isfinite(self.qpos).all(dim=1) & torch.isfinite(self.qvel).all(dim=1)
                & torch.isfinite(obs).all(dim=1) & torch.isfinite(reward)) | self._backend_bad()
        bad &= alive.to(self.sim_device)
        self.bad_state_count += bad.sum()
        obs = torch.nan_to_num(obs, nan=0.0, posinf=0.0, neginf=0.0)
        reward = torch.where(bad, 0.0, reward)
        info: dict[str, Any] = {"bad_state": self._out(bad), "bad_state_count": self._out(self.bad_state_count.clone())}
        success = self.task_def.success(self.state)
        if success is not None:
            info["success"] = self._out(success)
            if self.terminate_on_success:
                terminated = terminated | success
        return self._out(obs), self._out(reward), self._out(terminated | bad), info

    def _reset_envs(self, done: torch.Tensor) -> torch.Tensor:
        if self.batched_autoreset:
            return self._reset_masked(done.to(self.sim_device))
        ids = torch.nonzero(done.to(self.sim_device)).flatten()
        self._reset_ids(ids)
        obs = self._obs()  # the reset envs' rows: first observations, remembering nothing
        self._remember(ids)
        return self._out(obs)

    def _reset_masked(self, mask: torch.Tensor) -> torch.Tensor:
        """New episodes where ``mask`` as masked tensor operations (``batched_autoreset``): reset states are
        drawn for every env and kept where ``mask``. Only a controller with per-episode state (robosuite's
        nullspace target, gripper) needs the indices, read back from the device."""
        rows = mask.unsqueeze(1)
        self._clear_where(mask)
        draws = TorchDraws(self._reset_gen, self.num_envs, self.sim_device, self.dtype)
        model = self.task_def.reset_model(draws)
        qpos, qvel = self.task_def.reset(draws, self._qpos0, self.model.nv)
        if model:
            self._write_model(model, mask)
        self.qpos.copy_(torch.where(rows, qpos.to(self.dtype), self.qpos))
        self.qvel.copy_(torch.where(rows, qvel.to(self.dtype), self.qvel))
        self._forward_where(mask)
        reset_controller = getattr(self.controller, "reset", None)
        if reset_controller is not None:
            reset_controller(self.state, torch.nonzero(mask).flatten())
        self._tracked.copy_(torch.where(mask, self.task_def.tracked(self.state, self.model_info).to(self.dtype),
                                        self._tracked))
        if self.task_def.needs_contact_forces:
            self.state["cfrc_ext"].masked_fill_(mask.view(-1, 1, 1), 0.0)
        if self._memory is None:
            return self._out(self._obs())
        self._memory.masked_fill_(rows, 0.0)  # an episode's first observation remembers no previous step
        obs = self._obs()
        self._memory.copy_(torch.where(rows, self.task_def.observation_memory(self.state), self._memory))
        return self._out(obs)

    def _clear_where(self, mask: torch.Tensor) -> None:
        """:meth:`_clear` of the envs where ``mask``; a backend that can reset by mask on the device overrides it."""
        self._clear(torch.nonzero(mask).flatten())

    def _forward_where(self, mask: torch.Tensor) -> None:
        """:meth:`_forward` of the envs where ``mask`` (likewise)."""
        self._forward(torch.nonzero(mask).flatten())

    def get_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qpos (N, nq), qvel (N, nv)) copies."""
        return self._out(self.qpos.clone()), self._out(self.qvel.clone())

    def set_state(self, qpos: torch.Tensor, qvel: torch.Tensor) -> torch.Tensor:
        """Set every env's joint positions and velocities (as gymnasium's ``set_state``); returns obs."""
        self.qpos.copy_(torch.as_tensor(qpos).to(self.sim_device, self.dtype))
        self.qvel.copy_(torch.as_tensor(qvel).to(self.sim_device, self.dtype))
        self._forward(None)
        self._tracked.copy_(self.task_def.tracked(self.state, self.model_info))
        if self.task_def.needs_contact_forces:
            self.state["cfrc_ext"].zero_()
        self._remember()  # as if the state had held still for a step
        return self._out(self._obs())

    def _controller_state(self) -> dict[str, torch.Tensor]:
        """The controller's per-env state tensors (none without a controller, or for one that keeps none)."""
        state_tensors = getattr(self.controller, "state_tensors", None)
        return state_tensors() if state_tensors is not None else {}

    def get_full_state(self) -> dict[str, Any]:
        """Everything the next steps depend on (for exact resume); tensors and strings only."""
        returns, elapsed = self._counters()
        state = {"qpos": self.qpos.clone(), "qvel": self.qvel.clone(), "qacc_warmstart": self._warmstart().clone(),
                 "elapsed": elapsed.clone(), "returns": returns.clone(), "position": self._tracked.clone(),
                 **({"observation_memory": self._memory.clone()} if self._memory is not None else {}),
                 **{f"model.{name}": view.clone() for name, view in self.model_fields.items()},
                 "rngs": json.dumps([r.bit_generator.state for r in self.rngs]),
                 "reset_generator": self._reset_gen.get_state()}
        if self.task_def.needs_contact_forces:
            state["cfrc_ext"] = self.state["cfrc_ext"].clone()
        state.update({f"controller.{k}": v.clone() for k, v in self._controller_state().items()})
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    def set_full_state(self, state: dict[str, Any]) -> None:
        dev = self.sim_device
        for name, view in self.model_fields.items():
            if f"model.{name}" not in state:
                raise FlowrlError(f"set_full_state: the saved state lacks the worlds' {name} (drawn per episode)")
            view.copy_(state[f"model.{name}"].to(view.device))
        if self.model_fields:
            self._model_changed(torch.ones(self.num_envs, dtype=torch.bool, device=dev))
        self.qpos.copy_(state["qpos"].to(dev))
        self.qvel.copy_(state["qvel"].to(dev))
        self._forward(None)
        self._warmstart().copy_(state["qacc_warmstart"].to(dev))
        returns, elapsed = self._counters()
        elapsed.copy_(state["elapsed"].to(elapsed.device))
        returns.copy_(state["returns"].to(returns.device))
        self._tracked.copy_(state["position"].to(dev))
        if self._memory is not None:
            if "observation_memory" not in state:
                raise FlowrlError("set_full_state: the saved state lacks the observation's memory of the last step")
            self._memory.copy_(state["observation_memory"].to(dev))
        for rng, st in zip(self.rngs, json.loads(state["rngs"])):
            rng.bit_generator.state = st
        self._reset_gen.set_state(state["reset_generator"])
        if "cfrc_ext" in state:
            self.state["cfrc_ext"].copy_(state["cfrc_ext"].to(dev))
        for name, tensor in self._controller_state().items():  # in place: CUDA graphs hold these tensors
            if f"controller.{name}" not in state:
                raise FlowrlError(f"set_full_state: the saved state lacks the controller's {name!r}")
            tensor.copy_(state[f"controller.{name}"].to(tensor.device))
