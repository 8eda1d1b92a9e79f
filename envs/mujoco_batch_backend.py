"""Backend ``cpu``: ``mujoco.batch.Batch`` stepping N simulations on a thread pool.

float64 and bit-identical to ``mj_step``; the state arrays of the batch are shared with torch
without copies (qpos, qvel, ctrl), derived fields are read through views of the batch's output
arrays. Task logic comes from :mod:`flowrl.envs.locomotion`.
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
import torch
from mujoco.batch import Batch

from flowrl.envs.base import BatchedEnv
from flowrl.envs.locomotion import LocomotionTask


def _view(array: np.ndarray) -> torch.Tensor:
    """A torch view of a (possibly read-only) numpy array that the batch updates in place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays: we never write through these views
        return torch.from_numpy(array)


class MujocoBatchEnv(BatchedEnv):
    """N copies of a locomotion task on ``mujoco.batch`` (threads: 0 means all cores)."""

    def __init__(self, task: LocomotionTask, num_envs: int, device: str | torch.device = "cpu",
                 seed: int | None = None, threads: int = 0) -> None:
        self.spec = task
        self.task = task.spec.name
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.model = task.load_model()
        # MuJoCo would silently restart a diverged simulation from qpos0; we want to see it, reset it
        # with proper reset noise and count it.
        self.model.opt.disableflags |= int(mujoco.mjtDisableBit.mjDSBL_AUTORESET)
        self.batch = Batch(self.model, num_envs, threads, persistent=True)
        self.max_episode_steps = task.spec.max_episode_steps
        self.dt = task.dt(self.model)
        low, high = self.model.actuator_ctrlrange.T.astype(np.float32)
        self.single_action_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (task.spec.obs_dim,), np.float64)
        self._low = torch.as_tensor(self.model.actuator_ctrlrange[:, 0])
        self._high = torch.as_tensor(self.model.actuator_ctrlrange[:, 1])
        self.qpos = _view(self.batch.bind("qpos"))
        self.qvel = _view(self.batch.bind("qvel"))
        self.ctrl = _view(self.batch.bind("ctrl"))
        self.state = {"qpos": self.qpos, "qvel": self.qvel}
        for name in task.derived_fields:
            self.state[name] = _view(self.batch.bind(name))
        if task.needs_contact_forces:
            self.state["cfrc_ext"] = torch.zeros((num_envs, self.model.nbody, 6), dtype=torch.float64)
            self._datas = [mujoco.MjData(self.model) for _ in range(num_envs)]
        self.model_info = {"body_mass": torch.as_tensor(self.model.body_mass)}
        self.qpos0 = self.model.qpos0.copy()
        self._seed = seed
        self.rngs = [np.random.default_rng(None if seed is None else seed + i) for i in range(num_envs)]
        self.elapsed = torch.zeros(num_envs, dtype=torch.int64)
        self.returns = torch.zeros(num_envs, dtype=torch.float64)
        self.bad_state_count = 0
        self._position = torch.zeros(num_envs, dtype=torch.float64)  # progress coordinate after the last step

    # -- state ----------------------------------------------------------------------------------
    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device) if self.device.type != "cpu" else x

    def _obs(self) -> torch.Tensor:
        return self.spec.observation(self.state)

    def _reset_ids(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        self.batch.reset(ids, stage=int(mujoco.mjtStage.mjSTAGE_NONE))
        for i in ids:
            qpos, qvel = self.spec.reset_state(self.rngs[i], self.qpos0, self.model.nv)
            self.qpos[i] = torch.from_numpy(qpos)
            self.qvel[i] = torch.from_numpy(qvel)
        self.batch.forward(ids)
        self._position[ids] = self.spec.position(self.state, self.model_info)[ids]
        self.elapsed[ids] = 0
        self.returns[ids] = 0.0
        if self.spec.needs_contact_forces:
            self.state["cfrc_ext"][ids] = 0.0  # gymnasium runs no mj_rnePostConstraint after a reset

    def get_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qpos (N, nq), qvel (N, nv)) copies."""
        return self._out(self.qpos.clone()), self._out(self.qvel.clone())

    def set_state(self, qpos: torch.Tensor, qvel: torch.Tensor) -> torch.Tensor:
        """Set every env's joint positions and velocities (as gymnasium's ``set_state``); returns obs."""
        self.qpos.copy_(torch.as_tensor(qpos, dtype=torch.float64).cpu())
        self.qvel.copy_(torch.as_tensor(qvel, dtype=torch.float64).cpu())
        self.batch.forward()
        self._position.copy_(self.spec.position(self.state, self.model_info))
        if self.spec.needs_contact_forces:
            self.state["cfrc_ext"].zero_()
        return self._out(self._obs())

    def get_full_state(self) -> dict[str, Any]:
        """Everything the next steps depend on (for exact resume); tensors and strings only."""
        import json

        state = {"qpos": self.qpos.clone(), "qvel": self.qvel.clone(),
                 "qacc_warmstart": torch.from_numpy(self.batch.bind("qacc_warmstart").copy()),
                 "elapsed": self.elapsed.clone(), "returns": self.returns.clone(), "position": self._position.clone(),
                 "rngs": json.dumps([r.bit_generator.state for r in self.rngs])}
        if self.spec.needs_contact_forces:
            state["cfrc_ext"] = self.state["cfrc_ext"].clone()
        return state

    def set_full_state(self, state: dict[str, Any]) -> None:
        import json

        self.qpos.copy_(state["qpos"])
        self.qvel.copy_(state["qvel"])
        self.batch.forward()
        self.batch.bind("qacc_warmstart")[:] = state["qacc_warmstart"].numpy()
        self.elapsed.copy_(state["elapsed"])
        self.returns.copy_(state["returns"])
        self._position.copy_(state["position"])
        for rng, st in zip(self.rngs, json.loads(state["rngs"])):
            rng.bit_generator.state = st
        if "cfrc_ext" in state:
            self.state["cfrc_ext"].copy_(state["cfrc_ext"])

    def _simulate(self) -> None:
        """``frame_skip`` substeps of ``mj_step``, then, where contact forces are observed, the
        ``mj_rnePostConstraint`` that gymnasium runs after its step, on each simulation's MjData
        (the batch has no such call; the forces of the fused ``mj_step`` differ from it)."""
        self.batch.step(nstep=self.spec.frame_skip)
        if self.spec.needs_contact_forces:
            out = self.state["cfrc_ext"].numpy()
            for i, data in enumerate(self._datas):
                self.batch.get_data(i, data)
                mujoco.mj_rnePostConstraint(self.model, data)
                out[i] = data.cfrc_ext

    # -- interface ------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> torch.Tensor:
        seed = self._seed if seed is None else seed
        if seed is not None:
            self.rngs = [np.random.default_rng(seed + i) for i in range(self.num_envs)]
        self._reset_ids(np.arange(self.num_envs))
        return self._out(self._obs())

    def step(self, action: torch.Tensor):
        given = torch.as_tensor(action).detach().cpu()
        given = given if given.is_floating_point() else given.double()
        given = torch.minimum(torch.maximum(given, self._low.to(given.dtype)), self._high.to(given.dtype))
        act = given.double()
        x_before = self._position.clone()
        self.ctrl.copy_(act)
        self._simulate()
        self._position.copy_(self.spec.position(self.state, self.model_info))
        x_velocity = (self._position - x_before) / self.dt
        obs = self._obs()
        reward, terminated = self.spec.reward_and_termination(self.state, x_velocity, given)
        self.elapsed += 1
        truncated = self.elapsed >= self.max_episode_steps
        bad = ~(torch.isfinite(self.qpos).all(dim=1) & torch.isfinite(self.qvel).all(dim=1)
                 & torch.isfinite(obs).all(dim=1) & torch.isfinite(reward))
        bad |= torch.from_numpy(np.asarray(self.batch.status) != 0)
        if bad.any():
            self.bad_state_count += int(bad.sum())
            obs = torch.nan_to_num(obs, nan=0.0, posinf=0.0, neginf=0.0)
            reward = torch.where(bad, 0.0, reward)
            terminated = terminated | bad
        self.returns += reward
        done = terminated | truncated
        info: dict[str, Any] = {"done_mask": done, "episode_return": self.returns.clone(),
                                "episode_length": self.elapsed.clone(), "bad_state": bad,
                                "bad_state_count": self.bad_state_count}
        final_obs = obs
        if done.any():
            final_obs = obs.clone()
            ids = torch.nonzero(done).flatten().numpy()
            self._reset_ids(ids)
            obs = obs.clone()
            obs[done] = self._obs()[done]
        info["final_obs"] = self._out(final_obs)
        info = {k: self._out(v) if isinstance(v, torch.Tensor) else v for k, v in info.items()}
        return self._out(obs), self._out(reward), self._out(terminated), self._out(truncated), info
