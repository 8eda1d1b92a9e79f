"""Behaviour cloning of a flow policy on demonstration chunks.

Rectified flow: ``x_t = (1 - t) x0 + t x1`` with x0 ~ N(0, I) and x1 the (normalised) action
chunk; the network regresses the constant velocity ``x1 - x0``.

Shortcut (Frans et al. 2024): the network also sees the step size d. Flow-matching rows use the
finest d; self-consistency rows (``shortcut_fraction`` of the batch) pick a step 2d from powers of
two and t on the 2d grid, and regress the mean velocity of two d-steps of the EMA network, so a
single step of 2d lands where two steps of d would.

MeanFlow (``policy.head=meanflow``; SplitMeanFlow, Guo et al. 2025): the network also sees an interval
length d and learns the average velocity over [t, t + d]. Flow-matching rows use d = 0 (the
instantaneous velocity: the boundary condition); interval rows (``shortcut_fraction`` of the batch)
draw d uniform in (0, 1], t uniform in [0, 1 - d] and a split point inside the interval, and regress
the EMA network's velocities over the two parts, weighted by their lengths (the algebraic
interval-splitting identity; no Jacobian-vector product), so one step over [0, 1] lands where the flow
does.

AdamW with linear warm-up then cosine decay; an EMA of the weights is evaluated and saved.
Training is exactly resumable: the batch sampler draws from one ``torch.Generator`` whose state is
part of the training state with the optimiser and the schedule.

On a GPU a gradient step of a small MLP is microseconds of work behind a hundred kernel launches, so
(``train.cuda_graph``) the step's forward, backward and gradient clipping are captured once as a CUDA
graph and replayed; the random draws are made before it, in the same order from the same generator, into
the buffers the graph reads, and the fused optimiser and the EMA run after it. Nothing reads a value back
to the host inside the loop: the logged scalars stay tensors until the training loop writes them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flowrl import distributed
from flowrl.config import (LoopConfig, PretrainConfig, check_fraction, check_non_negative, check_positive, fail,
                           setup_torch)
from flowrl.cuda_graph import (StepGraph, device_learning_rates, fused_if_cuda, graphs_usable,
                               keep_device_flags, tf32_matmuls)
from flowrl.datasets import ChunkDataset, Episodes, read_dataset
from flowrl.envs import canonical_task, make
from flowrl.errors import FlowrlError
from flowrl.policy import FlowPolicy, shortcut_target, split_interval_target
from flowrl.training import Agent


@dataclass
class BCConfig(LoopConfig):
    """Behaviour cloning (``algo: bc``); its iterations are gradient steps."""

    steps: int = 20000
    """Gradient steps in total."""
    batch_size: int = 256
    """Samples (observation history, action chunk) per gradient step."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays the learning rate to lr * min_lr_ratio."""
    warmup_steps: int = 200
    """Linear learning-rate warm-up at the start."""
    weight_decay: float = 1e-6
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0: off)."""
    ema_decay: float = 0.995
    """Decay of the exponential moving average of the weights; the EMA weights are what is evaluated and saved."""
    time_sampling: str = "uniform"
    """Distribution of flow time t in [0, 1] for flow-matching rows: uniform or logit_normal."""
    shortcut_fraction: float = 0.25
    """Shortcut and meanflow heads: fraction of each batch used for self-consistency rows (shortcut: one step of 2d
    against two of d; meanflow: an interval against its two parts)."""
    log_every: int = 100
    """Write TensorBoard scalars every N gradient steps."""
    checkpoint_every: int = 5000
    """Save a checkpoint every N steps (and always at the end)."""
    eval_every: int = 5000
    """Evaluate in simulation every N steps (0: only at the end)."""
    eval_episodes: int = 5
    """Episodes of each periodic evaluation during training (their seeds are disjoint from `flowrl eval`'s)."""
    cuda_graph: bool = True
    """On a CUDA device, capture each whole gradient step (draws, forward, backward, AdamW, EMA) as one CUDA graph
    and replay it (state-only policies in one process; the same draws and arithmetic, launched at once)."""
    tf32: bool = True
    """On a CUDA device, the gradient step's matrix products in TensorFloat-32 (10-bit mantissa inputs, float32
    sums; several times the float32 rate on tensor cores); evaluations stay in float32."""
    compile: bool = False
    """Compile the loss's forward and backward with ``torch.compile`` (TorchInductor): the elementwise work of
    the activations and the loss is fused into a few kernels, so a step launches fewer of them. The first
    step pays the compilation (tens of seconds); same arithmetic up to floating-point reassociation."""

    def validate(self, prefix: str = "train.") -> None:
        super().validate(prefix)
        check_positive(self, prefix, "steps", "batch_size", "lr")
        check_non_negative(self, prefix, "warmup_steps", "grad_clip", "weight_decay")
        check_fraction(self, prefix, "min_lr_ratio")
        if not 0 <= self.ema_decay < 1:
            fail(f"{prefix}ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.time_sampling not in ("uniform", "logit_normal"):
            fail(f"{prefix}time_sampling", f"must be uniform or logit_normal, got '{self.time_sampling}'")
        if not 0 < self.shortcut_fraction < 1:
            fail(f"{prefix}shortcut_fraction", f"must be in (0, 1), got {self.shortcut_fraction}")




def check_dataset_matches_task(episodes: Episodes, task: str, path: str) -> tuple[Any, Any]:
    """The dataset's dims must be the task's; returns the task's action bounds."""
    env = make(task, 1, backend="cpu")  # runs every MuJoCo task, Humanoid-Newton too (robosuite ignores it)
    try:
        space = env.single_action_space
        if episodes.obs_dim != env.obs_dim:
            raise FlowrlError(f"{path}: observations have {episodes.obs_dim} dims but task "
                              f"{env.task} has {env.obs_dim}")
        if episodes.act_dim != env.act_dim:
            raise FlowrlError(f"{path}: actions have {episodes.act_dim} dims but task {env.task} has {env.act_dim}")
        return space.low, space.high
    finally:
        env.close()


def sample_time(n: int, scheme: str, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen, device=device))
    return torch.rand(n, generator=gen, device=device)


def draw_flow_matching(shape: tuple[int, ...], gen: torch.Generator, device: torch.device,
                       time_sampling: str = "uniform") -> dict[str, torch.Tensor]:
    """The random draws of :func:`flow_matching_loss` for chunks of ``shape``: noise ``x0``, then times ``t``."""
    x0 = torch.randn(shape, generator=gen, device=device)
    return {"x0": x0, "t": sample_time(shape[0], time_sampling, gen, device)}


def flow_matching_loss(policy: FlowPolicy, cond: torch.Tensor, x1: torch.Tensor, gen: torch.Generator | None = None,
                       time_sampling: str = "uniform", draws: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Rectified-flow regression of ``x1 - x0`` at a random point of the straight path (``draws`` from
    :func:`draw_flow_matching`, or drawn here from ``gen``)."""
    if draws is None:
        assert gen is not None
        draws = draw_flow_matching(tuple(x1.shape), gen, x1.device, time_sampling)
    x0, t = draws["x0"], draws["t"]
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * x1
    return F.mse_loss(policy.velocity(t, x_t, cond, policy.flow_matching_step(t)), x1 - x0)


def draw_shortcut(shape: tuple[int, ...], levels: int, gen: torch.Generator, device: torch.device
                  ) -> dict[str, torch.Tensor]:
    """The random draws of :func:`shortcut_consistency_loss`: step levels ``j``, grid positions ``u``, noise ``x0``."""
    n = shape[0]
    j = torch.randint(0, levels, (n,), generator=gen, device=device)
    u = torch.rand(n, generator=gen, device=device)
    return {"j": j, "u": u, "x0": torch.randn(shape, generator=gen, device=device)}


def shortcut_consistency_loss(policy: FlowPolicy, ema: FlowPolicy, cond: torch.Tensor, ema_cond: torch.Tensor,
                              x1: torch.Tensor, gen: torch.Generator | None = None,
                              draws: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One step of 2d must match two EMA steps of d (targets without gradient)."""
    levels = int(math.log2(policy.cfg.max_shortcut_steps))
    if draws is None:
        assert gen is not None
        draws = draw_shortcut(tuple(x1.shape), levels, gen, x1.device)
    j, x0 = draws["j"], draws["x0"]  # 2d = 2^-j, d = 2^-(j+1)
    big = torch.pow(2.0, -j.float())
    t = torch.floor(draws["u"] * torch.pow(2.0, j.float())) * big
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * x1
    with torch.no_grad():
        target = shortcut_target(lambda tt, xx, dd: ema.velocity(tt, xx, ema_cond, dd), x_t, t, big / 2)
    return F.mse_loss(policy.velocity(t, x_t, cond, big), target)


def draw_interval(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The random draws of :func:`interval_consistency_loss`: interval lengths ``d`` in (0, 1], start times
    ``t`` uniform in [0, 1 - d], split points ``split`` in [0, 1), noise ``x0``."""
    n = shape[0]
    d = 1.0 - torch.rand(n, generator=gen, device=device)
    t = torch.rand(n, generator=gen, device=device) * (1.0 - d)
    split = torch.rand(n, generator=gen, device=device)
    return {"d": d, "t": t, "split": split, "x0": torch.randn(shape, generator=gen, device=device)}


def interval_consistency_loss(policy: FlowPolicy, ema: FlowPolicy, cond: torch.Tensor, ema_cond: torch.Tensor,
                              x1: torch.Tensor, gen: torch.Generator | None = None,
                              draws: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The average velocity over [t, t + d] must match the EMA's over its two parts (targets without gradient)."""
    if draws is None:
        assert gen is not None
        draws = draw_interval(tuple(x1.shape), gen, x1.device)
    t, d = draws["t"], draws["d"]
    x_t = (1 - t.view(-1, 1, 1)) * draws["x0"] + t.view(-1, 1, 1) * x1
    with torch.no_grad():
        target = split_interval_target(lambda tt, xx, dd: ema.velocity(tt, xx, ema_cond, dd), x_t, t, d,
                                       draws["split"])
    return F.mse_loss(policy.velocity(t, x_t, cond, d), target)


class BehaviorCloning(Agent):
    """Pretrain a flow policy on demonstrations (``algo: bc``); run it with :class:`flowrl.training.Trainer`."""

    algo, stage = "bc", "pretrain"
    supports_distributed = True

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.task = canonical_task(cfg.task)
        self.device = setup_torch(cfg)
        self.dist = distributed.current()
        self.rank_batch = self.dist.share(cfg.train.batch_size, "train.batch_size")
        episodes = read_dataset(cfg.data.path, cameras=list(cfg.policy.cameras)).head(cfg.data.max_episodes)
        low, high = check_dataset_matches_task(episodes, self.task, cfg.data.path)
        self.data = ChunkDataset(episodes, cfg.policy.obs_history, cfg.policy.horizon, self.device,
                                 cameras=cfg.policy.cameras)
        self.data_info = {**episodes.info(), "path": str(cfg.data.path)}
        self.iterations = cfg.train.steps

        torch.manual_seed(cfg.seed)
        self.model = FlowPolicy(cfg.policy, episodes.obs_dim, episodes.act_dim, low, high).to(self.device)
        self.model.set_normalization(episodes.observations.mean(0), episodes.observations.std(0))
        self.dist.broadcast_module(self.model)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self._ema_params, self._model_params = list(self.ema.parameters()), list(self.model.parameters())
        graphed = cfg.train.cuda_graph and graphs_usable(self.device, self.dist.active, self.model.uses_images)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay, capturable=graphed,
                                           **fused_if_cuda(self.device))
        keep_device_flags(self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if graphed:
            device_learning_rates(self.optimizer)
        # rank r samples its share of every batch from its own shard of the chunks (r, r + W, r + 2W, ...)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1_000_003 * self.dist.rank)
        self.shard_size = (len(self.data) - self.dist.rank + self.dist.world_size - 1) // self.dist.world_size
        self.graph = StepGraph(self._gradient_step, draw=self._draw, generator=self.gen) if graphed else None
        self._loss = torch.compile(self._loss_eager) if cfg.train.compile else self._loss_eager

    @property
    def policy(self) -> FlowPolicy:
        """The EMA weights: what is evaluated and saved."""
        return self.ema

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        frac = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    def resumable_keys(self) -> tuple[str, ...]:
        return ("train.steps", "train.max_minutes")

    def checkpoint_info(self) -> dict[str, Any]:
        return {"dataset": self.data_info, "dataset_return_mean": self.data_info["return_mean"]}

    def state_components(self) -> dict[str, Any]:
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "generator": self.gen}

    def postfix(self, logs: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{logs['train/loss']:.4f}"}

    def _draw(self) -> dict[str, torch.Tensor]:
        """Every random number of one gradient step, from the one generator, in a fixed order."""
        cfg, policy, n, dev = self.cfg.train, self.model, self.rank_batch, self.device
        draws = {"idx": torch.randint(0, self.shard_size, (n,), generator=self.gen, device=dev)}
        n_fm = n - self._consistency_rows()
        fm = draw_flow_matching((n_fm, *policy.chunk_shape), self.gen, dev, cfg.time_sampling)
        draws.update({f"fm_{k}": v for k, v in fm.items()})
        if policy.is_shortcut:
            levels = int(math.log2(policy.cfg.max_shortcut_steps))
            sc = draw_shortcut((n - n_fm, *policy.chunk_shape), levels, self.gen, dev)
            draws.update({f"sc_{k}": v for k, v in sc.items()})
        elif policy.takes_step_size:
            draws.update({f"sc_{k}": v for k, v in draw_interval((n - n_fm, *policy.chunk_shape), self.gen, dev).items()})
        return draws

    def _consistency_rows(self) -> int:
        """Rows of each batch used for the shortcut's or meanflow's self-consistency (0 for rectified flow)."""
        if not self.model.takes_step_size:
            return 0
        return max(1, int(round(self.rank_batch * self.cfg.train.shortcut_fraction)))

    def _loss_eager(self, draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One batch's loss, and its parts as detached scalars for the logs."""
        policy, n = self.model, self.rank_batch
        idx = draws["idx"] * self.dist.world_size + self.dist.rank
        obs, actions = self.data.batch(idx)
        images = self.data.batch_images(idx)
        x1 = policy.normalize_action(actions)
        cond = policy.encode(obs, images)
        n_sc = self._consistency_rows()
        n_fm = n - n_sc
        fm_draws = {"x0": draws["fm_x0"], "t": draws["fm_t"]}
        out: dict[str, torch.Tensor] = {}
        if policy.takes_step_size:
            fm = flow_matching_loss(policy, cond[:n_fm], x1[:n_fm], draws=fm_draws)
            ema_images = None if images is None else {c: x[n_fm:] for c, x in images.items()}
            consistency = shortcut_consistency_loss if policy.is_shortcut else interval_consistency_loss
            sc = consistency(policy, self.ema, cond[n_fm:], self.ema.encode(obs[n_fm:], ema_images), x1[n_fm:],
                             draws={k[3:]: v for k, v in draws.items() if k.startswith("sc_")})
            loss = (fm * n_fm + sc * n_sc) / n
            out["train/shortcut_loss" if policy.is_shortcut else "train/interval_loss"] = sc.detach()
        else:
            fm = loss = flow_matching_loss(policy, cond, x1, draws=fm_draws)
        out["train/bc_loss"] = fm.detach()
        out["train/loss"] = loss.detach()
        return loss, out

    def _forward_backward(self, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss, gradients (averaged over ranks) and their clipping for one batch; returns detached scalars."""
        cfg, policy = self.cfg.train, self.model
        loss, out = self._loss(draws)
        loss.backward()
        self.dist.average_gradients(policy.parameters())
        if cfg.grad_clip > 0:
            out["train/grad_norm"] = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip).detach()
        return out

    def _gradient_step(self, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole step after the draws: loss and gradients, the optimiser's update, the EMA's."""
        logs = self._forward_backward(draws)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._ema_params, self._model_params, 1.0 - self.cfg.train.ema_decay)
        return logs

    def train_iteration(self, iteration: int) -> dict[str, float]:
        """One gradient step on a batch of demonstration chunks. The logged values are tensors (read back
        only when the training loop writes them), except under torchrun, where they are averaged over ranks."""
        cfg = self.cfg.train
        with tf32_matmuls(cfg.tf32):
            if self.graph is not None:
                logs = self.graph({}, [self.optimizer])
            else:
                self.optimizer.zero_grad(set_to_none=True)
                logs = self._gradient_step(self._draw())
        self.scheduler.step()
        logs = self.dist.mean(logs) if self.dist.active else logs
        logs["train/learning_rate"] = cfg.lr * self._lr_factor(self.scheduler.last_epoch)
        return logs
