"""Rolling a chunked policy out in batched envs, and evaluating it.

Shared by evaluation, demonstration collection and fine-tuning: an observation history per env
(filled with the first observation at every episode start, as the chunked datasets are), action
chunks executed open loop for ``act_steps`` env steps.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowrl.envs import BatchedEnv, is_robosuite, make
from flowrl.errors import FlowrlError


class ObsHistory:
    """The last ``length`` observations of every env, (N, length, obs_dim)."""

    def __init__(self, first_obs: torch.Tensor, length: int) -> None:
        self.buffer = first_obs.unsqueeze(1).repeat(1, length, 1)

    def push(self, obs: torch.Tensor, new_episode: torch.Tensor) -> None:
        """Append ``obs``; envs that just started a new episode forget their old history."""
        self.buffer = torch.cat([self.buffer[:, 1:], obs.unsqueeze(1)], dim=1)
        if new_episode.any():
            self.buffer[new_episode] = obs[new_episode].unsqueeze(1).expand(-1, self.buffer.shape[1], -1)

    def get(self) -> torch.Tensor:
        return self.buffer


ChunkFn = Callable[[torch.Tensor], torch.Tensor]
"""(N, obs_history, obs_dim) observations -> (N, >=act_steps, act_dim) env-unit actions."""


def run_episodes(env: BatchedEnv, choose_chunk: ChunkFn, obs_history: int, act_steps: int, seed: int,
                 on_step: Callable[[dict[str, Any]], torch.Tensor | None] | None = None) -> dict[str, np.ndarray]:
    """Run exactly one episode in each env of ``env`` (env i seeded ``seed + i``).

    Every env's first episode counts, whatever its length, so statistics are not biased towards
    short episodes. ``on_step`` sees each transition (for recording demonstrations); it may return
    a bool mask of envs whose episode it ends there (demonstrations cut after success).
    """
    n = env.num_envs
    obs = env.reset(seed=seed)
    history = ObsHistory(obs, obs_history)
    active = torch.ones(n, dtype=torch.bool, device=obs.device)
    returns = torch.zeros(n, dtype=torch.float64, device=obs.device)
    lengths = torch.zeros(n, dtype=torch.int64, device=obs.device)
    success = torch.zeros(n, dtype=torch.bool, device=obs.device)
    while active.any():
        chunk = choose_chunk(history.get())[:, :act_steps]
        for action, (next_obs, reward, terminated, truncated, info) in zip(chunk.unbind(1), env.step_chunk(chunk)):
            ended = None
            if on_step is not None:
                ended = on_step({"obs": obs, "action": action, "reward": reward, "terminated": terminated,
                                 "truncated": truncated, "active": active.clone(), "success": info.get("success")})
            returns += torch.where(active, reward.double(), 0.0)
            lengths += active.long()
            if "success" in info:
                success |= active & info["success"]
            done = info["done_mask"] if ended is None else info["done_mask"] | ended
            active &= ~done
            history.push(next_obs, done)
            obs = next_obs
            if not active.any():
                break
    return {"returns": returns.cpu().numpy(), "lengths": lengths.cpu().numpy(),
            "success": success.cpu().numpy(), "has_success": np.array("success" in info)}


class Evaluator:
    """Evaluates policies on one task and keeps its envs between calls: robosuite's envs are worker
    processes that take seconds each to start, so periodic evaluations during training reuse them.
    ``close()`` releases them."""

    def __init__(self, task: str, seed: int = 100000, backend: str = "auto", max_envs: int = 64,
                 device: str | torch.device = "cpu", end_on_success: bool = False) -> None:
        """``max_envs=0`` picks a default: 64, and for robosuite (a worker process per env) the
        number of CPU cores."""
        if max_envs == 0:
            max_envs = (os.cpu_count() or 1) if is_robosuite(task) else 64
        if max_envs < 1:
            raise FlowrlError(f"max_envs must be >= 1 (or 0 for the default), got {max_envs}")
        self.task, self.seed, self.backend, self.max_envs = task, seed, backend, max_envs
        self.device, self.end_on_success = device, end_on_success
        self._env: BatchedEnv | None = None

    @classmethod
    def from_config(cls, task: str, cfg: Any, device: str | torch.device) -> "Evaluator":
        """From a config's ``eval`` section (:class:`flowrl.config.EvalConfig`)."""
        return cls(task, cfg.seed, cfg.backend, cfg.max_envs, device, cfg.end_on_success)

    def _envs(self, n: int) -> BatchedEnv:
        if self._env is not None and self._env.num_envs != n:
            self.close()
        if self._env is None:
            self._env = make(self.task, n, backend=self.backend, device=self.device)
        return self._env

    def __call__(self, policy: Any, num_steps: int, episodes: int = 10) -> dict[str, float]:
        """Mean and std of return and length (and success rate where the task defines it) of the
        deterministic policy with K = ``num_steps``, over ``episodes`` seeded episodes."""
        n = min(episodes, self.max_envs)
        env = self._envs(n)
        gen = torch.Generator(device=policy.obs_mean.device).manual_seed(self.seed)
        on_step = (lambda step: step["success"]) if self.end_on_success else None
        start = time.time()
        results = [run_episodes(env, lambda o: policy.predict(o, num_steps=num_steps, generator=gen),
                                policy.cfg.obs_history, policy.cfg.act_steps, seed=self.seed + r * n, on_step=on_step)
                   for r in range(math.ceil(episodes / n))]
        rets = np.concatenate([r["returns"] for r in results])[:episodes]
        lens = np.concatenate([r["lengths"] for r in results])[:episodes]
        out = {"num_steps": num_steps, "episodes": episodes,
               "return_mean": float(rets.mean()), "return_std": float(rets.std()),
               "length_mean": float(lens.mean()), "length_std": float(lens.std()),
               "wall_clock_s": round(time.time() - start, 2)}
        if bool(results[0]["has_success"]):
            out["success_rate"] = float(np.concatenate([r["success"] for r in results])[:episodes].mean())
        return out

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def evaluate(policy: Any, task: str, num_steps: int, episodes: int = 10, seed: int = 100000,
             backend: str = "auto", max_envs: int = 64, device: str | torch.device = "cpu",
             end_on_success: bool = False) -> dict[str, float]:
    """One evaluation with envs made for it and closed after (see :class:`Evaluator`).

    ``end_on_success`` ends each episode at its first success, as robomimic's rollouts do
    (``terminate_on_success``): the success rate is the same, evaluation is faster, and return and
    length then count the steps up to the success."""
    evaluator = Evaluator(task, seed, backend, max_envs, device, end_on_success)
    try:
        return evaluator(policy, num_steps, episodes)
    finally:
        evaluator.close()


