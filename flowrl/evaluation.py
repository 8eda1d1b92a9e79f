"""Evaluating policies: seeded episodes of the deterministic policy in batched envs.

Built on :mod:`flowrl.rollout`. Evaluation seeds (``EVAL_SEED`` by default) are disjoint from the
seeds training uses, so an evaluation is never a replay of what the policy was trained on.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch

from flowrl.config import EVAL_SEED, renamed_argument
from flowrl.envs import BatchedEnv, is_robosuite, make, resolve_backend, resolve_task
from flowrl.errors import FlowrlError
from flowrl.policy import FlowPolicy
from flowrl.rollout import ChunkPolicy, FlowChunkPolicy, run_episodes

CPU_EVAL_MAX_ENVS = 256
"""Up to this many envs, ``backend="auto"`` evaluates MuJoCo tasks on the cpu backend (:meth:`Evaluator.backend_for`)."""

SELECTION_SEED = 900000
"""Seeds of the periodic evaluations during training, which choose the ``best`` checkpoint: disjoint
from ``EVAL_SEED``'s (for fewer than 800000 episodes), so evaluating ``best`` is not optimistic."""


class Evaluator:
    """Evaluates policies on one task and keeps its envs between calls: robosuite's envs are worker
    processes that take seconds each to start, so periodic evaluations during training reuse them.
    ``close()`` releases them."""

    def __init__(self, task: str, seed: int = EVAL_SEED, backend: str = "auto", max_envs: int = 0,
                 device: str | torch.device = "cpu", end_on_success: bool = False, threads: int = 0) -> None:
        """``max_envs=0`` picks a default: 64, and for robosuite (a worker process per env) the
        number of CPU cores. ``threads``: the cpu backend's threads (0: every core)."""
        if max_envs == 0:
            max_envs = (os.cpu_count() or 1) if is_robosuite(task) else 64
        if max_envs < 1:
            raise FlowrlError(f"max_envs must be >= 1 (or 0 for the default), got {max_envs}")
        self.task, self.seed, self.backend, self.max_envs = task, seed, backend, max_envs
        self.device, self.end_on_success, self.threads = device, end_on_success, threads
        self._env: BatchedEnv | None = None
        self._env_images = False
        self._env_backend = ""
        """The backend the envs run on (``auto`` resolved), recorded with every evaluation."""

    @classmethod
    def from_config(cls, task: str, cfg: Any, device: str | torch.device) -> "Evaluator":
        """From a config's ``eval`` section (:class:`flowrl.config.EvalConfig`)."""
        return cls(task, cfg.seed, cfg.backend, cfg.max_envs, device, cfg.end_on_success)

    def backend_for(self, n: int, images: bool = False) -> str:
        """The backend of ``n`` evaluation envs: the one asked for, except that ``auto`` evaluates a MuJoCo task
        (not a robosuite scene, not a pixel policy) on the cpu backend's threads whenever there are at most
        :data:`CPU_EVAL_MAX_ENVS` envs, also beside a GPU. A GPU simulator steps a few envs no faster than
        thousands (each physics step is a fixed chain of kernel launches), while a handful of episodes on
        CPU threads take a fraction of that time."""
        if self.backend != "auto" or images or n > CPU_EVAL_MAX_ENVS:
            return self.backend
        try:
            runs_on_cpu = not is_robosuite(self.task) and "cpu" in resolve_task(self.task).backends
        except FlowrlError:  # not a registered task (an env made by hand): make decides
            return self.backend
        return "cpu" if runs_on_cpu else self.backend

    def _envs(self, n: int, images: bool = False) -> BatchedEnv:
        if self._env is not None and (self._env.num_envs != n or self._env_images != images):
            self.close()
        if self._env is None:
            backend = self.backend_for(n, images)
            threads = {"threads": self.threads} if self.threads else {}
            self._env = make(self.task, n, backend=backend, device=self.device, images=images, **threads)
            self._env_images = images
            self._env_backend = backend
            if backend == "auto":
                try:
                    self._env_backend = resolve_backend(self.task, backend, self.device, images)
                except FlowrlError:  # an env made by hand, not a registered task: make chose
                    pass
        return self._env

    def __call__(self, policy: FlowPolicy, k: int | None = None, episodes: int = 10,
                 seed: int | None = None, per_episode: bool = False, *,
                 num_steps: int | None = None) -> dict[str, Any]:
        """Mean, std, lowest and highest return, mean and std of length (and success rate where the task
        defines it) of the deterministic flow policy with K = ``k``, over ``episodes`` seeded episodes.
        ``num_steps`` is the old name of ``k``."""
        k = renamed_argument("Evaluator.__call__", "num_steps", "k", num_steps, k, required=True)
        seed = self.seed if seed is None else seed
        gen = torch.Generator(device=policy.obs_mean.device).manual_seed(seed)
        return {"k": k, **self.run(FlowChunkPolicy(policy, k, gen), episodes, seed, per_episode)}

    def run(self, policy: ChunkPolicy, episodes: int = 10, seed: int | None = None,
            per_episode: bool = False) -> dict[str, Any]:
        """The same statistics for any :class:`ChunkPolicy` (an expert, an exported model); ``seed``
        replaces the evaluator's own for this call (the same envs serve both). With ``per_episode``
        also each episode's return, length and success (``episode_*`` lists; episode i's env was
        seeded ``seed + i``), to find and replay the episodes a policy fails."""
        seed = self.seed if seed is None else seed
        n = min(episodes, self.max_envs)
        env = self._envs(n, images=bool(getattr(policy, "cameras", ())))
        on_chunk = (lambda obs, chunk, result, active: result.success) if self.end_on_success else None
        start = time.time()
        results = [run_episodes(env, policy, seed=seed + r * n, on_chunk=on_chunk)
                   for r in range(math.ceil(episodes / n))]
        rets = np.concatenate([r["returns"] for r in results])[:episodes]
        lens = np.concatenate([r["lengths"] for r in results])[:episodes]
        out = {"episodes": episodes, "seed": seed, "backend": self._env_backend,
               "return_mean": float(rets.mean()), "return_std": float(rets.std()),
               "return_min": float(rets.min()), "return_max": float(rets.max()),
               "length_mean": float(lens.mean()), "length_std": float(lens.std()),
               "wall_clock_s": round(time.time() - start, 2)}
        if per_episode:
            out.update(episode_returns=rets.tolist(), episode_lengths=lens.tolist())
        if bool(results[0]["has_success"]):
            success = np.concatenate([r["success"] for r in results])[:episodes]
            out["success_rate"] = float(success.mean())
            if per_episode:
                out["episode_success"] = success.tolist()
        return out

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def evaluate(policy: FlowPolicy, task: str, k: int | None = None, episodes: int = 10, seed: int = EVAL_SEED,
             backend: str = "auto", max_envs: int = 0, device: str | torch.device = "cpu",
             end_on_success: bool = False, *, num_steps: int | None = None) -> dict[str, float]:
    """One evaluation of ``policy`` at K = ``k`` with envs made for it and closed after (see
    :class:`Evaluator`). ``num_steps`` is the old name of ``k``.

    ``end_on_success`` ends each episode at its first success, as robomimic's rollouts do
    (``terminate_on_success``): the success rate is the same, evaluation is faster, and return and
    length then count the steps up to the success."""
    k = renamed_argument("evaluate", "num_steps", "k", num_steps, k, required=True)
    evaluator = Evaluator(task, seed, backend, max_envs, device, end_on_success)
    try:
        return evaluator(policy, k, episodes)
    finally:
        evaluator.close()
