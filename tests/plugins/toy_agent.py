"""Two algorithms defined in one file outside flowrl, each registered with one line.

``toy-bc`` (pretraining): plain flow matching, nothing else. ``toy-hold`` (fine-tuning): keeps the
pretrained policy and only counts iterations; enough to run through the loop, checkpoints and eval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowrl.checkpoint import load_policy
from flowrl.config import LoopConfig, check_positive, resolve_device
from flowrl.datasets import ChunkDataset, read_dataset
from flowrl.envs import canonical_task
from flowrl.policy import FlowPolicy
from flowrl.registry import register_agent
from flowrl.training import Agent


@dataclass
class ToyBCConfig(LoopConfig):
    steps: int = 50
    """Gradient steps."""
    lr: float = 1e-3
    """Adam learning rate."""

    def validate(self, prefix: str = "train.") -> None:
        super().validate(prefix)
        check_positive(self, prefix, "steps", "lr")


class ToyBC(Agent):
    algo, stage = "toy-bc", "pretrain"

    def __init__(self, cfg: Any) -> None:
        self.cfg, self.task, self.device = cfg, canonical_task(cfg.task), resolve_device(cfg.device)
        episodes = read_dataset(cfg.data.path)
        self.data = ChunkDataset(episodes, cfg.policy.obs_history, cfg.policy.horizon)
        torch.manual_seed(cfg.seed)
        self.model = FlowPolicy(cfg.policy, 1, 1)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.iterations = cfg.train.steps

    @property
    def policy(self) -> FlowPolicy:
        return self.model

    def train_iteration(self, iteration: int) -> dict[str, float]:
        obs, actions = self.data.batch(torch.randint(0, len(self.data), (64,), generator=self.gen))
        x1 = self.model.normalize_action(actions)
        x0 = torch.randn(x1.shape, generator=self.gen)
        t = torch.rand(len(x1), generator=self.gen)
        x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * x1
        loss = (self.model.velocity(t, x_t, self.model.encode(obs)) - (x1 - x0)).square().mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"train/loss": loss.item()}

    def state_components(self) -> dict[str, Any]:
        return {"model": self.model, "opt": self.opt, "gen": self.gen}


@dataclass
class ToyHoldConfig(LoopConfig):
    iterations: int = 3
    """Iterations that change nothing."""


class ToyHold(Agent):
    algo, stage = "toy-hold", "finetune"
    evaluate_at_start = True

    def __init__(self, cfg: Any) -> None:
        self.cfg, self.device = cfg, resolve_device(cfg.device)
        self.model, init = load_policy(cfg.init)
        self.task = canonical_task(cfg.task or init["task"])
        self.iterations = cfg.train.iterations

    @property
    def policy(self) -> FlowPolicy:
        return self.model

    def train_iteration(self, iteration: int) -> dict[str, float]:
        return {"train/held": float(iteration)}

    def state_components(self) -> dict[str, Any]:
        return {"model": self.model}


register_agent("toy-bc", "pretrain", ToyBC, ToyBCConfig, "flow matching, nothing else")
register_agent("toy-hold", "finetune", ToyHold, ToyHoldConfig, "keeps the pretrained policy")
