"""Behaviour cloning of a flow policy on demonstration chunks.

Rectified flow: ``x_t = (1 - t) x0 + t x1`` with x0 ~ N(0, I) and x1 the (normalised) action
chunk; the network regresses the constant velocity ``x1 - x0``.

Shortcut (Frans et al. 2024): the network also sees the step size d. Flow-matching rows use the
finest d; self-consistency rows (``shortcut_fraction`` of the batch) pick a step 2d from powers of
two and t on the 2d grid, and regress the mean velocity of two d-steps of the EMA network, so a
single step of 2d lands where two steps of d would.

AdamW with linear warm-up then cosine decay; an EMA of the weights is evaluated and saved.
Training is exactly resumable: the batch sampler draws from one ``torch.Generator`` whose state is
checkpointed with the optimiser and the schedule.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from flowrl.checkpoint import load_policy, save_checkpoint
from flowrl.config import PretrainConfig, resolve_device, to_dict, validate_pretrain
from flowrl.datasets import ChunkDataset, Episodes, read_dataset
from flowrl.envs import canonical_task, make
from flowrl.errors import FlowrlError, Interrupted
from flowrl.evaluation import Evaluator
from flowrl.policy import FlowPolicy, shortcut_target
from flowrl.run import RunFolder, format_eval_table, stop_on_ctrl_c


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


def flow_matching_loss(policy: FlowPolicy, cond: torch.Tensor, x1: torch.Tensor, gen: torch.Generator,
                       time_sampling: str = "uniform") -> torch.Tensor:
    """Rectified-flow regression of ``x1 - x0`` at a random point of the straight path."""
    n = x1.shape[0]
    x0 = torch.randn(x1.shape, generator=gen, device=x1.device)
    t = sample_time(n, time_sampling, gen, x1.device)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * x1
    d = torch.full((n,), 1.0 / policy.cfg.max_shortcut_steps, device=x1.device) if policy.is_shortcut else None
    return F.mse_loss(policy.velocity(t, x_t, cond, d), x1 - x0)


def shortcut_consistency_loss(policy: FlowPolicy, ema: FlowPolicy, cond: torch.Tensor, ema_cond: torch.Tensor,
                              x1: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One step of 2d must match two EMA steps of d (targets without gradient)."""
    n, dev = x1.shape[0], x1.device
    levels = int(math.log2(policy.cfg.max_shortcut_steps))
    j = torch.randint(0, levels, (n,), generator=gen, device=dev)  # 2d = 2^-j, d = 2^-(j+1)
    big = torch.pow(2.0, -j.float())
    t = torch.floor(torch.rand(n, generator=gen, device=dev) * torch.pow(2.0, j.float())) * big
    x0 = torch.randn(x1.shape, generator=gen, device=dev)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * x1
    with torch.no_grad():
        target = shortcut_target(lambda tt, xx, dd: ema.velocity(tt, xx, ema_cond, dd), x_t, t, big / 2)
    return F.mse_loss(policy.velocity(t, x_t, cond, big), target)


