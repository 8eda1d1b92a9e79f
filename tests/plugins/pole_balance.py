"""A MuJoCo task defined in one file outside flowrl: balance a pole on a cart.

Importing this module registers the task; nothing in flowrl is edited to add it. It runs on the cpu and
warp backends (and through gymnasium's and SB3's adapters), trains, evaluates, exports and renders like
a built-in task. docs/adding-a-task.md walks through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gymnasium
import torch

from flowrl.envs import MujocoTask, register

MODEL = os.path.join(os.path.dirname(gymnasium.__file__), "envs", "mujoco", "assets", "inverted_pendulum.xml")
"""gymnasium's inverted pendulum: a slider (the cart, qpos[0]) and a hinge (the pole, qpos[1]), one motor."""


class PoleBalanceExpert:
    """The scripted expert: a linear feedback on the pole's angle, the cart's position and their velocities.
    A :class:`flowrl.rollout.ChunkPolicy` of one-action chunks, stateless (``reset`` has nothing to forget)."""

    obs_history = 1
    act_steps = 1
    gains = torch.tensor([0.5, 10.0, 1.0, 2.0], dtype=torch.float64)  # x, angle, x velocity, angle velocity

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs

    def reset(self, mask: object = None) -> None:
        pass

    def act_chunk(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 1, 4) observation histories -> (N, 1, 1) actions in [-3, 3]."""
        push = obs[:, -1].double() @ self.gains
        return push.clamp(-3.0, 3.0).float().reshape(-1, 1, 1)


@dataclass(frozen=True, kw_only=True, eq=False)
class PoleBalance(MujocoTask):
    """Keep the pole upright: reward 1 per step; the episode ends when it tilts past 0.2 rad. The model, frame
    skip, reset noise and action bounds (the motor's ctrlrange) are MujocoTask's; these are the terms."""

    def observation(self, s: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([s["qpos"], s["qvel"]], dim=1)

    def reward_and_termination(self, s, before, after, dt, action):
        return torch.ones_like(after, dtype=torch.float64), s["qpos"][:, 1].abs() > 0.2


register(PoleBalance(name="PoleBalance", model=MODEL, frame_skip=2, reset_noise_scale=0.01, max_episode_steps=200,
                 obs_layout=(("qpos (cart, pole angle)", 2), ("qvel", 2)), act_dim=1, backends=("cpu", "warp"),
                 expert=PoleBalanceExpert, description="balance a pole on a cart (a plugin's task)"))
