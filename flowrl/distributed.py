"""Data-parallel training across the processes ``torchrun`` starts (torch.distributed: NCCL between GPUs,
gloo between CPU processes).

Under ``torchrun --nproc-per-node N`` (or a launcher that sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) every rank builds the same agent; :func:`init_from_env` joins the
process group and :func:`current` says which rank this is. Rank 0 alone writes the run folder
(config, TensorBoard, checkpoints, ``eval.json``) and runs the evaluations; every rank reads a checkpoint
to resume (a filesystem all ranks see), so a run saved by N ranks resumes on M.

Gradients are averaged explicitly after each backward pass (one all-reduce of the flattened gradients,
which is what DistributedDataParallel computes): the agents call the policy's ``encode`` and ``velocity``
directly (the Euler chain, the shortcut targets), not ``forward``, so DDP's forward hooks would not see
those calls. Parameters start equal (the same seed, then a broadcast from rank 0) and stay equal.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from flowrl.errors import FlowrlError

TIMEOUT_ENV = "FLOWRL_DIST_TIMEOUT_MINUTES"
"""Minutes a rank waits in a collective before the run fails (default 120: rank 0's evaluations, which the
others wait for, can take minutes with robosuite's workers)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run (``world_size`` 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: writes files, evaluates, prints."""
        return self.rank == 0

    def share(self, total: int, key: str) -> int:
        """This rank's equal share of ``total`` (envs, a batch), which config key ``key`` sets."""
        if total % self.world_size:
            raise FlowrlError(f"config: {key} {total} is not divisible by the {self.world_size} ranks (each takes "
                              "an equal share)")
        return total // self.world_size

    def group_moments(self, groups: list[torch.Tensor], unbiased: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, variance, count)`` of each group's elements over every rank's share of that group, (M,)
        each: one all-reduce of the sums for all groups (alone, torch's own mean and variance per group)."""
        if not self.active:
            return (torch.stack([g.mean() for g in groups]), torch.stack([g.var(unbiased=unbiased) for g in groups]),
                    torch.tensor([g.numel() for g in groups]))
        s = self.sum(torch.stack([torch.stack([g.sum(), g.square().sum(), g.new_tensor(float(g.numel()))])
                                  for g in groups]))
        n = s[:, 2]
        mean = s[:, 0] / n
        var = ((s[:, 1] - n * mean.square()) / (n - 1 if unbiased else n)).clamp_min(0.0)
        return mean, var, n

    def moments(self, x: torch.Tensor, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(mean, variance, count)`` of the elements of ``x`` over every rank's ``x``."""
        mean, var, n = self.group_moments([x], unbiased)
        return mean[0], var[0], int(n[0])

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (parameters without a gradient are left alone:
        the same ones on every rank, since all ranks run the same computation)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, values: dict[str, float | None]) -> dict[str, float | None]:
        """Per-key means over the ranks of scalar statistics (for logging). Every rank passes the same keys;
        a None (nothing measured on that rank) is left out of its key's mean (None where no rank has one)."""
        if not self.active or not values:
            return values
        keys = sorted(values)
        pairs = [(0.0, 0.0) if values[k] is None else (float(values[k]), 1.0) for k in keys]  # type: ignore[arg-type]
        t = torch.tensor(pairs, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return {k: (float(s) / c if c else None) for k, (s, c) in zip(keys, t.tolist())}

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over the ranks (a new tensor; the input itself when alone)."""
        if not self.active:
            return tensor
        out = tensor.to(self._device(), copy=True)  # NCCL reduces CUDA tensors only
        dist.all_reduce(out)
        return out.to(tensor.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (a stop, a time limit reached first on one rank)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        if not self.active:
            return
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_current = Dist()


def current() -> Dist:
    """The data-parallel context of this process (rank 0 of 1 unless :func:`init_from_env` joined a group)."""
    return _current


def init_from_env(device: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment (a no-op without ``WORLD_SIZE`` > 1):
    NCCL when ``device`` is (or ``auto`` resolves to) CUDA, else gloo; on CUDA each rank takes GPU
    ``LOCAL_RANK``. Returns :func:`current`."""
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _current.active:
        return _current
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as err:
        raise FlowrlError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are missing or not integers ({err}): start "
                          "distributed runs with torchrun") from None
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise FlowrlError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local_rank)
    minutes = float(os.environ.get(TIMEOUT_ENV, "120"))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=minutes))
    _current = Dist(rank, world, local_rank)
    return _current


def shutdown() -> None:
    """Leave the process group (end of a distributed run)."""
    global _current
    if _current.active and dist.is_initialized():
        dist.destroy_process_group()
    _current = Dist()


def rank_device(device: torch.device) -> torch.device:
    """A rank's own GPU when ``device`` is CUDA without an index (every rank on its ``LOCAL_RANK``)."""
    if _current.active and device.type == "cuda" and device.index is None:
        return torch.device("cuda", _current.local_rank)
    return device


__all__ = ["Dist", "current", "init_from_env", "rank_device", "shutdown"]
