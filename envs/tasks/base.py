"""The task object the MuJoCo backends (cpu, warp) run, and the random draws its reset distribution reads.

A :class:`MujocoTask` is a :class:`flowrl.envs.registry.Task` that also holds everything about the task
except how physics is stepped: the model it loads, its substeps per env step, its reset distribution,
observation, reward, termination and success, and an optional per-substep controller (a policy action
becomes a goal once per env step; the controller turns it into actuator inputs at every physics
substep, as robosuite's OSC does). Backends hand it the simulation state as (N, ...) torch tensors and
never define task logic.

The reset distribution is written once, in torch, against :class:`Draws`: :class:`NumpyDraws` takes
every draw from each env's own numpy generator in the order the code asks for them (so a task that
asks in gymnasium's order reproduces gymnasium's initial states bit for bit), :class:`TorchDraws`
takes them for all envs at once from one torch generator on the simulation's device (autoresets on
the GPU). A task whose model differs between episodes (robosuite rebuilds some of its models at every reset)
draws those model fields first (:meth:`MujocoTask.reset_model`); backends keep them per world.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mujoco
import numpy as np
import torch

from flowrl.envs.controllers.base import Controller, State
from flowrl.envs.registry import Task
from flowrl.errors import FlowrlError

ModelFields = dict[str, tuple[tuple[int, ...], torch.Tensor]]
"""Per-world values of MjModel fields: field name -> (the ids of the elements set, (n, len(ids), ...) values in
MjModel's layout of one element)."""

SETTOTALMASS_DEPRECATED = "compiler attribute 'settotalmass' is deprecated"
"""The start of MuJoCo 4's warning about gymnasium's half_cheetah.xml (``<compiler settotalmass=...>``)."""


@contextmanager
def quiet_settotalmass() -> Iterator[None]:
    """While inside, MuJoCo's warning that the compiler attribute ``settotalmass`` is deprecated is
    dropped. Gymnasium's HalfCheetah model sets it and MuJoCo 4 warns at every compile of that model,
    on the C library's stdout (into ``--json`` output too) with nothing a user can change; the model
    still compiles to the same masses. Any other MuJoCo warning goes on to the handler that was
    installed before, or to stderr as ``WARNING: ...`` when there was none (MuJoCo's default)."""
    previous = mujoco.get_mju_user_warning()

    def handler(message: str) -> None:
        if message.startswith(SETTOTALMASS_DEPRECATED):
            return
        if previous is not None:
            previous(message)
        else:
            print(f"WARNING: {message}", file=sys.stderr)

    mujoco.set_mju_user_warning(handler)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


class Draws:
    """Random draws for ``n`` envs at once, as (n, *size) tensors in :attr:`dtype` on :attr:`device`."""

    n: int
    dtype: torch.dtype
    device: torch.device

    def uniform(self, low: float, high: float, size: tuple[int, ...] = ()) -> torch.Tensor:
        raise NotImplementedError

    def normal(self, size: tuple[int, ...] = ()) -> torch.Tensor:
        """Standard normal draws."""
        raise NotImplementedError

    def first_accepted(self, propose: Callable[["Draws"], tuple[torch.Tensor, ...]],
                       accept: Callable[[tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor],
                       what: str) -> tuple[torch.Tensor, ...]:
        """Rejection sampling: per env, the first proposal ``accept`` keeps. ``propose(draws)`` returns (m,)
        tensors from ``draws`` (m of its envs); ``accept(proposal, rows)`` says which to keep, ``rows`` (m,)
        being the env each proposal belongs to (to index per-env tensors). ``what`` names it in errors."""
        raise NotImplementedError

    def tensor(self, value: Any) -> torch.Tensor:
        """``value`` as a tensor in the draws' dtype and device (for constants of the distribution)."""
        return torch.as_tensor(value, dtype=self.dtype, device=self.device)


class NumpyDraws(Draws):
    """Each env's draws from its own numpy generator, in the order they are asked for (float64, CPU).
    Rejection sampling redraws an env's proposal until it is accepted, at most ``tries`` times."""

    def __init__(self, rngs: Sequence[np.random.Generator], tries: int = 5000) -> None:
        self.rngs, self.n, self.tries = list(rngs), len(rngs), tries
        self.dtype, self.device = torch.float64, torch.device("cpu")

    def _stack(self, values: list[np.ndarray]) -> torch.Tensor:
        return torch.as_tensor(np.stack(values) if values else np.zeros(0), dtype=torch.float64)

    def uniform(self, low: float, high: float, size: tuple[int, ...] = ()) -> torch.Tensor:
        return self._stack([np.asarray(r.uniform(low=low, high=high, size=size)) for r in self.rngs])

    def normal(self, size: tuple[int, ...] = ()) -> torch.Tensor:
        return self._stack([np.asarray(r.standard_normal(size)) for r in self.rngs])

    def first_accepted(self, propose, accept, what):
        pending = torch.arange(self.n)
        out: tuple[torch.Tensor, ...] | None = None
        for _ in range(self.tries):
            proposal = propose(NumpyDraws([self.rngs[i] for i in pending.tolist()], self.tries))
            if out is None:
                out = tuple(torch.empty((self.n, *p.shape[1:]), dtype=p.dtype) for p in proposal)
            ok = accept(proposal, pending)
            for o, p in zip(out, proposal):
                o[pending[ok]] = p[ok]
            pending = pending[~ok]
            if len(pending) == 0:
                return out
        raise FlowrlError(f"cannot place {what}: no draw in {self.tries} was accepted")


class TorchDraws(Draws):
    """Every env's draws at once from one torch generator on ``device``. Rejection sampling draws
    ``candidates`` proposals per env at once and keeps the first accepted: the same distribution unless all
    of an env's are rejected. Then, on the CPU, it is an error naming what could not be placed; on a GPU the
    first proposal is kept, since checking would stall every batched autoreset on a read-back (for the
    shipped tasks' acceptance rates, 64 rejections in a row do not happen in practice)."""

    def __init__(self, gen: torch.Generator, n: int, device: torch.device, dtype: torch.dtype,
                 candidates: int = 64) -> None:
        self.gen, self.n, self.device, self.dtype, self.candidates = gen, n, torch.device(device), dtype, candidates

    def uniform(self, low: float, high: float, size: tuple[int, ...] = ()) -> torch.Tensor:
        u = torch.rand((self.n, *size), generator=self.gen, device=self.device, dtype=self.dtype)
        return low + (high - low) * u

    def normal(self, size: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.randn((self.n, *size), generator=self.gen, device=self.device, dtype=self.dtype)

    def first_accepted(self, propose, accept, what):
        k = self.candidates
        proposal = propose(TorchDraws(self.gen, self.n * k, self.device, self.dtype, k))
        rows = torch.arange(self.n, device=self.device).repeat_interleave(k)
        ok = accept(proposal, rows).view(self.n, k)
        if self.device.type == "cpu" and not bool(ok.any(dim=1).all()):
            raise FlowrlError(f"cannot place {what}: none of {k} draws was accepted")
        first = torch.argmax(ok.to(torch.uint8), dim=1)  # the first accepted (0 if none is)
        pick = torch.arange(self.n, device=self.device) * k + first
        return tuple(p[pick] for p in proposal)


@dataclass(frozen=True, kw_only=True, eq=False)
class MujocoTask(Task):
    """A task on a MuJoCo model, which the cpu and warp backends run; subclasses fill in the terms."""

    model: str
    """Path of the MuJoCo model (MJCF) the task loads."""
    frame_skip: int
    """Physics substeps per env step."""
    reset_noise_scale: float = 0.0
    derived_fields: tuple[str, ...] = ()
    """MjData fields beyond qpos/qvel the task reads (backends expose them in the state)."""
    needs_contact_forces: bool = False
    """The task reads ``cfrc_ext`` after each step (backends run ``mj_rnePostConstraint``)."""
    solver: str | None = None
    """Override of the model's solver (``newton`` for MuJoCo Warp, which lacks PGS)."""

    velocity_noise_normal = False
    """Reset velocities are ``scale * N(0, 1)`` instead of ``U(-scale, scale)``."""

    observation_memory_dim = 0
    """Width of what an observation remembers of the previous env step (:meth:`observation_memory`); 0: the
    observation is a function of the current state alone."""

    def load_model(self) -> mujoco.MjModel:
        with quiet_settotalmass():
            model = mujoco.MjModel.from_xml_path(self.model)
        if self.solver == "newton":
            model.opt.solver = int(mujoco.mjtSolver.mjSOL_NEWTON)
        return model

    def dt(self, model: mujoco.MjModel) -> float:
        return float(model.opt.timestep) * self.frame_skip

    def controller(self, model: mujoco.MjModel, num_envs: int, device: torch.device,
                   dtype: torch.dtype) -> Controller | None:
        """The per-substep controller, or None when the action is the actuator input (clipped to ctrlrange)."""
        return None

    def action_bounds(self, model: mujoco.MjModel) -> tuple[np.ndarray, np.ndarray]:
        """The policy action's bounds: the actuators' ctrlrange unless a controller says otherwise."""
        low, high = model.actuator_ctrlrange.T
        return low.copy(), high.copy()

    # -- reset distribution --------------------------------------------------------------------
    varied_model_fields = ()
    """Names of the MjModel fields :meth:`reset_model` draws per episode (backends keep them per world); empty:
    every world runs the loaded model."""

    def reset_model(self, draws: Draws) -> ModelFields:
        """The values of :attr:`varied_model_fields` for ``draws.n`` fresh episodes (none by default). Backends call
        it before :meth:`reset`, with the same draws (its draws come first), and write them into the reset worlds'
        models."""
        return {}

    def reset(self, draws: Draws, qpos0: torch.Tensor, nv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(qpos (n, nq), qvel (n, nv)) of ``draws.n`` fresh episodes; ``qpos0`` is the model's (in the draws'
        dtype and device). gymnasium's: qpos0 plus uniform noise, then the velocities' noise."""
        s = self.reset_noise_scale
        qpos = qpos0 + draws.uniform(-s, s, (len(qpos0),))
        qvel = s * draws.normal((nv,)) if self.velocity_noise_normal else draws.uniform(-s, s, (nv,))
        return qpos, qvel

    # -- terms ---------------------------------------------------------------------------------
    def tracked(self, s: State, model_info: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) quantity whose change over a step the reward uses (locomotion: the forward position).
        Backends keep it from the previous step and hand both values to :meth:`reward_and_termination`."""
        return torch.zeros_like(s["qpos"][:, 0])

    def observation(self, s: State, memory: torch.Tensor | None = None) -> torch.Tensor:
        """(N, obs_dim). ``memory`` (tasks with ``observation_memory_dim`` > 0; the others may leave it out of
        their signature): :meth:`observation_memory` of the previous env step, all zeros in the rows of envs at
        the first step of an episode; None (a caller without a previous step) reads the current state instead."""
        raise NotImplementedError

    def observation_memory(self, s: State) -> torch.Tensor | None:
        """(N, observation_memory_dim) of the current state that the next env step's observation reads
        (robosuite's observation cache); backends keep it between steps, zero it at resets and save it with
        their full state."""
        return None

    def reward_and_termination(self, s: State, before: torch.Tensor, after: torch.Tensor, dt: float,
                               action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward, terminated) of the step just taken; ``before``/``after`` are :meth:`tracked`."""
        raise NotImplementedError

    def success(self, s: State) -> torch.Tensor | None:
        """(N,) bool, for tasks that define success; None otherwise."""
        return None
