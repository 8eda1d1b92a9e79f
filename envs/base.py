"""The batched, torch-native environment interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import torch

from flowrl.errors import FlowrlError


def env_device(device: str | torch.device) -> torch.device:
    """``device`` as the torch device an env keeps its tensors on, with its index: ``cuda`` is the current
    CUDA device, ``cuda:0`` there, so a tensor's ``.device`` compares equal to the env's own."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


@dataclass
class ChunkResult:
    """What stepping N envs through a (N, T, act_dim) action chunk gives.

    An env whose episode ends inside the chunk takes none of the chunk's remaining actions into
    its next episode: that episode starts from its reset state at the chunk boundary, so ``obs``
    is its first observation. Steps after the end are not part of any episode (``valid`` is False,
    their rewards 0).
    """

    obs: torch.Tensor
    """(N, obs_dim) the observation at the chunk boundary (a new episode's first where ``done``)."""
    rewards: torch.Tensor
    """(N, T) float64, 0 where not ``valid``."""
    valid: torch.Tensor
    """(N, T) bool: step j was taken in the episode that was running when the chunk began."""
    terminated: torch.Tensor
    """(N,) the episode ended inside the chunk by a termination (no bootstrapping)."""
    truncated: torch.Tensor
    """(N,) the episode ended inside the chunk at the horizon (bootstrap from ``final_obs``)."""
    final_obs: torch.Tensor
    """(N, obs_dim) the last observation of the episode that ended (equals ``obs`` where not ``done``)."""
    episode_return: torch.Tensor
    """(N,) float64: the return of the episode that ended (valid where ``done``)."""
    episode_length: torch.Tensor
    """(N,) int64: the length of the episode that ended (valid where ``done``)."""
    success: torch.Tensor | None = None
    """(N, T) bool per step, for tasks that report success (False where not ``valid``)."""
    step_obs: torch.Tensor | None = None
    """(N, T, obs_dim) the observation after each valid step (``record_obs=True`` only)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Backend extras, e.g. ``bad_state_count``."""

    @property
    def done(self) -> torch.Tensor:
        return self.terminated | self.truncated


