"""Stable-Baselines3 experts for locomotion tasks, with snapshots along the way.

Demonstrations of two qualities, like D4RL's, come from one PPO run: ``expert`` is its best
snapshot (by mean minus one standard deviation of its evaluation return, so a policy that is
good on average but falls over now and then is passed over) and ``medium`` the snapshot whose evaluation return is closest to the task's
medium target (Hopper ~1600), i.e. a policy stopped early. Each snapshot keeps the observation
normalisation it was trained with, stored as safetensors (no pickles of ours).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from flowrl.envs import resolve_task
from flowrl.envs.tasks.base import quiet_settotalmass
from flowrl.errors import FlowrlError
from flowrl.io import atomic_path, write_json


# What PPO keeps between rollouts (the last observations of every env, episode buffers): megabytes
# with thousands of envs, and not needed to act.
ROLLOUT_STATE = ["_last_obs", "_last_original_obs", "_last_episode_starts", "ep_info_buffer", "ep_success_buffer"]


@dataclass
class ExpertSnapshot:
    """A PPO policy at one point of training, ready to act on raw observations."""

    model: Any
    obs_mean: np.ndarray
    obs_var: np.ndarray
    clip_obs: float
    epsilon: float

    def act(self, obs: np.ndarray) -> np.ndarray:
        norm = np.clip((obs - self.obs_mean) / np.sqrt(self.obs_var + self.epsilon), -self.clip_obs, self.clip_obs)
        action, _ = self.model.predict(norm.astype(np.float32), deterministic=True)
        return action


def train_expert(
    task: str,
    out: str | Path,
    total_steps: int = 1_000_000,
    seed: int = 0,
    num_envs: int = 8,
    snapshot_every: int = 50_000,
    eval_episodes: int = 10,
    progress: bool = True,
    backend: str = "gymnasium",
    device: str = "cpu",
) -> dict[str, Any]:
    """Train PPO on ``task`` and write ``out/expert.json`` and ``out/snapshots/<step>/``.

    ``backend="gymnasium"`` (the default, how the shipped demonstrations were made) runs SB3's own
    vector env with small PPO batches. Any other backend (``cpu``, ``warp``) runs one of our batched
    envs with batches of ~32k env steps, a 256x256 network and a starting exploration noise of 0.6 of
    the action half-range (Humanoid's controls span only +-0.4), which is what hundreds or thousands of
    envs need (Humanoid on MuJoCo Warp: ``--backend warp --device cuda --num-envs 2048``).
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger

    spec = resolve_task(task)
    if backend == "gymnasium" and backend not in spec.backends:  # SB3 would make gymnasium's task of spec.gym_id
        raise FlowrlError(f"{spec.name} needs --backend {' or '.join(spec.backends)} (gymnasium's "
                          f"{spec.gym_id or 'registry'} is another task)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    venv = training_env(spec.name, backend, num_envs, seed, device)
    ppo_args = {"learning_rate": lambda f: 3e-4 * f, "gamma": 0.99, "gae_lambda": 0.95, "clip_range": 0.2,
              "ent_coef": 0.0, "max_grad_norm": 0.5, "seed": seed, "verbose": 0}
    if backend == "gymnasium":
        torch.set_num_threads(1)
        model = PPO("MlpPolicy", venv, n_steps=256, batch_size=64, n_epochs=10, device="cpu", **ppo_args)
    else:
        n_steps = max(8, min(32768, total_steps) // num_envs)
        half_range = float(np.mean(venv.action_space.high - venv.action_space.low)) / 2
        model = PPO("MlpPolicy", venv, n_steps=n_steps, batch_size=min(8192, n_steps * num_envs // 4), n_epochs=5,
                    device=device, policy_kwargs={"net_arch": {"pi": [256, 256], "vf": [256, 256]},
                                                  "log_std_init": float(np.log(0.6 * half_range))}, **ppo_args)
    manifest: dict[str, Any] = {"task": spec.name, "algo": "stable_baselines3.PPO", "seed": seed,
                                "backend": backend, "num_envs": num_envs, "total_steps": total_steps,
                                "snapshots": []}
    started = time.time()

    class Snapshotter(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.next_at = snapshot_every

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next_at:
                self.next_at += snapshot_every
                save_snapshot(self.num_timesteps)
            return True

    def save_snapshot(step: int) -> None:
        folder = out / "snapshots" / f"{step:09d}"
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            model.save(tmp / "model.zip", exclude=ROLLOUT_STATE)
            rms = venv.obs_rms
            save_file({"obs_mean": rms.mean.astype(np.float64), "obs_var": rms.var.astype(np.float64)},
                      str(tmp / "obs_norm.safetensors"),
                      metadata={"clip_obs": str(venv.clip_obs), "epsilon": str(venv.epsilon)})
        snap = load_snapshot(out, step, device)
        if backend == "gymnasium":
            ret, std = evaluate_snapshot(snap, spec.gym_id, eval_episodes, seed=10_000 + step)
        else:
            ret, std = evaluate_snapshot_batched(snap, spec.name, eval_episodes, 10_000 + step)
        manifest["snapshots"].append({"step": step, "eval_return": ret, "eval_return_std": std})
        best = max(manifest["snapshots"], key=lambda s: s["eval_return"] - s["eval_return_std"])
        medium = min(manifest["snapshots"], key=lambda s: abs(s["eval_return"] - spec.medium_return))
        manifest["expert"], manifest["medium"] = best["step"], medium["step"]
        manifest["wall_clock_s"] = round(time.time() - started, 1)
        write_json(out / "expert.json", manifest)
        if progress:
            print(f"[expert {spec.name}] step {step:>9d}  eval return {ret:8.1f} ± {std:6.1f}  "
                  f"({manifest['wall_clock_s']:.0f} s)", flush=True)

    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes an empty log folder in /tmp
    try:
        model.learn(total_timesteps=total_steps, callback=Snapshotter())
        if not manifest["snapshots"] or manifest["snapshots"][-1]["step"] != model.num_timesteps:
            save_snapshot(model.num_timesteps)
    finally:
        venv.close()
    return manifest


def training_env(task: str, backend: str, num_envs: int, seed: int, device: str = "cpu") -> Any:
    """SB3's VecNormalize over the vector env PPO trains on: SB3's own (``gymnasium``) or one of our
    batched envs (``cpu``, ``warp``) seen as an SB3 VecEnv."""
    from stable_baselines3.common.vec_env import VecMonitor, VecNormalize

    if backend == "gymnasium":
        from stable_baselines3.common.env_util import make_vec_env

        with quiet_settotalmass():  # SB3's vector env compiles gymnasium's models here (HalfCheetah warns)
            return VecNormalize(make_vec_env(resolve_task(task).gym_id, n_envs=num_envs, seed=seed), gamma=0.99)
    from flowrl.envs import make
    from flowrl.envs.adapters import sb3_vec_env

    return VecNormalize(VecMonitor(sb3_vec_env(make(task, num_envs, backend=backend, device=device, seed=seed))),
                        gamma=0.99)


class SnapshotPolicy:
    """A snapshot as a :class:`flowrl.rollout.ChunkPolicy` of one-action chunks (deterministic)."""

    obs_history = 1
    act_steps = 1

    def __init__(self, act: Any) -> None:
        self.act = act

    def act_chunk(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        action = self.act(obs[:, -1].cpu().numpy().astype(np.float32))
        return torch.as_tensor(action, dtype=torch.float32).unsqueeze(1)


def evaluate_snapshot_batched(snap: ExpertSnapshot, task: str, episodes: int, seed: int) -> tuple[float, float]:
    """Like :func:`evaluate_snapshot`, all episodes at once in our cpu backend (also for experts trained
    on MuJoCo Warp, which would capture a new CUDA graph for every evaluation)."""
    from flowrl.evaluation import Evaluator

    evaluator = Evaluator(task, seed, backend="cpu", max_envs=episodes)
    try:
        r = evaluator.run(SnapshotPolicy(snap.act), episodes)
    finally:
        evaluator.close()
    return r["return_mean"], r["return_std"]


def evaluate_snapshot(snap: ExpertSnapshot, gym_id: str, episodes: int, seed: int) -> tuple[float, float]:
    """Mean and std of the return of the deterministic snapshot over ``episodes`` seeded episodes."""
    import gymnasium as gym

    with quiet_settotalmass():
        env = gym.make(gym_id)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        total, done = 0.0, False
        while not done:
            obs, r, term, trunc, _ = env.step(snap.act(obs[None])[0])
            total += float(r)
            done = term or trunc
        returns.append(total)
    env.close()
    return float(np.mean(returns)), float(np.std(returns))


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "expert.json"
    if not path.is_file():
        raise FlowrlError(f"{folder}: not an expert folder (no expert.json); train one with `flowrl expert`")
    return json.loads(path.read_text())


def load_snapshot(folder: str | Path, step: int | str, device: str = "cpu") -> ExpertSnapshot:
    """Load a snapshot by step number or by level name (``medium`` / ``expert``)."""
    from stable_baselines3 import PPO

    folder = Path(folder)
    if isinstance(step, str):
        manifest = load_manifest(folder)
        if step not in ("medium", "expert"):
            raise FlowrlError(f"unknown expert level '{step}'; use medium or expert")
        step = int(manifest[step])
    snap_dir = folder / "snapshots" / f"{int(step):09d}"
    for name in ("model.zip", "obs_norm.safetensors"):
        if not (snap_dir / name).is_file():
            raise FlowrlError(f"{snap_dir}: missing {name}")
    from safetensors import safe_open

    with safe_open(str(snap_dir / "obs_norm.safetensors"), "np") as f:  # one read: tensors and metadata
        norm = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    model = PPO.load(snap_dir / "model.zip", device=device)
    return ExpertSnapshot(model, norm["obs_mean"], norm["obs_var"], float(meta["clip_obs"]), float(meta["epsilon"]))