def record_video(policy: Any, task: str, num_steps: int, path: str | Path, seed: int = 100000,
                 fps: int | None = None) -> Path:
    """One rendered episode of the deterministic policy, written to ``path`` as mp4."""
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise FlowrlError("--video needs the video extra: pip install 'flowrl[video]'") from None
    if "DISPLAY" not in os.environ:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless: EGL (GPU, or Mesa's software EGL)
    env = make(task, 1, backend="gymnasium", render=True)
    gen = torch.Generator(device=policy.obs_mean.device).manual_seed(seed)
    frames: list[np.ndarray] = []
    try:
        run_episodes(env, lambda o: policy.predict(o, num_steps=num_steps, generator=gen),
                     policy.cfg.obs_history, policy.cfg.act_steps, seed=seed,
                     on_step=lambda _: frames.append(env.render(0)))
    except Exception as e:
        if "GL" in type(e).__name__ or "gl" in str(e).lower() or "display" in str(e).lower():
            raise FlowrlError(f"cannot render {task}: no OpenGL context ({str(e).splitlines()[0]}); "
                              "set MUJOCO_GL=egl (GPU) or MUJOCO_GL=osmesa (apt install libosmesa6)") from None
        raise
    finally:
        env.close()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fps = fps or 30
    from flowrl.io import write_atomic

    write_atomic(path, lambda p: imageio.mimwrite(p, frames, fps=fps, format="FFMPEG"))
    return path
