"""The deploy runtime: one policy object for a controller, whatever runs the network.

:func:`load` takes a checkpoint folder (run eagerly in torch), an ONNX file (ONNX Runtime) or a
torch.export ``.pt2`` program, and returns a :class:`DeployedPolicy`:

- ``reset(seed)`` forgets the observation history and the queued actions and reseeds the
  generator of the initial noise, so two policies reset with one seed draw the same noise
  whatever their backend (the closed-loop equality of exports rests on this);
- ``act(obs)`` takes one observation, keeps the last ``obs_history`` of them, and returns the next
  action: receding horizon (a chunk is computed when the queue is empty and its first
  ``act_steps`` actions are queued), or with ``temporal_ensemble=m`` ACT's temporal ensembling (a
  chunk every step; the action for step t is the average of every chunk's prediction for t,
  weighted ``exp(-m i)`` with i = 0 the oldest prediction; ACT uses m = 0.01);
- ``act_chunk(obs_history, noise=None)`` is the stateless batch call, so the policy is a
  :class:`flowrl.rollout.ChunkPolicy` (``run_episodes``, ``Evaluator.run``).

The runtime feeds state only: a pixel policy (one that sees camera images) is refused by :func:`load`
with a one-line error, whether a checkpoint or an export; run a pixel export's graph with its image
inputs directly (:func:`make_backend` takes them).

ONNX Runtime runs with one intra-op and one inter-op thread and sequential execution by default:
its default pool (a thread per core, spinning) starves a control loop sharing the cores and makes
p99 latency jump.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from flowrl.config import renamed_argument
from flowrl.deploy._deps import require
from flowrl.errors import FlowrlError


class Backend(Protocol):
    """(obs (B, obs_history, obs_dim) float32, noise (B, horizon, act_dim) float32) -> actions, env units.

    A pixel policy's backend also takes ``images`` ``{camera: (B, obs_history, H, W, 3) uint8}``; the
    runtime itself never passes them (it feeds state only)."""

    def __call__(self, obs: np.ndarray, noise: np.ndarray,
                 images: dict[str, np.ndarray] | None = None) -> np.ndarray: ...


BACKENDS = ("eager", "onnx", "torch-export")
ACT_ENSEMBLE_M = 0.01
"""ACT's temporal-ensembling coefficient: weights exp(-m i), the oldest prediction i = 0."""


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for one call and restored after (it is process-wide;
    a toggle costs under a microsecond). A pool of one thread per core starves the rest of a controller
    and, on a loaded machine, makes small-network latency jump by orders of magnitude."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def onnx_session(path: str | Path, intra_op_threads: int = 1, inter_op_threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with a fixed, small thread count and sequential execution."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads == 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unreadable models
        raise FlowrlError(f"{path}: ONNX Runtime cannot load it ({str(e).strip().splitlines()[0]})") from None


def _image_arrays(images: dict[str, np.ndarray] | None, cameras: Sequence[str]) -> list[np.ndarray]:
    """The images of an export's graph inputs, one uint8 array per camera in the export's order."""
    if not cameras:
        if images:
            raise FlowrlError(f"this export is state only; it takes no images (got {', '.join(images)})")
        return []
    missing = [c for c in cameras if images is None or c not in images]
    if images is None or missing:
        raise FlowrlError(f"this export sees camera(s) {', '.join(cameras)}; images of {', '.join(missing)} "
                          "are missing")
    arrays = [np.ascontiguousarray(images[c]) for c in cameras]
    bad = [f"{c} ({a.dtype})" for c, a in zip(cameras, arrays) if a.dtype != np.uint8]
    if bad:
        raise FlowrlError(f"images must be uint8 RGB; got {', '.join(bad)}")
    return arrays


def make_backend(path: str | Path, fmt: str, threads: int = 1, cameras: Sequence[str] = ()) -> Backend:
    """The inference function of an exported file (``fmt`` onnx or torch-export). A pixel export takes
    the images of ``cameras`` (its metadata's ``cameras``, in that order) besides ``obs`` and ``noise``."""
    from flowrl.deploy.meta import image_input_name

    cameras = tuple(cameras)
    if fmt == "onnx":
        session = onnx_session(path, threads, 1)
        names = [image_input_name(c) for c in cameras]

        def run_onnx(obs: np.ndarray, noise: np.ndarray, images: dict[str, np.ndarray] | None = None) -> np.ndarray:
            feeds = {"obs": obs, "noise": noise}
            if cameras or images:  # a state-only call does nothing more (at batch 1 it is a control loop's tick)
                feeds.update(zip(names, _image_arrays(images, cameras)))
            return session.run(["actions"], feeds)[0]

        return run_onnx
    if fmt == "torch-export":
        try:
            with torch_threads(threads):
                module = torch.export.load(str(path)).module()
        except Exception as e:  # a damaged archive raises zip, JSON or runtime errors
            raise FlowrlError(f"{path}: not a torch.export program ({str(e).strip().splitlines()[0]})") from None

        def run_program(obs: np.ndarray, noise: np.ndarray,
                        images: dict[str, np.ndarray] | None = None) -> np.ndarray:
            pixels = [torch.from_numpy(a) for a in _image_arrays(images, cameras)]
            with torch_threads(threads), torch.inference_mode():
                return module(torch.from_numpy(obs), torch.from_numpy(noise), *pixels).numpy()

        return run_program
    raise FlowrlError(f"unknown export format '{fmt}'; choose one of onnx, torch-export")


