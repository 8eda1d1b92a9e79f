"""Few-step policies from a trained one: distillation from the prior alone, and the optimal Euler grid of a
fixed K.

**Distillation** (``algo: distill``; ``flowrl distill RUN --k 1``). The student starts as a copy of the
teacher (same head, same weights) and is trained so that its own deterministic sampler at K =
``train.k`` steps (1 by default) lands where the teacher's ``train.teacher_k``-step sampler lands from the
same initial noise: the loss is ``|S_K(x0, obs) - T(x0, obs)|^2`` with x0 ~ N(0, I), fresh every step
(the flow map of the teacher, learnt from the prior alone). The gradient runs through every step of the
student's sampler, so at K > 1 its later steps learn to correct the states its own earlier steps reach,
instead of imitating the teacher's states (per-step errors do not compound unseen). No action of the
demonstrations is read: the targets are the teacher's outputs.

Which observations condition the samples: the observation histories of the demonstrations the teacher
descends from (``train.data``, else the dataset its checkpoint records, followed back through
fine-tunings: :func:`flowrl.checkpoint.recorded_dataset`). They are the states the teacher was trained
on, so its field is reliable there; they need no simulator, and a run records no other states (its
rollouts are not kept). A fine-tuned teacher also visits states beyond them; the student copies the
teacher there only as far as the network generalises.

**The optimal grid** (``flowrl distill RUN --grid --k 2 4``; Bellman-optimal step sizes, BOSS). At a
fixed K the Euler steps need not be equal. On demonstration observations and prior noises the policy's
own fine solution (``resolution * refine`` uniform steps of its instantaneous velocity) gives reference
states at the candidate times ``j / resolution``; one Euler step from candidate i to candidate j costs its
mean squared distance from the reference state at j, started from the reference state at i; dynamic
programming chooses the K steps from 0 to 1 of least total cost (a shortcut head's steps only among those
it was trained on: powers of two, each starting on a multiple of its size). A grid is kept only where its K-step
solution is closer to the reference than the uniform grid's on other noises and observations; both
errors are recorded in the checkpoint (``time_grid`` in config.json) and the grid in
``policy.time_grids``, which evaluation, export and deployment then step on.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowrl.checkpoint import (CONFIG, demonstrations_of, load_init, load_policy, read_config, resolve_checkpoint,
                               save_checkpoint)
from flowrl.config import FinetuneConfig, GradientStepLoopConfig, check_non_negative, check_positive, setup_torch
from flowrl.cuda_graph import fused_if_cuda
from flowrl.datasets import ChunkDataset
from flowrl.errors import FlowrlError
from flowrl.io import write_json
from flowrl.policy import FlowPolicy, require_state_only, require_unsteered
from flowrl.sampler import grid_euler_sample, uniform_times
from flowrl.training import Agent


@dataclass
class DistillConfig(GradientStepLoopConfig):
    """Distillation into a few-step student (``algo: distill``); its iterations are gradient steps."""

    steps: int = 2000
    """Gradient steps."""
    k: int = 1
    """Euler steps K of the student (its policy.k)."""
    teacher_k: int = 0
    """Euler steps of the teacher's sampler whose outputs are the targets (0: the teacher's own K; on its
    time grid for that K when its checkpoint holds one)."""
    batch_size: int = 256
    """Samples (observation history, prior noise) per gradient step."""
    lr: float = 1e-4
    """AdamW learning rate (constant)."""
    weight_decay: float = 1e-6
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0: off)."""
    data: str = ""
    """Demonstrations whose observations condition the samples (HDF5; empty: the dataset the teacher's
    checkpoint records, followed back through fine-tunings). Their actions are not read."""
    max_episodes: int = 0
    """Use only the first N episodes of the demonstrations (0: all)."""

    def validate(self, prefix: str = "train.") -> None:
        super().validate(prefix)
        check_positive(self, prefix, "steps", "k", "batch_size", "lr")
        check_non_negative(self, prefix, "teacher_k", "weight_decay", "grad_clip", "max_episodes")


def demonstration_observations(checkpoint: Path, policy: FlowPolicy, data: str, max_episodes: int,
                               device: torch.device) -> tuple[ChunkDataset, str]:
    """The observation histories of ``data`` or, when empty, of the demonstrations ``checkpoint`` descends
    from, cut for ``policy``; and the dataset's path."""
    episodes, path = demonstrations_of(checkpoint, policy, data, max_episodes, with_actions=False)
    return ChunkDataset(episodes, policy.cfg.obs_history, policy.cfg.horizon, device), path


def sampler_error(policy: FlowPolicy, cond: torch.Tensor, x0: torch.Tensor, times: list[float],
                  target: torch.Tensor) -> float:
    """Mean squared error per chunk element of the policy's Euler solution on ``times`` against ``target``."""
    return float((grid_euler_sample(policy.step_velocity_fn(cond), x0, times) - target).square().mean())


