"""Demonstration datasets in HDF5: our layout, and readers for the layouts users already have.

Every reader returns :class:`Episodes`: flat arrays of all transitions plus episode boundaries.
Layouts, detected automatically:

- ``flowrl`` (ours): root attribute ``flowrl_format``; datasets ``observations`` (N, obs_dim),
  ``actions`` (N, act_dim), ``rewards``, ``terminated``, ``truncated`` (N,), ``episode_lengths``
  (E,); metadata as root attributes (task, spaces, the policy that made it, return statistics,
  the command that made it).
- ``d4rl``: flat ``observations``, ``actions``, ``rewards``, ``terminals``, ``timeouts``; an episode
  ends where ``terminals`` or ``timeouts`` is set (a trailing unfinished segment is an episode too).
- ``robomimic``: ``data/demo_i/{obs/<key>, actions, rewards, dones}``; observation keys are
  concatenated in sorted order unless ``obs_keys`` is given.
- ``minari``: ``episode_i/{observations (T+1), actions, rewards, terminations, truncations}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from flowrl.errors import FlowrlError
from flowrl.io import write_atomic

FORMAT_VERSION = 1
GZIP = {"compression": "gzip", "compression_opts": 4, "shuffle": True}  # lossless; shipped files stay small


@dataclass
class Episodes:
    """All transitions of a dataset, flat, with episode boundaries."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    episode_lengths: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = "flowrl"
    images: dict[str, np.ndarray] = field(default_factory=dict)
    """Camera images beside the observations: ``{camera: (transitions, H, W, 3) uint8}`` (robomimic's
    ``obs/<camera>_image``), when collected with cameras or read with ``cameras``."""

    @property
    def num_episodes(self) -> int:
        return len(self.episode_lengths)

    @property
    def num_transitions(self) -> int:
        return len(self.actions)

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.episode_lengths)[:-1]]).astype(np.int64)

    def episode_returns(self) -> np.ndarray:
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts) if self.num_episodes else np.zeros(0)

    def head(self, num_episodes: int) -> "Episodes":
        """The first ``num_episodes`` episodes."""
        if num_episodes <= 0 or num_episodes >= self.num_episodes:
            return self
        n = int(self.episode_lengths[:num_episodes].sum())
        return Episodes(self.observations[:n], self.actions[:n], self.rewards[:n], self.terminated[:n],
                        self.truncated[:n], self.episode_lengths[:num_episodes], dict(self.meta), self.format,
                        {c: im[:n] for c, im in self.images.items()})

    def tail(self, num_episodes: int) -> "Episodes":
        """The last ``num_episodes`` episodes (held out from a ``head`` of the rest)."""
        if num_episodes <= 0:
            raise ValueError(f"tail: num_episodes must be positive, got {num_episodes}")
        if num_episodes >= self.num_episodes:
            return self
        n = int(self.episode_lengths[-num_episodes:].sum())
        return Episodes(self.observations[-n:], self.actions[-n:], self.rewards[-n:], self.terminated[-n:],
                        self.truncated[-n:], self.episode_lengths[-num_episodes:], dict(self.meta), self.format,
                        {c: im[-n:] for c, im in self.images.items()})

    def info(self) -> dict[str, Any]:
        """The summary `flowrl data info` prints."""
        rets = self.episode_returns()
        cameras = {c: list(im.shape[1:]) for c, im in self.images.items()} or self.meta.get("cameras")
        return {
            "format": self.format,
            "episodes": self.num_episodes,
            "transitions": self.num_transitions,
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "return_mean": float(rets.mean()) if len(rets) else 0.0,
            "return_std": float(rets.std()) if len(rets) else 0.0,
            **({"cameras": cameras} if cameras else {}),
        }

    @staticmethod
    def from_list(episodes: list[dict[str, np.ndarray]], meta: dict[str, Any] | None = None) -> "Episodes":
        """From per-episode dicts with observations, actions, rewards, terminated, truncated (and
        ``images``: ``{camera: (T, H, W, 3) uint8}``, the same cameras in every episode)."""
        cat = lambda k, dt: np.concatenate([np.asarray(e[k], dtype=dt) for e in episodes])  # noqa: E731
        cameras = list(episodes[0].get("images", {})) if episodes else []
        images = {c: np.concatenate([np.asarray(e["images"][c], dtype=np.uint8) for e in episodes]) for c in cameras}
        return Episodes(cat("observations", np.float32), cat("actions", np.float32), cat("rewards", np.float32),
                        cat("terminated", bool), cat("truncated", bool),
                        np.array([len(e["actions"]) for e in episodes], dtype=np.int64), dict(meta or {}),
                        images=images)


