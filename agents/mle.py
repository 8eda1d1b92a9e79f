"""MLE reconstruction fine-tuning: train a flow policy through its own K-step solver on demonstrations.

Flow matching trains the velocity field pointwise and never scores what the K-step Euler solver
actually produces, so solver errors go unseen and grow along stiff (straight) paths. Here the
policy decodes a latent with the inference solver (the deployment grid ``t_k = k/K``) and is trained
on the Gaussian likelihood of the demonstration chunk; no reward and no simulator (except for
evaluation). Only the idea is public (Li, Ding, Li, Li, arXiv 2510.02081); the design below is ours.

Methods (``train.method``):
- ``ft``: the whole velocity field is trained. Latents (``train.latents``) come from the prior
  (fresh N(0, I) noise each step: the likelihood of the demonstrations under a deterministic map of
  noise, which averages the modes of a multimodal action distribution), or are paired with each
  demonstration by inverting the pretrained flow with ``inversion_steps`` Euler steps backwards from
  the demonstration (computed once, before training): decoding then has a target per latent, so modes
  are kept and training removes exactly the K-step solver's error. Variance fixed (the loss is the
  MSE through the unrolled solver) or learned (one log-std per chunk element). The flow-matching
  loss can be kept as a regulariser (``fm_coef``).
- ``resft``: the pretrained field is frozen and a contracting residual ``-k (a - m(t, obs))`` is added
  (:class:`flowrl.policy.ContractingResidual`). Its action Jacobian is ``-k I``, so the combined
  field contracts in the action where ``k`` exceeds the frozen field's one-sided Lipschitz constant
  (the largest eigenvalue of the symmetric part of its action Jacobian; contraction is decided by
  that, not by the Jacobian's norm: a rectified flow near its data is already contracting, with a
  Jacobian near ``-I / (1 - t)``). ``k`` is bounded below by that constant, estimated at sampled
  points where positive, plus ``contraction_margin - 1`` times the Jacobian's estimated norm, a
  safety for the points not sampled; both estimates are logged. (A gain above the norm itself would
  dominate the frozen field where it already contracts and, with ``m`` starting at 0, pull every
  action chunk toward 0 before training moves ``m``.) Only the residual trains; the checkpoint holds
  both and loads, evaluates and exports like any policy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowrl.checkpoint import demonstrations_of, load_init
from flowrl.config import (FinetuneConfig, GradientStepLoopConfig, check_non_negative, check_positive, fail,
                           setup_torch)
from flowrl.cuda_graph import fused_if_cuda
from flowrl.datasets import ChunkDataset
from flowrl.policy import FlowPolicy, require_state_only, require_unsteered
from flowrl.sampler import euler_sample, time_grid
from flowrl.training import Agent


@dataclass
class MLEConfig(GradientStepLoopConfig):
    """MLE reconstruction fine-tuning (``algo: mle``); its iterations are gradient steps."""

    method: str = "ft"
    """`ft` (the whole velocity field) or `resft` (a contracting residual on the frozen field)."""
    latents: str = "inverted"
    """`inverted` (each demonstration paired with its latent under the pretrained flow) or `prior`."""
    steps: int = 2000
    """Gradient steps."""
    k: int = 0
    """Euler steps K of the solver trained through (0: the pretrained policy's K)."""
    batch_size: int = 256
    """Demonstration chunks per gradient step."""
    lr: float = 1e-4
    """AdamW learning rate (constant)."""
    weight_decay: float = 1e-6
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0: off)."""
    variance: str = "fixed"
    """`fixed` (the loss is the MSE through the solver) or `learned` (a log-std per chunk element)."""
    fm_coef: float = 0.0
    """Weight of the flow-matching loss kept as a regulariser (ft only)."""
    inversion_steps: int = 32
    """Euler steps of the backward integration that pairs demonstrations with latents."""
    data: str = ""
    """Demonstrations (HDF5; empty: the dataset the pretrained checkpoint was trained on)."""
    max_episodes: int = 0
    """Use only the first N episodes of the demonstrations (0: all)."""
    residual_hidden_dim: int = 128
    """ResFT: width of the residual's MLP."""
    contraction_margin: float = 1.1
    """ResFT: the residual's gain is at least the frozen field's estimated one-sided Lipschitz constant
    (where positive) plus (this - 1) times its estimated Lipschitz constant."""
    lipschitz_samples: int = 256
    """ResFT: (obs, t, a) points at which the frozen field's Jacobian bounds are estimated."""

    def validate(self, prefix: str = "train.") -> None:
        super().validate(prefix)
        check_positive(self, prefix, "steps", "batch_size", "lr", "inversion_steps", "residual_hidden_dim",
                       "contraction_margin", "lipschitz_samples")
        check_non_negative(self, prefix, "k", "weight_decay", "grad_clip", "fm_coef", "max_episodes")
        for key, allowed in (("method", ("ft", "resft")), ("latents", ("inverted", "prior")),
                             ("variance", ("fixed", "learned"))):
            if getattr(self, key) not in allowed:
                fail(f"{prefix}{key}", f"must be one of {', '.join(allowed)}, got '{getattr(self, key)}'")