def eager_backend(policy: Any, k: int, threads: int = 1) -> Backend:
    """The checkpoint's own :meth:`FlowPolicy.predict` at K = ``k`` (the reference)."""

    def run_eager(obs: np.ndarray, noise: np.ndarray, images: dict[str, np.ndarray] | None = None) -> np.ndarray:
        pixels = None if images is None else {c: torch.from_numpy(np.ascontiguousarray(a)) for c, a in images.items()}
        with torch_threads(threads), torch.inference_mode():
            return policy.predict(torch.from_numpy(obs), k, torch.from_numpy(noise), images=pixels).numpy()

    return run_eager


def check_state_only(meta: dict[str, Any], where: str, exported: bool = True) -> None:
    """A one-line :class:`FlowrlError` when ``meta`` (an export's JSON, or a checkpoint's facts) describes a
    pixel policy: the runtime and the server feed observations only, never camera images."""
    cameras = meta.get("cameras") or []
    if not cameras:
        return
    from flowrl.deploy.meta import image_input_name

    names = meta.get("image_inputs") or [image_input_name(c) for c in cameras]
    size = meta.get("image_size")
    how = "run the exported graph" if exported else "`flowrl export` it and run the graph"
    raise FlowrlError(f"{where}: this policy sees camera images ({', '.join(cameras)}); the deploy runtime feeds "
                      f"state only: {how} with its image inputs ({', '.join(names)}: uint8 (batch, "
                      f"{meta.get('obs_history')}, {size}, {size}, 3)) in ONNX Runtime or torch directly")


