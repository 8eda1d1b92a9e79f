"""Rolling a chunk policy out in batched envs: observation histories and whole episodes.

A chunk policy is anything that maps an observation history and (optionally) its initial noise to
an action chunk in env units (:class:`ChunkPolicy`): a flow policy at a fixed K
(:class:`FlowChunkPolicy`), an expert, the deploy runtime, an exported model. Evaluation,
demonstration collection and fine-tuning all step envs through :meth:`BatchedEnv.step_chunk`, so an
episode that ends inside a chunk starts its successor from the reset state at the chunk boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from flowrl.envs import BatchedEnv, ChunkResult
from flowrl.policy import FlowPolicy


class ObsHistory:
    """The last ``length`` observations of every env, (N, length, *shape): state vectors, or one
    camera's images; a new episode's history is its first observation repeated (as the chunked
    datasets pad it)."""

    def __init__(self, first_obs: torch.Tensor, length: int) -> None:
        self.buffer = first_obs.unsqueeze(1).repeat(1, length, *[1] * (first_obs.dim() - 1))

    def _rows(self, mask: torch.Tensor) -> torch.Tensor:
        """An (N,) mask shaped to select whole histories."""
        return mask.view(-1, *[1] * (self.buffer.dim() - 1))

    def push(self, obs: torch.Tensor, new_episode: torch.Tensor) -> None:
        """Append ``obs``; envs that just started a new episode forget their old history."""
        self.buffer = torch.cat([self.buffer[:, 1:], obs.unsqueeze(1).to(self.buffer.dtype)], dim=1)
        if bool(new_episode.any()):
            fresh = obs.unsqueeze(1).to(self.buffer.dtype).expand_as(self.buffer)
            self.buffer = torch.where(self._rows(new_episode), fresh, self.buffer)

    def push_chunk(self, result: ChunkResult) -> torch.Tensor:
        """Take in the observations of a chunk (``result.step_obs`` is needed for histories longer
        than one). Returns every env's history at its last observation of the chunk (the final one of
        an episode that ended: what a truncated episode is bootstrapped from); envs whose episode
        ended start their next with ``result.obs``."""
        return self.push_steps(result.obs, result.final_obs, result.step_obs, result.valid, result.done)

    def push_steps(self, obs: torch.Tensor, final_obs: torch.Tensor, step_obs: torch.Tensor | None,
                   valid: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """:meth:`push_chunk` from its parts: the observations at the chunk boundary (a new episode's
        first where ``done``), at each env's last valid step, after each step (N, T, *shape; needed for
        histories longer than one), the (N, T) valid steps and the (N,) ended episodes."""
        if self.buffer.shape[1] == 1:
            final = final_obs.unsqueeze(1).to(self.buffer.dtype)
        else:
            if step_obs is None:
                raise ValueError("histories longer than one observation need step_chunk(..., record_obs=True)")
            final = self.buffer
            for j in range(step_obs.shape[1]):
                pushed = torch.cat([final[:, 1:], step_obs[:, j:j + 1].to(final.dtype)], dim=1)
                final = torch.where(self._rows(valid[:, j]), pushed, final)
        fresh = obs.unsqueeze(1).to(self.buffer.dtype).expand_as(self.buffer)
        self.buffer = torch.where(self._rows(done), fresh, final)
        return final

    def get(self) -> torch.Tensor:
        return self.buffer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"buffer": self.buffer.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.buffer = state["buffer"].to(self.buffer.device, self.buffer.dtype)


@runtime_checkable
class ChunkPolicy(Protocol):
    """Observation history + initial noise -> action chunk.

    A policy that also sees camera images has ``cameras`` (names) and ``image_size`` attributes and
    takes ``images={camera: (N, obs_history, image_size, image_size, 3) uint8}`` in ``act_chunk``;
    :func:`run_episodes` renders them (cpu backend)."""

    obs_history: int
    """How many past observations it reads (the current one included)."""
    act_steps: int
    """How many actions of each chunk are executed before it is asked again."""

    def act_chunk(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(N, obs_history, obs_dim) observations -> (N, >= act_steps, act_dim) env-unit actions; without
        ``noise`` the policy draws its own."""
        ...