def invert(policy: FlowPolicy, obs: torch.Tensor, actions: torch.Tensor, k: int) -> torch.Tensor:
    """Latents whose K-step decoding is the given normalised action chunks: the flow integrated
    backwards from t=1 to 0 with K = ``k`` Euler steps (exact in the limit of many steps)."""
    velocity = policy.velocity_fn(policy.encode(obs), k)
    dt = 1.0 / k
    x = actions
    for t in reversed(time_grid(k, x.shape[0], x.device, x.dtype)):
        x = x - dt * velocity(t + dt, x)
    return x


def jacobian_bounds(policy: FlowPolicy, obs: torch.Tensor, k: int, iterations: int = 20,
                    generator: torch.Generator | None = None) -> tuple[float, float]:
    """``(lipschitz, one_sided)`` of the field's action Jacobian J over sampled (obs, t, a) points, t on
    the grid of K = ``k`` steps: the largest spectral norm of J, and the largest eigenvalue of its
    symmetric part (J + J^T) / 2, the one-sided Lipschitz constant that decides contraction (negative:
    the field already contracts there). Power iterations per point with autograd's Jacobian-vector
    products: on J^T J, then on the symmetric part shifted by the spectral norm (which makes it positive
    semi-definite)."""
    n = obs.shape[0]
    cond = policy.encode(obs).detach()
    t = torch.randint(0, k, (n,), generator=generator, device=obs.device).float() / k
    a = torch.randn((n, *policy.chunk_shape), generator=generator, device=obs.device)
    d = torch.full((n,), 1.0 / k, device=obs.device) if policy.takes_step_size else None

    def field(x: torch.Tensor) -> torch.Tensor:
        return policy.velocity(t, x, cond, d)

    _, vjp = torch.func.vjp(field, a)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)

    def jv(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(field, (a,), (v,))[1]

    v = torch.randn(a.shape, generator=generator, device=obs.device)
    sigma = torch.zeros(n, device=obs.device)
    for _ in range(iterations):
        v = unit(v)
        j = jv(v)
        sigma = j.flatten(1).norm(dim=1)
        v = vjp(j)[0]
    shift = sigma.view(-1, 1, 1)
    w = unit(torch.randn(a.shape, generator=generator, device=obs.device))
    rayleigh = torch.zeros(n, device=obs.device)
    for _ in range(iterations):
        sym = 0.5 * (jv(w) + vjp(w)[0])
        rayleigh = (w * sym).flatten(1).sum(dim=1)  # w^T S w with |w| = 1: the eigenvalue estimate
        w = unit(sym + shift * w)
    return float(sigma.max().detach()), float(rayleigh.max().detach())


def residual_gain_min(lipschitz: float, one_sided: float, margin: float) -> float:
    """The ResFT residual's smallest gain: the frozen field's one-sided Lipschitz estimate (where
    positive) plus ``margin - 1`` times its Lipschitz estimate, a safety for the points not sampled.
    At the sampled points the combined field's one-sided Lipschitz constant is then at most
    ``-(margin - 1) * lipschitz``."""
    return max(one_sided, 0.0) + (margin - 1.0) * lipschitz


class LogStd(nn.Module):
    """The learned variance: one log-std per element of the action chunk."""

    def __init__(self, chunk_shape: tuple[int, int]) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(chunk_shape))