class BehaviorCloning:
    """Pretrain a flow policy on demonstrations: ``BehaviorCloning(cfg, out).learn()``."""

    def __init__(self, cfg: PretrainConfig, out: str | Path, resume: bool = False,
                 progress: bool = True) -> None:
        validate_pretrain(cfg)
        self.cfg = cfg
        self.task = canonical_task(cfg.task)
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.run = RunFolder(out)
        self.progress = progress
        episodes = read_dataset(cfg.data.path).head(cfg.data.max_episodes)
        low, high = check_dataset_matches_task(episodes, self.task, cfg.data.path)
        self.data = ChunkDataset(episodes, cfg.policy.obs_history, cfg.policy.horizon, self.device)
        self.data_info = {**episodes.info(), "path": str(cfg.data.path)}

        torch.manual_seed(cfg.seed)
        self.policy = FlowPolicy(cfg.policy, episodes.obs_dim, episodes.act_dim, low, high).to(self.device)
        std = episodes.observations.std(0)
        self.policy.set_normalization(episodes.observations.mean(0), std)
        self.ema = copy.deepcopy(self.policy).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.evaluator = Evaluator.from_config(self.task, cfg.eval, self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.step = 0
        self._stop_requested = False
        self.run.start(cfg, resume)
        if resume:
            self._restore()

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        frac = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    # -- checkpoints ---------------------------------------------------------------------------
    def _info(self) -> dict[str, Any]:
        return {"task": self.task, "stage": "pretrain", "step": self.step, "dataset": self.data_info,
                "run_config": to_dict(self.cfg)}

    def save(self, folder: str | Path | None = None) -> Path:
        """Checkpoint the EMA policy and everything needed to resume."""
        state = {"step": self.step, "model": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "generator": self.gen.get_state(),
                 "torch_rng": torch.get_rng_state()}
        return save_checkpoint(folder or self.run.checkpoint_dir(self.step), self.ema, self._info(), state)

    def _restore(self) -> None:
        state, ema = self.run.load_latest(self.device)
        self.ema.load_state_dict(ema.state_dict())
        self.policy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        print(f"resumed {self.run.path} at step {self.step}", file=sys.stderr)

    @staticmethod
    def load(folder: str | Path, device: str = "cpu") -> FlowPolicy:
        """The policy of a checkpoint folder (SB3-style ``load``)."""
        return load_policy(folder, device)[0]

    # -- training ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, policy = self.cfg.train, self.policy
        idx = torch.randint(0, len(self.data), (cfg.batch_size,), generator=self.gen, device=self.device)
        obs, actions = self.data.batch(idx)
        x1 = policy.normalize_action(actions)
        cond = policy.encode(obs)
        logs: dict[str, float] = {}
        if policy.is_shortcut:
            n_sc = max(1, int(round(cfg.batch_size * cfg.shortcut_fraction)))
            n_fm = cfg.batch_size - n_sc
            fm = flow_matching_loss(policy, cond[:n_fm], x1[:n_fm], self.gen, cfg.time_sampling)
            sc = shortcut_consistency_loss(policy, self.ema, cond[n_fm:], self.ema.encode(obs[n_fm:]), x1[n_fm:],
                                           self.gen)
            loss = (fm * n_fm + sc * n_sc) / cfg.batch_size
            logs["train/shortcut_loss"] = sc.item()
        else:
            fm = loss = flow_matching_loss(policy, cond, x1, self.gen, cfg.time_sampling)
        logs["train/bc_loss"] = fm.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            logs["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            ema_params = list(self.ema.parameters())
            torch._foreach_lerp_(ema_params, list(policy.parameters()), 1.0 - cfg.ema_decay)
        logs["train/loss"] = loss.item()
        logs["train/learning_rate"] = self.scheduler.get_last_lr()[0]
        return logs

    def evaluate(self, num_steps: int, episodes: int) -> dict[str, float]:
        """The EMA policy on seeded episodes; the evaluation envs are kept for the next call (closed
        by :meth:`close`)."""
        return self.evaluator(self.ema, num_steps, episodes)

    def close(self) -> None:
        """Release the evaluation envs (robosuite's are worker processes)."""
        self.evaluator.close()

    def request_stop(self, *_: Any) -> None:
        """Finish the current step, save a checkpoint and stop (what Ctrl-C does)."""
        self._stop_requested = True

    def learn(self) -> FlowPolicy:
        """Train to ``train.steps``. Ctrl-C stops at the next step boundary with a checkpoint saved."""
        cfg = self.cfg.train
        writer = self.run.writer(purge_step=self.step if self.step else None)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"pretrain {self.task}", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        tick, tick_step = time.time(), self.step
        self._stop_requested = False
        try:
            with stop_on_ctrl_c(self.request_stop):
                while self.step < cfg.steps:
                    if self._stop_requested:
                        raise KeyboardInterrupt
                    logs = self.train_step()
                    self.step += 1
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        now = time.time()
                        logs["time/fps"] = (self.step - tick_step) * cfg.batch_size / max(now - tick, 1e-9)
                        tick, tick_step = now, self.step
                        for k, v in logs.items():
                            writer.add_scalar(k, v, self.step)
                        bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        r = self.evaluate(self.cfg.policy.num_steps, cfg.eval_episodes)
                        writer.add_scalar("eval/mean_reward", r["return_mean"], self.step)
                        writer.add_scalar("eval/mean_ep_length", r["length_mean"], self.step)
                        if "success_rate" in r:
                            writer.add_scalar("eval/success_rate", r["success_rate"], self.step)
                        bar.write(f"step {self.step}: eval return {r['return_mean']:.1f} ± {r['return_std']:.1f} "
                                  f"(K={self.cfg.policy.num_steps}, {cfg.eval_episodes} episodes)")
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                        self.save()
        except KeyboardInterrupt:
            self.save()
            bar.close()
            self.run.close()
            raise Interrupted(f"interrupted at step {self.step}; checkpoint saved, continue with "
                              f"--resume --out {self.run.path}") from None
        bar.close()
        writer.flush()
        return self.ema

    def final_evaluation(self) -> list[dict[str, float]]:
        """Evaluate the EMA policy at every K of ``eval.steps``; print and write ``eval.json``."""
        e = self.cfg.eval
        rows = [self.evaluate(k, e.episodes) for k in e.steps]
        writer = self.run.writer()
        for r in rows:
            writer.add_scalar(f"eval/mean_reward_K{r['num_steps']}", r["return_mean"], self.step)
        writer.flush()
        checkpoint = self.run.checkpoint_dir(self.step)
        self.run.write_eval({"checkpoint": str(checkpoint), "task": self.task, "step": self.step,
                             "dataset_return_mean": self.data_info["return_mean"], "results": rows})
        print(format_eval_table(rows, f"evaluation of {checkpoint} on {self.task}, "
                                      f"{e.episodes} episodes per K "
                                      f"(demonstrations: {self.data_info['return_mean']:.1f})"))
        return rows