class DeployedPolicy:
    """A policy for a controller: ``reset``, ``act`` and ``act_chunk`` over any backend (module doc).
    State only: ``meta`` of a pixel policy is refused."""

    def __init__(self, backend: Backend, meta: dict[str, Any], backend_name: str,
                 temporal_ensemble: float | None = None, seed: int = 0) -> None:
        check_state_only(meta, f"{backend_name} policy", exported=backend_name != "eager")
        self._run = backend
        self.meta = meta
        self.backend = backend_name
        self.obs_dim, self.act_dim = int(meta["obs_dim"]), int(meta["act_dim"])
        self.horizon, self.act_steps = int(meta["horizon"]), int(meta["act_steps"])
        self.obs_history, self.k = int(meta["obs_history"]), int(meta["k"])
        self.action_low = np.asarray(meta["action_low"], dtype=np.float32)
        self.action_high = np.asarray(meta["action_high"], dtype=np.float32)
        if temporal_ensemble is not None and not (temporal_ensemble >= 0.0):
            raise FlowrlError(f"temporal_ensemble must be a coefficient m >= 0, got {temporal_ensemble}")
        self.temporal_ensemble = temporal_ensemble
        self.inferred = False
        """Whether the last ``act`` call ran the network (the others pop the queue)."""
        self.reset(seed)

    # -- state ---------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> None:
        """Start a new episode: empty history and queue; reseed the noise generator (None: from the OS)."""
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        self._history: np.ndarray | None = None
        self._queue: list[np.ndarray] = []
        self._ensemble: list[tuple[int, np.ndarray]] = []  # (step the chunk was computed at, chunk)
        self._step = 0

    def draw_noise(self, batch: int) -> np.ndarray:
        """Initial noise (batch, horizon, act_dim) from the policy's seeded generator."""
        return torch.randn((batch, self.horizon, self.act_dim), generator=self.generator).numpy()

    # -- batch call ----------------------------------------------------------------------------
    def _obs_array(self, obs: Any) -> np.ndarray:
        arr = obs.detach().cpu().numpy() if isinstance(obs, torch.Tensor) else np.asarray(obs)
        if arr.ndim == 2 and self.obs_history == 1:
            arr = arr[:, None]
        want = (self.obs_history, self.obs_dim)
        if arr.ndim != 3 or tuple(arr.shape[1:]) != want:
            raise FlowrlError(f"observation history must be (batch, {want[0]}, {want[1]}), got {tuple(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.number):
            raise FlowrlError(f"observations must be numbers, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise FlowrlError("observations contain NaN or infinity")
        return arr

    def infer(self, obs_history: Any, noise: Any = None) -> np.ndarray:
        """(B, obs_history, obs_dim) -> (B, horizon, act_dim) float32 numpy chunks in env units;
        noise from the generator when not given."""
        obs = self._obs_array(obs_history)
        if noise is None:
            eps = self.draw_noise(obs.shape[0])
        else:
            eps = noise.detach().cpu().numpy() if isinstance(noise, torch.Tensor) else np.asarray(noise)
            want = (obs.shape[0], self.horizon, self.act_dim)
            if tuple(eps.shape) != want:
                raise FlowrlError(f"noise must be {want}, got {tuple(eps.shape)}")
            eps = np.ascontiguousarray(eps, dtype=np.float32)
        return self._run(obs, eps)

    def act_chunk(self, obs_history: Any, noise: Any = None) -> torch.Tensor:
        """:class:`flowrl.rollout.ChunkPolicy`: the chunks of :meth:`infer` as a torch tensor."""
        return torch.from_numpy(self.infer(obs_history, noise))

    # -- one robot, one step at a time ---------------------------------------------------------
    def push_observation(self, obs: Any) -> np.ndarray:
        """Add one observation (obs_dim,) to the history (the first of an episode fills it); returns
        the history (obs_history, obs_dim)."""
        o = obs.detach().cpu().numpy() if isinstance(obs, torch.Tensor) else np.asarray(obs)
        if o.shape != (self.obs_dim,):
            raise FlowrlError(f"act takes one observation of shape ({self.obs_dim},), got {tuple(o.shape)}")
        o = o.astype(np.float32)
        if self._history is None:
            self._history = np.repeat(o[None], self.obs_history, axis=0)
        else:
            self._history = np.concatenate([self._history[1:], o[None]], axis=0)
        return self._history

    def act(self, obs: Any) -> np.ndarray:
        """The next action (act_dim,) in env units for the current observation (obs_dim,)."""
        history = self.push_observation(obs)
        self.inferred = False
        if self.temporal_ensemble is None:
            if not self._queue:
                chunk = self.infer(history[None])[0]
                self._queue = list(chunk[:self.act_steps])
                self.inferred = True
            action = self._queue.pop(0)
        else:
            chunk = self.infer(history[None])[0]
            self.inferred = True
            t = self._step
            self._ensemble = [(s, c) for s, c in self._ensemble if t - s < self.horizon] + [(t, chunk)]
            preds = np.stack([c[t - s] for s, c in self._ensemble])  # oldest first
            w = np.exp(-self.temporal_ensemble * np.arange(len(preds)))
            action = (w[:, None] * preds).sum(0) / w.sum()
        self._step += 1
        return np.asarray(action, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "k": self.k, "horizon": self.horizon,
                "act_steps": self.act_steps, "obs_history": self.obs_history, "obs_dim": self.obs_dim,
                "act_dim": self.act_dim, "temporal_ensemble": self.temporal_ensemble, "task": self.meta.get("task")}


def _format_of(path: Path, meta: dict[str, Any]) -> str:
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".pt2":
        return "torch-export"
    fmt = meta.get("export_format")
    if fmt not in ("onnx", "torch-export"):
        raise FlowrlError(f"{path}: cannot tell its format (.onnx or .pt2, or export_format in its JSON)")
    return fmt


def load(path: str | Path, backend: str = "auto", k: int | None = None,
         temporal_ensemble: float | None = None, threads: int = 1, seed: int = 0, *,
         num_steps: int | None = None) -> DeployedPolicy:
    """A :class:`DeployedPolicy` from a checkpoint or run folder (``backend`` eager, K = ``k`` or the
    policy's own) or from an exported file (its backend, its K). ``threads``: ONNX Runtime's
    intra-op pool, torch's thread count during a call (default 1 for both). ``temporal_ensemble=m``
    turns on ACT's ensembling in ``act``. A pixel policy (checkpoint or export) is a one-line
    :class:`FlowrlError`: the runtime feeds state only. ``num_steps`` is the old name of ``k``."""
    k = renamed_argument("flowrl.deploy.load", "num_steps", "k", num_steps, k)
    path = Path(path)
    if backend not in ("auto", *BACKENDS):
        raise FlowrlError(f"unknown backend '{backend}'; choose one of auto, {', '.join(BACKENDS)}")
    if threads < 1:
        raise FlowrlError(f"threads must be >= 1, got {threads}")
    if path.is_dir():
        if backend not in ("auto", "eager"):
            raise FlowrlError(f"{path} is a checkpoint: it runs eagerly; for {backend}, `flowrl export` it first")
        from flowrl.checkpoint import load_policy, resolve_checkpoint
        from flowrl.deploy.meta import export_metadata

        policy, config = load_policy(resolve_checkpoint(path), "cpu")
        k = policy.cfg.k if k is None else int(k)
        if k < 1:
            raise FlowrlError(f"K must be >= 1, got {k}")
        meta = export_metadata(policy, config, k, "eager")
        check_state_only(meta, str(path), exported=False)
        return DeployedPolicy(eager_backend(policy, k, threads), meta, "eager", temporal_ensemble, seed)
    if not path.is_file():
        raise FlowrlError(f"policy not found: {path}")
    from flowrl.deploy.meta import read_metadata

    meta = read_metadata(path)
    check_state_only(meta, str(path))
    fmt = _format_of(path, meta)
    if backend not in ("auto", fmt):
        raise FlowrlError(f"{path} is a {fmt} export; it cannot run on the {backend} backend")
    if k is not None and int(k) != meta["k"]:
        raise FlowrlError(f"{path} was exported at K = {meta['k']}; re-export for K = {k}")
    return DeployedPolicy(make_backend(path, fmt, threads), meta, fmt, temporal_ensemble, seed)
