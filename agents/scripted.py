"""Scripted demonstrations of PointReach, in our dataset layout.

The robosuite tasks' scripted experts live with their tasks (``Task.expert``, e.g.
:mod:`flowrl.envs.tasks.lift`); ``flowrl collect scripted --task T`` runs them.
"""

from __future__ import annotations

import numpy as np
import torch


def write_demonstrations(path: str, episodes: int = 64, seed: int = 0, noise: float = 0.05) -> None:
    """Scripted demonstrations of PointReach (slow, slightly noisy) in our dataset layout."""
    from flowrl.datasets import Episodes, write_dataset
    from flowrl.envs.tasks.point_reach import HORIZON, PointReachEnv, scripted_action

    env = PointReachEnv(episodes, seed=seed)
    obs = env.reset()
    gen = torch.Generator().manual_seed(seed)
    keys = ("observations", "actions", "rewards", "terminated", "truncated")
    steps: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for _ in range(HORIZON):
        action = (scripted_action(obs) + noise * torch.randn(obs.shape[0], 2, generator=gen, dtype=torch.float64))
        action = action.clamp(-1.0, 1.0).float()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for k, v in zip(keys, (obs, action, reward, terminated, truncated)):
            steps[k].append(v.numpy())
        obs = next_obs
    eps = [{k: np.stack(v)[:, i] for k, v in steps.items()} for i in range(episodes)]
    write_dataset(path, Episodes.from_list(eps, {"task": "PointReach", "policy": {"kind": "scripted", "speed": 0.4,
                                                                              "noise": noise}}))