@dataclass
class FlowChunkPolicy:
    """A flow policy's deterministic sampler at K = ``k`` Euler steps, as a :class:`ChunkPolicy`; initial
    noise is drawn from ``generator`` when not given. Pixel policies take the rendered images too."""

    policy: FlowPolicy
    k: int
    generator: torch.Generator | None = None

    @property
    def obs_history(self) -> int:
        return self.policy.cfg.obs_history

    @property
    def act_steps(self) -> int:
        return self.policy.cfg.act_steps

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(self.policy.cfg.cameras or ())

    @property
    def image_size(self) -> int:
        return self.policy.cfg.image_size

    def act_chunk(self, obs: torch.Tensor, noise: torch.Tensor | None = None,
                  images: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.policy.predict(obs, self.k, noise, self.generator, images)


class CameraObserver:
    """Image histories of ``cameras`` for every env of ``env``, rendered (cpu backend: OpenGL; warp:
    MuJoCo Warp's batched ray tracer) at each decision and, for histories longer than one, after every
    step in between: what a pixel policy sees. With ``finals`` also the last images of each episode cut
    at the horizon inside a chunk, before its reset (what a truncated episode is bootstrapped from)."""

    def __init__(self, env: BatchedEnv, cameras: tuple[str, ...] | list[str], size: int, length: int,
                 device: str | torch.device | None = None, finals: bool = False) -> None:
        from flowrl.envs.cameras import camera_renderer

        self.renderer = camera_renderer(env, list(cameras), size, size)
        self.length, self.device, self.finals = length, device, finals
        self.in_chunk = bool(getattr(self.renderer, "captures_in_chunk", False))  # robosuite's workers
        if self.in_chunk:
            self.renderer.capture(every_step=length > 1)
        self.histories: dict[str, ObsHistory] = {}
        self._steps: list[dict[str, torch.Tensor]] = []
        self._final: dict[str, torch.Tensor] = {}
        self.restart()

    def _render(self, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        images = self.renderer.render(ids)
        return images if self.device is None else {c: x.to(self.device) for c, x in images.items()}

    def restart(self) -> None:
        """Histories of the envs' current states alone (a start, or a resumed simulation)."""
        self.histories = {c: ObsHistory(img, self.length) for c, img in self._render().items()}
        self._steps, self._final = [], {}

    def get(self) -> dict[str, torch.Tensor]:
        return {c: h.get() for c, h in self.histories.items()}

    def step_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`BatchedEnv.step_chunk` that feed this observer: its
        ``after_step`` hook, except where the env returns the chunk's images itself or nothing between
        decisions is needed."""
        if self.in_chunk or (self.length == 1 and not self.finals):
            return {}
        return {"after_step": self.after_step}

    def after_step(self, j: int, terminated: torch.Tensor, truncated: torch.Tensor) -> None:
        """:meth:`BatchedEnv.step_chunk`'s hook: every env's images after each step (histories longer
        than one), else (``finals``) those of the envs whose episode was just cut at the horizon."""
        if self.length > 1:
            self._steps.append(self._render())
        elif self.finals and bool(truncated.any()):
            ids = truncated.nonzero().flatten().cpu()
            for c, image in self._render(ids).items():
                if c not in self._final:
                    self._final[c] = torch.zeros_like(self.histories[c].get()[:, 0])
                self._final[c][ids.to(image.device)] = image

    def push_chunk(self, result: ChunkResult, envs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Render the chunk boundary (``envs``: only these, the rest left black) and take in the chunk;
        returns each camera's history at every env's last step of the chunk (as
        :meth:`ObsHistory.push_chunk`)."""
        ids = None if envs is None else envs.nonzero().flatten().cpu()
        boundary = self._render(ids)
        if self.in_chunk:  # robosuite's workers sent the chunk's images with it
            steps = result.info.get("step_images")
            final_images = result.info.get("final_images", {})
        else:
            steps = {c: torch.stack([s[c] for s in self._steps], dim=1) for c in self.histories} if self._steps else None
            final_images = self._final
        self._steps, self._final = [], {}
        finals = {}
        for c, history in self.histories.items():
            dev = history.get().device
            valid, done = result.valid.to(dev), result.done.to(dev)
            now = boundary[c]
            if ids is not None:
                now = history.get().new_zeros(history.get()[:, 0].shape)
                now[ids.to(dev)] = boundary[c]
            final = now if c not in final_images else torch.where(done.view(-1, 1, 1, 1), final_images[c].to(dev), now)
            finals[c] = history.push_steps(now, final, None if steps is None else steps[c].to(dev), valid, done)
        return finals

    def close(self) -> None:
        self.renderer.close()


ChunkCallback = Callable[[torch.Tensor, torch.Tensor, ChunkResult, torch.Tensor], "torch.Tensor | None"]
"""``(obs at the chunk start (N, obs_dim), executed actions (N, T, act_dim), result, active (N,))``;
may return an (N, T) bool mask of steps after which the caller ends the episode (e.g. a
demonstration cut some steps after its success)."""


StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]
""":meth:`BatchedEnv.step_chunk`'s ``after_step(j, terminated, truncated)``: after every step, before any reset."""


def run_episodes(env: BatchedEnv, policy: ChunkPolicy, seed: int, on_chunk: ChunkCallback | None = None,
                 record_obs: bool = False, after_step: StepHook | None = None) -> dict[str, np.ndarray]:
    """Run exactly one episode in each env of ``env`` (env i seeded ``seed + i``).

    Every env's first episode counts, whatever its length, so statistics are not biased towards
    short episodes. Returns per-env ``returns``, ``lengths``, ``success`` and ``has_success``.
    ``after_step`` runs after every step of every chunk (e.g. a video's frames of the states).
    """
    obs = env.reset(seed=seed)
    history = ObsHistory(obs, policy.obs_history)
    cameras = tuple(getattr(policy, "cameras", ()) or ())
    observer = CameraObserver(env, cameras, policy.image_size, policy.obs_history) if cameras else None  # type: ignore[attr-defined]
    try:
        return _run(env, policy, obs, history, observer, on_chunk, record_obs, after_step)
    finally:
        if observer is not None:
            observer.close()


def _both(first: StepHook, second: StepHook) -> StepHook:
    def hook(j: int, terminated: torch.Tensor, truncated: torch.Tensor) -> None:
        first(j, terminated, truncated)
        second(j, terminated, truncated)

    return hook


def _run(env: BatchedEnv, policy: ChunkPolicy, obs: torch.Tensor, history: ObsHistory,
         observer: CameraObserver | None, on_chunk: ChunkCallback | None, record_obs: bool,
         after_step: StepHook | None) -> dict[str, np.ndarray]:
    n = env.num_envs
    dev = obs.device
    active = torch.ones(n, dtype=torch.bool, device=dev)
    returns = torch.zeros(n, dtype=torch.float64, device=dev)
    lengths = torch.zeros(n, dtype=torch.int64, device=dev)
    success = torch.zeros(n, dtype=torch.bool, device=dev)
    has_success = False
    while bool(active.any()):
        if observer is None:
            chunk = policy.act_chunk(history.get())[:, :policy.act_steps]
        else:
            chunk = policy.act_chunk(history.get(), images=observer.get())[:, :policy.act_steps]  # type: ignore[call-arg]
        hook = observer.step_kwargs() if observer else {}
        if after_step is not None:
            hook["after_step"] = _both(hook["after_step"], after_step) if "after_step" in hook else after_step
        result = env.step_chunk(chunk, record_obs=record_obs or policy.obs_history > 1, **hook)
        valid = result.valid & active.unsqueeze(1)
        ended = None
        if on_chunk is not None:
            ended = on_chunk(obs, chunk, result, active.clone())
        if ended is not None:
            ended = ended.to(dev) & valid
            valid &= (ended.long().cumsum(1) - ended.long()) == 0  # steps up to the first end
        returns += (result.rewards * valid).sum(1)
        lengths += valid.sum(1)
        if result.success is not None:
            has_success = True
            success |= (result.success & valid).any(1)
        done = result.done if ended is None else result.done | ended.any(1)
        active &= ~done
        history.push_chunk(result)
        if observer is not None:
            observer.push_chunk(result, active)  # envs done with their one episode are not rendered again
        obs = result.obs
    return {"returns": returns.cpu().numpy(), "lengths": lengths.cpu().numpy(),
            "success": success.cpu().numpy(), "has_success": np.array(has_success)}