class MLEFineTuning(Agent):
    """Fine-tune a pretrained flow policy by MLE of its K-step reconstructions (``algo: mle``)."""

    algo, stage = "mle", "finetune"
    evaluate_at_start = True

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        t = cfg.train
        self.device = setup_torch(cfg)
        pretrained, _, self.task, self.init_info = load_init(cfg.init, cfg.task, self.device)
        init = self.init_info["path"]
        require_state_only(pretrained, f"{init}: MLE fine-tuning")
        require_unsteered(pretrained, f"{init}: MLE fine-tuning")
        episodes, self.data_path = demonstrations_of(init, pretrained, t.data, t.max_episodes)
        self.K = t.k or pretrained.cfg.k
        self.data = ChunkDataset(episodes, pretrained.cfg.obs_history, pretrained.cfg.horizon, self.device)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.lipschitz = self.one_sided = None
        if t.method == "resft":
            sample = self.data.batch(torch.randint(0, len(self.data), (t.lipschitz_samples,), generator=self.gen,
                                                   device=self.device))[0]
            self.lipschitz, self.one_sided = jacobian_bounds(pretrained, sample, self.K, generator=self.gen)
            gain_min = residual_gain_min(self.lipschitz, self.one_sided, t.contraction_margin)
            pcfg = dataclasses.replace(pretrained.cfg, residual_hidden_dim=t.residual_hidden_dim,
                                       residual_gain_min=gain_min)
            self.model = FlowPolicy(pcfg, pretrained.obs_dim, pretrained.act_dim).to(self.device)
            missing = self.model.load_state_dict(pretrained.state_dict(), strict=False).missing_keys
            assert all(k.startswith("residual.") for k in missing), missing
            self.model.requires_grad_(False)
            self.model.residual.requires_grad_(True)
        else:
            self.model = pretrained
        self.model.cfg.k = self.K
        self.model.cfg.time_grids = {}  # chosen for the pretrained weights; the solver trains on the uniform grid
        self.model.train()
        self.log_std = LogStd(self.model.chunk_shape).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if t.variance == "learned":
            params += list(self.log_std.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fused_if_cuda(self.device))
        self.latents = None
        if t.latents == "inverted":
            self.latents = self._invert_all(pretrained)
        self.iterations = t.steps

    def _invert_all(self, pretrained: FlowPolicy, batch: int = 4096) -> torch.Tensor:
        reference = copy.deepcopy(pretrained).eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(self.data), batch):
                idx = torch.arange(start, min(start + batch, len(self.data)), device=self.device)
                obs, actions = self.data.batch(idx)
                out.append(invert(reference, obs, reference.normalize_action(actions), self.cfg.train.inversion_steps))
        return torch.cat(out)

    @property
    def policy(self) -> FlowPolicy:
        return self.model

    def resumable_keys(self) -> tuple[str, ...]:
        return ("train.steps", "train.max_minutes")

    def checkpoint_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"init": self.init_info, "dataset": {"path": self.data_path},
                                "mle": {"method": self.cfg.train.method, "latents": self.cfg.train.latents, "K": self.K}}
        if self.lipschitz is not None:
            info["mle"].update(lipschitz_estimate=self.lipschitz, one_sided_lipschitz_estimate=self.one_sided,
                               residual_gain_min=float(self.model.residual.gain_min))
        return info

    def state_components(self) -> dict[str, Any]:
        return {"model": self.model, "log_std": self.log_std, "optimizer": self.optimizer, "generator": self.gen}

    def postfix(self, logs: dict[str, float]) -> dict[str, str]:
        return {"recon": f"{logs['train/reconstruction_mse']:.4f}"}

    def reconstruction_loss(self, obs: torch.Tensor, x1: torch.Tensor, x0: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, reconstruction MSE) of decoding ``x0`` with K Euler steps, against ``x1``."""
        cond = self.model.encode(obs)
        decoded = euler_sample(self.model.velocity_fn(cond, self.K), x0, self.K)
        mse = F.mse_loss(decoded, x1)
        if self.cfg.train.variance == "learned":
            log_std = self.log_std.value
            nll = (0.5 * ((decoded - x1) / log_std.exp()).square() + log_std + 0.5 * math.log(2 * math.pi)).mean()
            return nll, mse
        return mse, mse

    def train_iteration(self, iteration: int) -> dict[str, float]:
        t = self.cfg.train
        idx = torch.randint(0, len(self.data), (t.batch_size,), generator=self.gen, device=self.device)
        obs, actions = self.data.batch(idx)
        x1 = self.model.normalize_action(actions)
        if self.latents is not None:
            x0 = self.latents[idx]
        else:
            x0 = torch.randn(x1.shape, generator=self.gen, device=self.device)
        loss, mse = self.reconstruction_loss(obs, x1, x0)
        logs = {"train/reconstruction_mse": mse.detach(), "train/loss": loss.detach()}
        if t.fm_coef > 0 and t.method == "ft":
            from flowrl.agents.bc import flow_matching_loss

            fm = flow_matching_loss(self.model, self.model.encode(obs), x1, self.gen)
            loss = loss + t.fm_coef * fm
            logs["train/fm_loss"] = fm.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if t.grad_clip > 0:
            logs["train/grad_norm"] = nn.utils.clip_grad_norm_(params, t.grad_clip).detach()
        self.optimizer.step()
        if self.lipschitz is not None:
            logs["train/lipschitz_estimate"] = self.lipschitz
            logs["train/one_sided_lipschitz_estimate"] = self.one_sided
        return logs


def held_out_reconstruction(policy: FlowPolicy, data: ChunkDataset, k: int, inversion_steps: int = 64,
                            reference: FlowPolicy | None = None, batch: int = 4096) -> float:
    """Mean squared error (normalised units) of decoding each demonstration chunk's latent with K = ``k``
    steps; latents from inverting ``reference`` (the pretrained policy) with many steps, so every
    policy compared is scored on the same latents."""
    reference = reference or policy
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch):
            idx = torch.arange(start, min(start + batch, len(data)), device=policy.obs_mean.device)
            obs, actions = data.batch(idx)
            x1 = policy.normalize_action(actions)
            x0 = invert(reference, obs, x1, inversion_steps)
            decoded = euler_sample(policy.velocity_fn(policy.encode(obs), k), x0, k)
            total += float((decoded - x1).square().sum())
            count += x1.numel()
    return total / max(count, 1)


__all__ = ["MLEConfig", "MLEFineTuning", "held_out_reconstruction", "invert", "jacobian_bounds", "residual_gain_min"]