class BatchedEnv(ABC):
    """N environments stepped together; every input and output is an (N, ...) torch tensor.

    :meth:`step_chunk` runs an action chunk with exact episode boundaries (see :class:`ChunkResult`).
    :meth:`step` is a chunk of one step in gymnasium's shape: a finished env resets in the same
    step, ``info["final_obs"]`` holds the last observation of the finished episode (to bootstrap
    truncations), ``info["done_mask"]`` is ``terminated | truncated`` and ``info["episode_return"]``
    / ``info["episode_length"]`` describe it.

    A backend implements :meth:`reset`, :meth:`_step` (one step, no reset; ``truncated`` is decided
    here from the episode length) and :meth:`_reset_envs`, or overrides :meth:`step_chunk` whole.
    """

    task: str
    num_envs: int
    device: torch.device
    single_observation_space: gym.spaces.Box
    single_action_space: gym.spaces.Box
    max_episode_steps: int

    @property
    def obs_dim(self) -> int:
        return int(self.single_observation_space.shape[0])

    @property
    def act_dim(self) -> int:
        return int(self.single_action_space.shape[0])

    @abstractmethod
    def reset(self, seed: int | None = None) -> torch.Tensor:
        """Reset every env; env i is seeded with ``seed + i``. Returns (N, obs_dim)."""

    def _step(self, action: torch.Tensor, alive: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """One step of every env without resetting any: (obs, reward, terminated, info); ``info`` may
        hold ``success`` (N,). Envs not ``alive`` have finished their episode earlier in the chunk:
        their results are discarded (a backend may skip them or step them anyway)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _step nor step_chunk")

    def _reset_envs(self, done: torch.Tensor) -> torch.Tensor:
        """Start a new episode in the envs where ``done`` (autoreset); returns every env's observation."""
        raise NotImplementedError

    batched_autoreset = False
    """:meth:`_reset_envs` resets by mask on the simulation device (autoreset noise drawn for every env at
    once from one seeded torch generator, kept where an episode ended): :meth:`step_chunk` calls it at every
    chunk's end without asking the host whether any episode ended, so the next decision's kernels can queue
    behind the physics. Otherwise it is called only where some env finished (a host synchronisation)."""

    def _counters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Running return and length of every env's current episode (kept here for :meth:`step_chunk`)."""
        if getattr(self, "_ep_return", None) is None:  # made on first use: backends set no counters of their own
            self._ep_return = torch.zeros(self.num_envs, dtype=torch.float64, device=self.device)
            self._ep_length = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        return self._ep_return, self._ep_length

    @property
    def elapsed(self) -> torch.Tensor:
        """(N,) steps taken in every env's current episode."""
        return self._counters()[1]

    def _clear_counters(self, mask: torch.Tensor | None = None) -> None:
        ret, length = self._counters()
        if mask is None:
            ret.zero_()
            length.zero_()
        else:
            ret.masked_fill_(mask, 0.0)
            length.masked_fill_(mask, 0)

    def check_actions(self, actions: torch.Tensor, chunk: bool) -> torch.Tensor:
        """Actions as a tensor of the expected shape, or a FlowrlError naming the problem."""
        actions = torch.as_tensor(actions)
        expected = (self.num_envs, "T", self.act_dim) if chunk else (self.num_envs, self.act_dim)
        ok = actions.dim() == len(expected) and actions.shape[0] == self.num_envs and actions.shape[-1] == self.act_dim
        if not ok:
            raise FlowrlError(f"{self.task}: actions of shape {tuple(actions.shape)}, expected "
                              f"({', '.join(map(str, expected))})")
        if actions.is_floating_point() and not bool(torch.isfinite(actions).all()):
            raise FlowrlError(f"{self.task}: actions contain NaN or infinite values")
        return actions

    def step_chunk(self, actions: torch.Tensor, record_obs: bool = False,
                   after_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> ChunkResult:
        """Take (N, T, act_dim) actions in env units, one per step, with exact episode boundaries.
        ``after_step(j, terminated, truncated)`` is called after step j with the (N,) envs whose episode
        ended there either way, before any env is reset (e.g. to render the states after each step, or
        the last state of an episode cut at the horizon)."""
        actions = self.check_actions(actions, chunk=True)
        n, horizon = actions.shape[0], actions.shape[1]
        dev = self.device
        ep_return, ep_length = self._counters()
        alive = torch.ones(n, dtype=torch.bool, device=dev)
        rewards = torch.zeros((n, horizon), dtype=torch.float64, device=dev)
        valid = torch.zeros((n, horizon), dtype=torch.bool, device=dev)
        terminated = torch.zeros(n, dtype=torch.bool, device=dev)
        truncated = torch.zeros_like(terminated)
        success: torch.Tensor | None = None
        step_obs: torch.Tensor | None = None
        final_obs: torch.Tensor | None = None
        info: dict[str, Any] = {}
        for j in range(horizon):
            valid[:, j] = alive
            obs, reward, term, info = self._step(actions[:, j], alive)
            obs, reward, term = obs.to(dev), reward.to(dev), term.to(dev)
            final_obs = obs.clone() if final_obs is None else torch.where(alive.unsqueeze(1), obs, final_obs)
            reward = torch.where(alive, reward.double(), 0.0)
            rewards[:, j] = reward
            ep_return += reward
            ep_length += alive.long()
            if "success" in info:
                if success is None:
                    success = torch.zeros((n, horizon), dtype=torch.bool, device=dev)
                success[:, j] = info["success"].to(dev) & alive
            if record_obs:
                if step_obs is None:
                    step_obs = torch.zeros((n, horizon, obs.shape[1]), dtype=obs.dtype, device=dev)
                step_obs[:, j] = obs
            ended_term = alive & term
            ended_trunc = alive & (ep_length >= self.max_episode_steps)
            terminated |= ended_term
            truncated |= ended_trunc
            if after_step is not None:
                after_step(j, ended_term, ended_trunc & ~ended_term)
            alive &= ~(ended_term | ended_trunc)
            # every env done before the chunk's end: stop early (a host round trip, so only where the physics runs
            # on the CPU; a GPU simulator keeps stepping the finished envs, whose results are discarded)
            if j + 1 < horizon and getattr(self, "sim_device", dev).type == "cpu" and not bool(alive.any()):
                break
        assert final_obs is not None
        done = terminated | truncated
        result = ChunkResult(final_obs, rewards, valid, terminated, truncated, final_obs, ep_return.clone(),
                             ep_length.clone(), success, step_obs,
                             {k: v for k, v in info.items() if k != "success"})
        if self.batched_autoreset or bool(done.any()):
            result.obs = torch.where(done.unsqueeze(1), self._reset_envs(done).to(dev), final_obs)
            self._clear_counters(done)
        return result

    def step(self, action: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """One step of (N, act_dim) actions in env units: obs, reward, terminated, truncated, info."""
        r = self.step_chunk(self.check_actions(action, chunk=False).unsqueeze(1))
        info = {"final_obs": r.final_obs, "done_mask": r.done, "episode_return": r.episode_return,
                "episode_length": r.episode_length, **r.info}
        if r.success is not None:
            info["success"] = r.success[:, 0]
        return r.obs, r.rewards[:, 0], r.terminated, r.truncated, info

    def step_or_reset(self, action: torch.Tensor, reset_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """One step of the envs not in ``reset_mask``; a new episode, instead of a step, in those in it.

        gymnasium's NEXT_STEP autoreset on the backend's primitives (for
        :class:`flowrl.envs.adapters.GymnasiumVectorEnv`): the step that ends an episode returns its
        true last observation and resets nothing; the caller passes the finished envs in
        ``reset_mask`` on the next call, where their actions are ignored and they return their reset
        observation, reward 0 and terminated = truncated = False. No env takes more physics steps
        than ``step`` would give it. ``info`` holds ``done_mask``, ``episode_return`` and
        ``episode_length`` (of the episodes that ended in this call) and ``success`` where reported.
        """
        if type(self)._step is BatchedEnv._step:
            raise FlowrlError(f"{self.task}: {type(self).__name__} steps whole chunks and has no per-step "
                              "primitives; step one env at a time with step()")
        action = self.check_actions(action, chunk=False)
        dev = self.device
        reset_mask = torch.as_tensor(reset_mask, device=dev)
        if reset_mask.shape != (self.num_envs,) or reset_mask.dtype != torch.bool:
            raise FlowrlError(f"{self.task}: reset_mask must be a bool tensor of shape ({self.num_envs},), got "
                              f"{reset_mask.dtype} {tuple(reset_mask.shape)}")
        ep_return, ep_length = self._counters()
        alive = ~reset_mask
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=dev)
        truncated = torch.zeros_like(terminated)
        reward = torch.zeros(self.num_envs, dtype=torch.float64, device=dev)
        info: dict[str, Any] = {}
        obs: torch.Tensor | None = None
        if bool(alive.any()):  # the finished envs' lanes may be stepped too; they are reset below
            obs, step_reward, term, info = self._step(action, alive)
            obs = obs.to(dev)
            reward = torch.where(alive, step_reward.to(dev).double(), 0.0)
            ep_return += reward
            ep_length += alive.long()
            terminated = alive & term.to(dev)
            truncated = alive & (ep_length >= self.max_episode_steps)
            if "success" in info:
                info["success"] = info["success"].to(dev) & alive
        done = terminated | truncated
        out = {**info, "done_mask": done, "episode_return": ep_return.clone(), "episode_length": ep_length.clone()}
        if bool(reset_mask.any()):
            fresh = self._reset_envs(reset_mask).to(dev)
            obs = fresh if obs is None else torch.where(reset_mask.unsqueeze(1), fresh, obs)
            self._clear_counters(reset_mask)
        assert obs is not None
        return obs, reward, terminated, truncated, out

    def render(self, index: int = 0) -> Any:
        """An RGB frame of env ``index`` (backends that can render)."""
        raise NotImplementedError(f"{type(self).__name__} cannot render")

    def close(self) -> None:
        pass

    def __enter__(self) -> "BatchedEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