# -- writing -----------------------------------------------------------------------------------
def write_dataset(path: str | Path, episodes: Episodes, meta: dict[str, Any] | None = None) -> None:
    """Write ``episodes`` in our layout, atomically (an existing file is replaced only on success)."""
    meta = {**episodes.meta, **(meta or {})}
    with np.errstate(invalid="ignore"):
        rets = episodes.episode_returns()

    def writer(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["flowrl_format"] = FORMAT_VERSION
            for key in ("observations", "actions", "rewards", "terminated", "truncated", "episode_lengths"):
                f.create_dataset(key, data=getattr(episodes, key), **GZIP)
            with np.errstate(invalid="ignore"):
                stats = {"return_mean": float(rets.mean()) if len(rets) else 0.0,
                         "return_std": float(rets.std()) if len(rets) else 0.0}
            attrs = {**meta, "num_episodes": episodes.num_episodes, "num_transitions": episodes.num_transitions,
                     **stats}
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v

    write_atomic(path, writer)


def write_robomimic(path: str | Path, episodes: Episodes, obs_layout: list[tuple[str, int]],
                    env_args: dict[str, Any]) -> None:
    """Write ``episodes`` in robomimic's layout (``data/demo_i/{obs/<key>, actions, rewards, dones}``,
    ``data.attrs["env_args"]`` as JSON, ``total``), atomically. ``obs_layout`` splits the flat
    observation into its keys; camera images go to ``obs/<camera>_image``, compressed, one chunk per image."""
    if sum(n for _, n in obs_layout) != episodes.obs_dim:
        raise FlowrlError(f"observation layout covers {sum(n for _, n in obs_layout)} dims, data has {episodes.obs_dim}")

    def put(group: h5py.Group, name: str, array: np.ndarray) -> None:
        # one compressed chunk per (small) per-demo array: with HDF5's newer file format such a dataset
        # needs no chunk index, so compression shrinks the file instead of growing it
        group.create_dataset(name, data=array, chunks=array.shape, **GZIP)

    def writer(tmp: Path) -> None:
        with h5py.File(tmp, "w", libver="latest") as f:
            data = f.create_group("data")
            data.attrs["total"] = episodes.num_transitions
            data.attrs["env_args"] = json.dumps(env_args)
            data.attrs["flowrl_meta"] = json.dumps(episodes.meta, default=str)  # how it was made; robomimic ignores it
            for i, (s0, n) in enumerate(zip(episodes.episode_starts, episodes.episode_lengths)):
                demo = data.create_group(f"demo_{i}")
                demo.attrs["num_samples"] = int(n)
                col = 0
                for key, size in obs_layout:
                    put(demo, f"obs/{key}", episodes.observations[s0:s0 + n, col:col + size])
                    col += size
                for camera, images in episodes.images.items():
                    frames = images[s0:s0 + n]
                    demo.create_dataset(f"obs/{camera}_image", data=frames, chunks=(1, *frames.shape[1:]), **GZIP)
                put(demo, "actions", episodes.actions[s0:s0 + n])
                put(demo, "rewards", episodes.rewards[s0:s0 + n])
                put(demo, "dones", episodes.terminated[s0:s0 + n].astype(np.int64))
            f.create_group("mask").create_dataset(
                "train", data=np.array([f"demo_{i}".encode() for i in range(episodes.num_episodes)]))

    write_atomic(path, writer)


# -- reading -----------------------------------------------------------------------------------
def detect_format(f: h5py.File) -> str:
    keys = set(f.keys())
    if "flowrl_format" in f.attrs:
        return "flowrl"
    if "data" in keys and isinstance(f["data"], h5py.Group) and any(k.startswith("demo") for k in f["data"]):
        return "robomimic"
    if any(k.startswith("episode_") for k in keys):
        return "minari"
    if {"observations", "actions"} <= keys and ("terminals" in keys or "timeouts" in keys):
        return "d4rl"
    shown = ", ".join(sorted(keys)[:8]) or "nothing"
    raise FlowrlError(f"unrecognised dataset layout (top level holds: {shown}); "
                      "expected flowrl, D4RL, robomimic or Minari")


def _array(f: h5py.Group, key: str, path: Path, dtype: Any = None) -> np.ndarray:
    if key not in f:
        raise FlowrlError(f"{path}: missing dataset '{f.name.rstrip('/')}/{key}'")
    try:
        arr = f[key][()]
    except Exception as e:
        raise FlowrlError(f"{path}: cannot read '{f.name.rstrip('/')}/{key}': {e}") from None
    return np.asarray(arr, dtype=dtype) if dtype is not None else np.asarray(arr)


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_flowrl(f: h5py.File, path: Path) -> Episodes:
    meta = {k: _attr(v) for k, v in f.attrs.items()}
    return Episodes(_array(f, "observations", path, np.float32), _array(f, "actions", path, np.float32),
                    _array(f, "rewards", path, np.float32), _array(f, "terminated", path, bool),
                    _array(f, "truncated", path, bool), _array(f, "episode_lengths", path, np.int64), meta)


def _read_d4rl(f: h5py.File, path: Path) -> Episodes:
    obs = _array(f, "observations", path, np.float32)
    n = len(obs)
    terminals = _array(f, "terminals", path, bool) if "terminals" in f else np.zeros(n, bool)
    timeouts = _array(f, "timeouts", path, bool) if "timeouts" in f else np.zeros(n, bool)
    ends = np.flatnonzero(terminals | timeouts) + 1
    if len(ends) == 0 or ends[-1] != n:
        ends = np.append(ends, n)
    lengths = np.diff(np.concatenate([[0], ends])).astype(np.int64)
    truncated = timeouts & ~terminals
    truncated[n - 1] |= not terminals[n - 1]
    meta = {k: _attr(v) for k, v in f.attrs.items()}
    return Episodes(obs, _array(f, "actions", path, np.float32), _array(f, "rewards", path, np.float32),
                    terminals, truncated, lengths, meta, "d4rl")


def _numbered(names: Any, prefix: str) -> list[str]:
    pattern = re.compile(rf"^{prefix}(\d+)$")
    found = [(int(m.group(1)), k) for k in names if (m := pattern.match(k))]
    return [k for _, k in sorted(found)]


def _low_dim_keys(group: Any) -> list[str]:
    """A group's observation keys without its images (robomimic's ``<camera>_image``, one H x W x C
    array per step)."""
    return sorted(k for k in group.keys() if not (k.endswith("_image") and group[k].ndim == 4))


def _obs_from(node: Any, path: Path, keys: list[str] | None) -> np.ndarray:
    """An observation array, or a group of arrays concatenated along the feature axis (images left out
    unless named)."""
    if isinstance(node, h5py.Dataset):
        arr = np.asarray(node[()], dtype=np.float32)
        return arr.reshape(len(arr), -1)
    names = keys or _low_dim_keys(node)
    parts = []
    for k in names:
        arr = _array(node, k, path, np.float32)
        parts.append(arr.reshape(len(arr), -1))
    return np.concatenate(parts, axis=1)


def _read_robomimic(f: h5py.File, path: Path, obs_keys: list[str] | None, cameras: list[str]) -> Episodes:
    episodes = []
    for name in _numbered(f["data"].keys(), "demo_"):
        demo = f["data"][name]
        if "obs" not in demo:
            raise FlowrlError(f"{path}: missing group 'data/{name}/obs'")
        actions = _array(demo, "actions", path, np.float32)
        t = len(actions)
        dones = _array(demo, "dones", path, bool) if "dones" in demo else np.zeros(t, bool)
        truncated = np.zeros(t, bool)
        truncated[-1] = not dones[-1]
        rewards = _array(demo, "rewards", path, np.float32) if "rewards" in demo else np.zeros(t, np.float32)
        images = {}
        for camera in cameras:
            key = f"{camera}_image"
            if key not in demo["obs"]:
                raise FlowrlError(f"{path}: missing dataset 'data/{name}/obs/{key}' (camera {camera}; the file has "
                                  f"{', '.join(k for k in demo['obs'] if k.endswith('_image')) or 'no images'})")
            images[camera] = np.asarray(demo["obs"][key][:t], dtype=np.uint8)
        episodes.append({"observations": _obs_from(demo["obs"], path, obs_keys)[:t], "actions": actions,
                         "rewards": rewards, "terminated": dones, "truncated": truncated, "images": images})
    if not episodes:
        raise FlowrlError(f"{path}: robomimic file holds no 'data/demo_N' groups")
    meta = {k: _attr(v) for k, v in f["data"].attrs.items()}
    first = f["data"][_numbered(f["data"].keys(), "demo_")[0]]["obs"]
    meta["obs_keys"] = obs_keys or _low_dim_keys(first)
    images = sorted(set(first.keys()) - set(_low_dim_keys(first)))
    if images:  # what the file offers (read with ``cameras``)
        meta["cameras"] = {k[: -len("_image")]: list(first[k].shape[1:]) for k in images}
    out = Episodes.from_list(episodes, meta)
    out.format = "robomimic"
    return out


def _read_minari(f: h5py.File, path: Path, obs_keys: list[str] | None) -> Episodes:
    episodes = []
    for name in _numbered(f.keys(), "episode_"):
        ep = f[name]
        actions = _array(ep, "actions", path, np.float32).reshape(len(ep["actions"]), -1)
        t = len(actions)
        if "observations" not in ep:
            raise FlowrlError(f"{path}: missing dataset '{name}/observations'")
        obs = _obs_from(ep["observations"], path, obs_keys)
        if len(obs) != t + 1:
            raise FlowrlError(f"{path}: '{name}/observations' has {len(obs)} rows; Minari stores T+1 = {t + 1}")
        episodes.append({"observations": obs[:t], "actions": actions,
                         "rewards": _array(ep, "rewards", path, np.float32),
                         "terminated": _array(ep, "terminations", path, bool),
                         "truncated": _array(ep, "truncations", path, bool)})
    if not episodes:
        raise FlowrlError(f"{path}: Minari file holds no 'episode_N' groups")
    out = Episodes.from_list(episodes, {k: _attr(v) for k, v in f.attrs.items()})
    out.format = "minari"
    return out


def read_dataset(path: str | Path, obs_keys: list[str] | None = None, cameras: list[str] | None = None) -> Episodes:
    """Read any supported layout; errors name the file and the offending key. ``cameras``: also read
    these cameras' images (robomimic files: ``obs/<camera>_image``) into ``Episodes.images``."""
    path = Path(path)
    if not path.is_file():
        raise FlowrlError(f"dataset not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FlowrlError(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None
    with f:
        fmt = detect_format(f)
        if cameras and fmt != "robomimic":
            raise FlowrlError(f"{path}: camera images are read from robomimic files; this one is {fmt}")
        try:
            if fmt == "flowrl":
                eps = _read_flowrl(f, path)
            elif fmt == "d4rl":
                eps = _read_d4rl(f, path)
            elif fmt == "robomimic":
                eps = _read_robomimic(f, path, obs_keys, list(cameras or []))
            else:
                eps = _read_minari(f, path, obs_keys)
        except FlowrlError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise FlowrlError(f"{path}: corrupt {fmt} dataset ({str(e).splitlines()[0]})") from None
    check_episodes(eps, path)
    return eps


def check_episodes(eps: Episodes, path: Path | str) -> None:
    """Shapes agree, lengths add up, and no value is NaN or infinite."""
    n = eps.num_transitions
    if eps.observations.ndim != 2 or eps.actions.ndim != 2:
        raise FlowrlError(f"{path}: observations and actions must be 2-D, got shapes "
                          f"{eps.observations.shape} and {eps.actions.shape}")
    for key in ("observations", "rewards", "terminated", "truncated"):
        if len(getattr(eps, key)) != n:
            raise FlowrlError(f"{path}: '{key}' has {len(getattr(eps, key))} rows but 'actions' has {n}")
    for camera, images in eps.images.items():
        if len(images) != n or images.ndim != 4 or images.shape[-1] != 3:
            raise FlowrlError(f"{path}: images of camera {camera} have shape {images.shape}, expected ({n}, H, W, 3)")
    if int(eps.episode_lengths.sum()) != n or (eps.episode_lengths <= 0).any():
        raise FlowrlError(f"{path}: episode lengths add up to {int(eps.episode_lengths.sum())}, not {n} transitions")
    for key in ("observations", "actions", "rewards"):
        arr = getattr(eps, key)
        bad = ~np.isfinite(arr)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise FlowrlError(f"{path}: '{key}' holds NaN or inf (first at row {row})")


def dataset_info(path: str | Path) -> dict[str, Any]:
    return read_dataset(path).info()


# -- chunking ----------------------------------------------------------------------------------
class ChunkDataset:
    """(observation history, action chunk) samples that never cross an episode boundary.

    Sample i starts at step s of an episode: its history is the observations at s-H+1..s, where
    steps before the episode's first are filled with that first observation; its chunk is the
    actions at s..s+horizon-1, so s runs only over steps with a full chunk inside the episode.
    Everything is held as torch tensors on ``device``; ``batch(idx)`` gathers without copying loops,
    and ``batch_images(idx)`` the same history steps' camera images (``cameras``).
    """

    def __init__(self, episodes: Episodes, obs_history: int, horizon: int, device: str | torch.device = "cpu",
                 cameras: list[str] | tuple[str, ...] = ()) -> None:
        starts = episodes.episode_starts
        ends = starts + episodes.episode_lengths
        begin, hist, chunk = [], [], []
        for s0, e0 in zip(starts, ends):
            steps = np.arange(s0, e0 - horizon + 1)
            if len(steps) == 0:
                continue
            begin.append(steps)
            hist.append(np.maximum(steps[:, None] - np.arange(obs_history - 1, -1, -1)[None, :], s0))
            chunk.append(steps[:, None] + np.arange(horizon)[None, :])
        if not begin:
            raise FlowrlError(f"no episode is at least horizon={horizon} steps long")
        self.device = torch.device(device)
        self.obs = torch.as_tensor(episodes.observations, device=self.device)
        self.actions = torch.as_tensor(episodes.actions, device=self.device)
        self.hist_index = torch.as_tensor(np.concatenate(hist), device=self.device)
        self.chunk_index = torch.as_tensor(np.concatenate(chunk), device=self.device)
        missing = [c for c in cameras if c not in episodes.images]
        if missing:
            raise FlowrlError(f"the demonstrations hold no images of camera(s) {', '.join(missing)}")
        self.images = {c: torch.as_tensor(episodes.images[c], device=self.device) for c in cameras}  # uint8

    def __len__(self) -> int:
        return len(self.hist_index)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, obs_history, obs_dim) observations and (B, horizon, act_dim) actions in env units."""
        return self.obs[self.hist_index[idx]], self.actions[self.chunk_index[idx]]

    def batch_images(self, idx: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """``{camera: (B, obs_history, H, W, 3) uint8}`` beside :meth:`batch` (None without cameras)."""
        if not self.images:
            return None
        rows = self.hist_index[idx]
        return {c: im[rows] for c, im in self.images.items()}
