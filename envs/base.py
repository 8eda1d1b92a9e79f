"""The batched, torch-native environment interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import gymnasium as gym
import torch


class BatchedEnv(ABC):
    """N environments stepped together; every input and output is an (N, ...) torch tensor.

    Autoreset happens in the same step: when env i finishes, ``step`` returns the first
    observation of its next episode and ``info["final_obs"][i]`` holds the last observation of the
    finished one (needed to bootstrap values through truncations). ``info["done_mask"]`` is
    ``terminated | truncated``. Episode statistics of finished episodes come back in
    ``info["episode_return"]`` and ``info["episode_length"]`` (valid where ``done_mask``).
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

    @abstractmethod
    def step(
        self, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Apply (N, act_dim) actions in env units; returns obs, reward, terminated, truncated, info."""

    def step_chunk(
        self, actions: torch.Tensor
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """Apply (N, T, act_dim) actions, one step per action, yielding each step's ``step`` result.

        The same transitions as T calls of ``step`` (an env that finishes runs the rest of its actions
        in its next episode). Here each step runs when the caller asks for it, so a caller may stop
        early and results may alias buffers the next step reuses; backends whose steps cost a round
        trip (robosuite's worker processes) run the whole chunk in one.
        """
        for j in range(actions.shape[1]):
            yield self.step(actions[:, j])

    def render(self, index: int = 0) -> Any:
        """An RGB frame of env ``index`` (backends that can render)."""
        raise NotImplementedError(f"{type(self).__name__} cannot render")

    def close(self) -> None:
        pass

    def __enter__(self) -> "BatchedEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
