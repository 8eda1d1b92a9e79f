"""Rolling a chunk policy out in batched envs: observation histories and whole episodes.

A chunk policy is anything that maps an observation history and (optionally) its initial noise to
an action chunk in env units (:class:`ChunkPolicy`): a flow policy at a fixed K
(:class:`FlowChunkPolicy`), an expert, the deploy runtime, an exported model. Evaluation,
demonstration collection and fine-tuning all step envs through :meth:`BatchedEnv.step_chunk`, so an
episode that ends inside a chunk starts its successor from the reset state at the chunk boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from flowrl.envs import BatchedEnv, ChunkResult
from flowrl.policy import FlowPolicy, require_state_only


class ObsHistory:
    """The last ``length`` observations of every env, (N, length, obs_dim); a new episode's history
    is its first observation repeated (as the chunked datasets pad it)."""

    def __init__(self, first_obs: torch.Tensor, length: int) -> None:
        self.buffer = first_obs.unsqueeze(1).repeat(1, length, 1)

    def push(self, obs: torch.Tensor, new_episode: torch.Tensor) -> None:
        """Append ``obs``; envs that just started a new episode forget their old history."""
        self.buffer = torch.cat([self.buffer[:, 1:], obs.unsqueeze(1).to(self.buffer.dtype)], dim=1)
        if bool(new_episode.any()):
            fresh = obs.unsqueeze(1).to(self.buffer.dtype).expand(-1, self.buffer.shape[1], -1)
            self.buffer = torch.where(new_episode.view(-1, 1, 1), fresh, self.buffer)

    def push_chunk(self, result: ChunkResult) -> torch.Tensor:
        """Take in the observations of a chunk (``result.step_obs`` is needed for histories longer
        than one). Returns every env's history at its last observation of the chunk (the final one of
        an episode that ended: what a truncated episode is bootstrapped from); envs whose episode
        ended start their next with ``result.obs``."""
        if self.buffer.shape[1] == 1:
            final = result.final_obs.unsqueeze(1).to(self.buffer.dtype)
        else:
            if result.step_obs is None:
                raise ValueError("histories longer than one observation need step_chunk(..., record_obs=True)")
            final = self.buffer
            for j in range(result.step_obs.shape[1]):
                pushed = torch.cat([final[:, 1:], result.step_obs[:, j:j + 1].to(final.dtype)], dim=1)
                final = torch.where(result.valid[:, j].view(-1, 1, 1), pushed, final)
        done = result.done.view(-1, 1, 1)
        fresh = result.obs.unsqueeze(1).to(self.buffer.dtype).expand(-1, self.buffer.shape[1], -1)
        self.buffer = torch.where(done, fresh, final)
        return final

    def get(self) -> torch.Tensor:
        return self.buffer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"buffer": self.buffer.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.buffer = state["buffer"].to(self.buffer.device, self.buffer.dtype)


@runtime_checkable
class ChunkPolicy(Protocol):
    """Observation history + initial noise -> action chunk."""

    obs_history: int
    """How many past observations it reads (the current one included)."""
    act_steps: int
    """How many actions of each chunk are executed before it is asked again."""

    def act_chunk(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(N, obs_history, obs_dim) observations -> (N, >= act_steps, act_dim) env-unit actions; without
        ``noise`` the policy draws its own."""
        ...


@dataclass
class FlowChunkPolicy:
    """A flow policy's deterministic sampler at K Euler steps, as a :class:`ChunkPolicy`; initial noise
    is drawn from ``generator`` when not given."""

    policy: FlowPolicy
    num_steps: int
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        require_state_only(self.policy, "rolling the policy out")

    @property
    def obs_history(self) -> int:
        return self.policy.cfg.obs_history

    @property
    def act_steps(self) -> int:
        return self.policy.cfg.act_steps

    def act_chunk(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.policy.predict(obs, self.num_steps, noise, self.generator)


ChunkCallback = Callable[[torch.Tensor, torch.Tensor, ChunkResult, torch.Tensor], "torch.Tensor | None"]
"""``(obs at the chunk start (N, obs_dim), executed actions (N, T, act_dim), result, active (N,))``;
may return an (N, T) bool mask of steps after which the caller ends the episode (e.g. a
demonstration cut some steps after its success)."""


def run_episodes(env: BatchedEnv, policy: ChunkPolicy, seed: int, on_chunk: ChunkCallback | None = None,
                 record_obs: bool = False) -> dict[str, np.ndarray]:
    """Run exactly one episode in each env of ``env`` (env i seeded ``seed + i``).

    Every env's first episode counts, whatever its length, so statistics are not biased towards
    short episodes. Returns per-env ``returns``, ``lengths``, ``success`` and ``has_success``.
    """
    n = env.num_envs
    obs = env.reset(seed=seed)
    history = ObsHistory(obs, policy.obs_history)
    dev = obs.device
    active = torch.ones(n, dtype=torch.bool, device=dev)
    returns = torch.zeros(n, dtype=torch.float64, device=dev)
    lengths = torch.zeros(n, dtype=torch.int64, device=dev)
    success = torch.zeros(n, dtype=torch.bool, device=dev)
    has_success = False
    while bool(active.any()):
        chunk = policy.act_chunk(history.get())[:, :policy.act_steps]
        result = env.step_chunk(chunk, record_obs=record_obs or policy.obs_history > 1)
        valid = result.valid & active.unsqueeze(1)
        ended = None
        if on_chunk is not None:
            ended = on_chunk(obs, chunk, result, active.clone())
        if ended is not None:
            ended = ended.to(dev) & valid
            valid &= (ended.long().cumsum(1) - ended.long()) == 0  # steps up to the first end
        returns += (result.rewards * valid).sum(1)
        lengths += valid.sum(1)
        if result.success is not None:
            has_success = True
            success |= (result.success & valid).any(1)
        done = result.done if ended is None else result.done | ended.any(1)
        active &= ~done
        history.push_chunk(result)
        obs = result.obs
    return {"returns": returns.cpu().numpy(), "lengths": lengths.cpu().numpy(),
            "success": success.cpu().numpy(), "has_success": np.array(has_success)}