class Distillation(Agent):
    """Distil a trained policy's sampler into a few-step student from prior noise (``algo: distill``)."""

    algo, stage = "distill", "finetune"
    evaluate_at_start = True

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        t = cfg.train
        self.device = setup_torch(cfg)
        teacher, _, self.task, self.init_info = load_init(cfg.init, cfg.task, self.device)
        require_state_only(teacher, f"{self.init_info['path']}: distillation")
        require_unsteered(teacher, f"{self.init_info['path']}: distillation")
        self.teacher_k = t.teacher_k or teacher.cfg.k
        self.data, self.data_path = demonstration_observations(Path(self.init_info["path"]), teacher, t.data,
                                                               t.max_episodes, self.device)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = copy.deepcopy(teacher).requires_grad_(True).train()
        # the teacher's grids were chosen for its weights and its K: the student samples on the uniform grid
        self.student.cfg = dataclasses.replace(teacher.cfg, k=t.k, time_grids={})
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                           **fused_if_cuda(self.device))
        self.iterations = t.steps

    @property
    def policy(self) -> FlowPolicy:
        """The student: what is evaluated, saved and deployed."""
        return self.student

    def resumable_keys(self) -> tuple[str, ...]:
        return ("train.steps", "train.max_minutes")

    def checkpoint_info(self) -> dict[str, Any]:
        return {"init": self.init_info, "dataset": {"path": self.data_path},
                "distill": {"k": self.cfg.train.k, "teacher_k": self.teacher_k,
                            "observations": "demonstrations", "noise": "prior"}}

    def state_components(self) -> dict[str, Any]:
        return {"student": self.student, "optimizer": self.optimizer, "generator": self.gen}

    def postfix(self, logs: dict[str, float]) -> dict[str, str]:
        return {"mse": f"{logs['train/distill_mse']:.4f}"}

    def distillation_loss(self, obs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Mean squared distance (normalised action units) between the student's K-step chunks and the
        teacher's from the same noise ``x0``; gradients through every step of the student."""
        with torch.no_grad():
            target = self.teacher.sample(obs, self.teacher_k, x0)
        return F.mse_loss(self.student.sample(obs, self.cfg.train.k, x0), target)

    def train_iteration(self, iteration: int) -> dict[str, Any]:
        t = self.cfg.train
        idx = torch.randint(0, len(self.data), (t.batch_size,), generator=self.gen, device=self.device)
        obs = self.data.batch(idx)[0]
        x0 = torch.randn((t.batch_size, *self.student.chunk_shape), generator=self.gen, device=self.device)
        loss = self.distillation_loss(obs, x0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logs: dict[str, Any] = {"train/distill_mse": loss.detach()}
        if t.grad_clip > 0:
            logs["train/grad_norm"] = nn.utils.clip_grad_norm_(self.student.parameters(), t.grad_clip).detach()
        self.optimizer.step()
        return logs


# -- the optimal grid of a fixed K ------------------------------------------------------------------

def reference_states(policy: FlowPolicy, cond: torch.Tensor, x0: torch.Tensor, resolution: int,
                     refine: int) -> list[torch.Tensor]:
    """The policy's fine solution from ``x0`` (``resolution * refine`` uniform Euler steps of its
    instantaneous velocity) at the ``resolution + 1`` candidate times ``j / resolution``."""
    n = resolution * refine
    states, x = [x0], x0
    for i in range(n):
        t = torch.full((x0.shape[0],), i / n, device=x0.device, dtype=x0.dtype)
        x = x + (1.0 / n) * policy.velocity(t, x, cond, policy.flow_matching_step(t))
        if (i + 1) % refine == 0:
            states.append(x)
    return states


def shortcut_trained_step(i: int, j: int, resolution: int, max_shortcut_steps: int) -> bool:
    """Whether the step from candidate ``i`` to ``j`` (times ``i / resolution`` to ``j / resolution``) is one a
    shortcut head was trained on: a size d = 2^-m no finer than ``1 / max_shortcut_steps``, starting on a
    multiple of d (behaviour cloning draws the steps and their start times so; other steps' velocities
    were never fitted)."""
    d = Fraction(j - i, resolution)
    dyadic = d.numerator == 1 and d.denominator & (d.denominator - 1) == 0
    return dyadic and d.denominator <= max_shortcut_steps and (Fraction(i, resolution) / d).denominator == 1


def step_costs(policy: FlowPolicy, cond: torch.Tensor, states: list[torch.Tensor]) -> list[list[float]]:
    """``cost[i][j]`` (i < j): mean squared error per element of one Euler step from the reference state at
    candidate i to candidate j, against the reference state at j. For a shortcut head only the steps it was
    trained on (:func:`shortcut_trained_step`) have a cost; the others stay infinite, so no grid takes them."""
    r = len(states) - 1
    cost = [[float("inf")] * (r + 1) for _ in range(r + 1)]
    b = cond.shape[0]
    for i in range(r):
        x = states[i]
        t = torch.full((b,), i / r, device=x.device, dtype=x.dtype)
        v = None if policy.takes_step_size else policy.velocity(t, x, cond)  # a rectified flow ignores d
        for j in range(i + 1, r + 1):
            if policy.is_shortcut and not shortcut_trained_step(i, j, r, policy.cfg.max_shortcut_steps):
                continue
            d = (j - i) / r
            vj = v if v is not None else policy.velocity(t, x, cond, torch.full_like(t, d))
            cost[i][j] = float((x + d * vj - states[j]).square().mean())
    return cost


def optimal_grid(cost: list[list[float]], k: int) -> list[float]:
    """The K + 1 candidate times from 0 to 1 whose K steps have the least total ``cost`` (dynamic
    programming over the candidates ``j / resolution``, ``resolution = len(cost) - 1``; an infinite cost is
    a step not allowed)."""
    r = len(cost) - 1
    if not 1 <= k <= r:
        raise FlowrlError(f"--k {k}: must be between 1 and the {r} candidate steps (--resolution)")
    inf = float("inf")
    best = [[inf] * (r + 1) for _ in range(k + 1)]
    came_from = [[0] * (r + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for m in range(1, k + 1):
        for j in range(m, r + 1):
            for i in range(m - 1, j):
                total = best[m - 1][i] + cost[i][j]
                if total < best[m][j]:
                    best[m][j], came_from[m][j] = total, i
    if best[k][r] == inf:
        raise FlowrlError(f"--k {k}: no {k} steps from 0 to 1 on the {r} candidate steps (--resolution) that the "
                          f"policy was trained on (a shortcut head: power-of-two steps, each starting on a multiple "
                          f"of its size)")
    path = [r]
    for m in range(k, 0, -1):
        path.append(came_from[m][path[-1]])
    return [j / r for j in reversed(path)]


def write_time_grids(checkpoint: str | Path, ks: list[int], out: str | Path | None = None, data: str = "",
                     max_episodes: int = 0, samples: int = 512, resolution: int = 64, refine: int = 4,
                     seed: int = 0, device: str = "cpu") -> list[dict[str, Any]]:
    """Choose the optimal Euler grid of each K in ``ks`` for ``checkpoint``'s policy and store the ones that
    beat the uniform grid in its ``policy.time_grids``: in the checkpoint itself (its config.json rewritten,
    the weights untouched), or in a new checkpoint folder ``out``. Returns one row per K: the grid, its
    error and the uniform grid's (mean squared error per element against the reference, on held-out noises
    and observations), whether it was kept."""
    if samples < 2 or resolution < 1 or refine < 1:
        raise FlowrlError(f"--samples must be >= 2, --resolution and --refine >= 1; got {samples}, {resolution}, "
                          f"{refine}")
    src = resolve_checkpoint(checkpoint)
    policy, config = load_policy(src, device)
    require_state_only(policy, f"{src}: time grids")
    require_unsteered(policy, f"{src}: time grids")
    obs_data, data_path = demonstration_observations(src, policy, data, max_episodes, policy.obs_mean.device)
    gen = torch.Generator(device=policy.obs_mean.device).manual_seed(seed)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(obs_data), (samples,), generator=gen, device=gen.device)
        cond = policy.encode(obs_data.batch(idx)[0])
        return cond, torch.randn((samples, *policy.chunk_shape), generator=gen, device=gen.device)

    rows = []
    grids = dict(policy.cfg.time_grids)
    with torch.no_grad():
        fit_cond, fit_x0 = draw()
        cost = step_costs(policy, fit_cond, reference_states(policy, fit_cond, fit_x0, resolution, refine))
        held_cond, held_x0 = draw()
        target = reference_states(policy, held_cond, held_x0, resolution, refine)[-1]
        for k in ks:
            times = optimal_grid(cost, k)
            error = sampler_error(policy, held_cond, held_x0, times, target)
            uniform = sampler_error(policy, held_cond, held_x0, uniform_times(k), target)
            kept = error < uniform
            if kept:
                grids[str(k)] = times
            else:
                grids.pop(str(k), None)
            rows.append({"k": k, "times": times, "error": error, "uniform_error": uniform, "kept": kept})
    record = {"dataset": data_path, "samples": samples, "resolution": resolution, "refine": refine, "seed": seed,
              "grids": rows}
    if out is None:
        config = read_config(src)  # as written (load_policy's copy may carry defaults of newer keys)
        config["policy"]["time_grids"] = grids
        config["time_grid"] = record
        write_json(src / CONFIG, config)
    else:
        policy.cfg = dataclasses.replace(policy.cfg, time_grids=grids)
        info = {key: value for key, value in config.items() if key not in ("format", "policy", "obs_dim", "act_dim")}
        save_checkpoint(out, policy, {**info, "time_grid": {**record, "source": str(src)}})
    return rows


__all__ = ["DistillConfig", "Distillation", "optimal_grid", "reference_states", "sampler_error",
           "shortcut_trained_step", "step_costs", "write_time_grids"]
