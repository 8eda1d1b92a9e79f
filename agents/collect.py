"""Roll a policy out into a demonstration dataset (our HDF5 layout).

The policy is either a Stable-Baselines3 expert folder made by ``flowrl expert`` (at level
``medium`` or ``expert``, or a snapshot step) or a flowrl policy checkpoint. Optional Gaussian
action noise (clipped to the action bounds) widens the data; the recorded action is the one
executed, or with ``label="source"`` the source's own noise-free action at the state the noisy
execution reached (DART, Laskey et al. 2017: the demonstrations then show how the source recovers
from the small errors a cloned policy makes).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowrl.checkpoint import CONFIG, load_policy
from flowrl.policy import require_state_only
from flowrl.datasets import Episodes, write_dataset, write_robomimic
from flowrl.envs import ChunkResult, all_tasks, canonical_task, make, resolve_task
from flowrl.errors import FlowrlError
from flowrl.rollout import ChunkPolicy, FlowChunkPolicy, run_episodes


def _source(path: Path, level: str, task: str | None, device: str, num_envs: int
            ) -> tuple[ChunkPolicy, str, dict[str, Any]]:
    """(chunk policy, task, description) for a scripted expert, an expert folder or a checkpoint."""
    if str(path) == "scripted":
        expert = resolve_task(task).expert if task else None
        if expert is None:
            scripted = [t.name for t in all_tasks().values() if t.expert is not None]
            raise FlowrlError(f"no scripted expert for task '{task}'; scripted experts: {', '.join(scripted)}")
        return expert(num_envs), canonical_task(task), {"kind": "scripted", "expert": expert.__name__}
    if (path / "expert.json").is_file():
        from flowrl.agents.expert import SnapshotPolicy, load_manifest, load_snapshot

        manifest = load_manifest(path)
        step = int(level) if level.isdigit() else int(manifest.get(level, -1))
        snaps = {s["step"]: s for s in manifest["snapshots"]}
        if step not in snaps:
            raise FlowrlError(f"{path}: no snapshot for level '{level}' (steps: {sorted(snaps)})")
        snap = load_snapshot(path, step)
        desc = {"kind": "sb3_expert", "path": str(path), "level": level, "step": step,
                "eval_return": snaps[step]["eval_return"], "algo": manifest["algo"]}
        return SnapshotPolicy(snap.act), task or manifest["task"], desc
    if (path / CONFIG).is_file():
        policy, config = load_policy(path, device)
        require_state_only(policy, f"{path}: collect")  # the recorded observations are states only
        desc = {"kind": "flowrl_policy", "path": str(path), "head": policy.cfg.head, "k": policy.cfg.k}
        return FlowChunkPolicy(policy, policy.cfg.k), task or config["task"], desc
    raise FlowrlError(f"{path}: neither an expert folder (expert.json) nor a policy checkpoint ({CONFIG})")


LABELS = ("executed", "source")
"""What ``collect`` records as each step's action: the one executed, or the source's own before the noise."""


def collect(source: str | Path, out: str | Path, episodes: int = 100, noise: float = 0.0, seed: int = 0,
            level: str = "expert", task: str | None = None, num_envs: int = 16, device: str = "cpu",
            progress: bool = True, created_by: str | None = None, fmt: str = "flowrl",
            after_success: int = 10, keep_failures: bool = False, backend: str = "auto",
            cameras: tuple[str, ...] | list[str] = (), image_size: int = 84, label: str = "executed") -> Episodes:
    """Roll ``source`` out for ``episodes`` seeded episodes and write them to ``out``.

    On tasks that report success (robosuite), an episode is cut ``after_success`` steps after its
    first success (its last step marked truncated), as robomimic's demonstrations end, and only
    successful episodes are kept unless ``keep_failures``: collection goes on with further seeds
    until ``episodes`` are kept (at most 3x as many tried). ``after_success < 0`` keeps whole
    episodes. ``backend`` is any backend the task runs on (``auto``: the task's default, see
    :func:`flowrl.envs.make`). ``cameras``: also record these cameras' ``image_size`` x ``image_size``
    RGB images of the state before each step (robomimic's ``obs/<camera>_image``; robosuite scenes on
    the cpu backend (OpenGL) or the warp backend (MuJoCo Warp's batched ray tracer), robomimic format,
    1-step chunks such as the scripted experts').
    ``label``: the action recorded at each step, ``executed`` (with the noise) or ``source`` (the source's own
    action before the noise was added; with ``noise`` 0 the two are the same).
    ``created_by`` is the command line recorded in the file (the CLI passes its own)."""
    if episodes < 1:
        raise FlowrlError(f"--episodes must be >= 1, got {episodes}")
    if noise < 0:
        raise FlowrlError(f"--noise must be >= 0, got {noise}")
    if label not in LABELS:
        raise FlowrlError(f"--label must be one of {', '.join(LABELS)}, got {label!r}")
    n = min(num_envs, episodes)
    policy, task_name, desc = _source(Path(source), level, task, device, n)
    info = resolve_task(task_name)
    if fmt == "robomimic" and info.family != "robosuite":
        raise FlowrlError(f"--format robomimic needs a robosuite task, not {task_name}")
    if cameras and fmt != "robomimic":
        raise FlowrlError("--cameras: images are written in robomimic's layout; add --format robomimic")
    if cameras and policy.act_steps != 1:
        raise FlowrlError(f"--cameras: images are recorded before every step, so the policy must act one step at a "
                          f"time; this one executes chunks of {policy.act_steps}")
    env = make(task_name, n, backend=backend, device=device, images=bool(cameras))
    renderer = None
    if cameras:
        from flowrl.envs.cameras import camera_renderer

        try:
            renderer = camera_renderer(env, cameras, image_size, image_size)  # OpenGL (cpu) or ray traced (warp)
        except FlowrlError:
            env.close()
            raise
    shown: dict[str, torch.Tensor] = {}  # each env's images of its current state (before the step to come)
    low = torch.as_tensor(env.single_action_space.low, dtype=torch.float32)
    high = torch.as_tensor(env.single_action_space.high, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)

    class Noisy:
        """The source with clipped Gaussian action noise; ``source_chunk`` keeps its last noise-free chunk."""

        obs_history, act_steps = policy.obs_history, policy.act_steps
        source_chunk = torch.empty(0)

        def act_chunk(self, obs: torch.Tensor, noise_in: torch.Tensor | None = None) -> torch.Tensor:
            if renderer is not None:
                shown.update({c: x.cpu() for c, x in renderer.render().items()})
            chunk = policy.act_chunk(obs).float().cpu()
            self.source_chunk = torch.minimum(torch.maximum(chunk, low), high)
            if noise > 0:
                chunk = chunk + noise * torch.randn(chunk.shape, generator=gen)
            return torch.minimum(torch.maximum(chunk, low), high)

    noisy = Noisy()

    recorded: list[dict[str, np.ndarray]] = []
    start = time.time()
    tried, failed = 0, 0
    try:
        while len(recorded) < episodes:
            if tried >= 3 * episodes:
                raise FlowrlError(f"only {len(recorded)} of {tried} episodes of {task_name} succeeded; "
                                  f"wanted {episodes} (pass --keep-failures to keep failed ones)")
            per_env: list[dict[str, list]] = [{k: [] for k in ("observations", "actions", "rewards", "terminated",
                                                               "truncated", *(f"image:{c}" for c in cameras))}
                                              for _ in range(n)]
            since_success = torch.full((n,), -1, dtype=torch.int64)

            def record(obs: torch.Tensor, chunk: torch.Tensor, r: ChunkResult, active: torch.Tensor
                       ) -> torch.Tensor | None:
                """Append each env's valid steps of this chunk; end an episode ``after_success`` steps
                after its first success (its last step marked truncated)."""
                steps = chunk.shape[1]
                labels = noisy.source_chunk[:, :steps] if label == "source" else chunk
                before = torch.cat([obs.unsqueeze(1), r.step_obs[:, :-1]], dim=1).cpu().numpy()  # obs before step j
                cut = torch.zeros((n, steps), dtype=torch.bool)
                stopped = ~active.cpu()
                for j in range(steps):
                    if r.success is not None and after_success >= 0:
                        succeeded = r.success[:, j].cpu() | (since_success >= 0)
                        since_success.copy_(torch.where(succeeded, since_success + 1, since_success))
                        cut[:, j] = since_success >= after_success
                    valid = (r.valid[:, j].cpu() & ~stopped).numpy()
                    last = r.done.cpu().numpy() & ~np.concatenate([r.valid[:, j + 1:].cpu().numpy(),
                                                                    np.zeros((n, 1), bool)], axis=1).any(1)
                    for i in np.flatnonzero(valid):
                        per_env[i]["observations"].append(before[i, j])
                        per_env[i]["actions"].append(labels[i, j].cpu().numpy())
                        per_env[i]["rewards"].append(float(r.rewards[i, j]))
                        per_env[i]["terminated"].append(bool(last[i] and r.terminated[i]))
                        per_env[i]["truncated"].append(bool(last[i] and r.truncated[i]) or bool(cut[i, j]))
                        for c in cameras:  # 1-step chunks: the images rendered just before this step
                            per_env[i][f"image:{c}"].append(shown[c][i].numpy())
                    stopped |= cut[:, j]
                return cut

            if hasattr(policy, "reset"):
                policy.reset()
            result = run_episodes(env, noisy, seed=seed + tried, on_chunk=record, record_obs=True)
            for i, ep in enumerate(per_env):
                if len(recorded) >= episodes:
                    break
                if bool(result["has_success"]) and not keep_failures and not result["success"][i]:
                    failed += 1
                    continue
                episode = {k: np.asarray(v) for k, v in ep.items() if not k.startswith("image:")}
                if cameras:
                    episode["images"] = {c: np.asarray(ep[f"image:{c}"], dtype=np.uint8) for c in cameras}
                recorded.append(episode)
            tried += n
            if progress:
                rets = [e["rewards"].sum() for e in recorded] or [0.0]
                dropped = f", {failed} failed dropped" if failed else ""
                print(f"[collect {task_name}] {len(recorded)}/{episodes} episodes{dropped}, "
                      f"return {np.mean(rets):.1f} ± {np.std(rets):.1f}", file=sys.stderr, flush=True)
    finally:
        if renderer is not None:
            renderer.close()
        env.close()
    space = env.single_observation_space
    meta = {"task": task_name, "gym_id": info.gym_id, "policy": desc, "action_noise": noise, "action_label": label,
            "seed": seed, "episodes_tried": tried, "failed_dropped": failed,
            "after_success": after_success,
            **({"cameras": list(cameras), "image_size": image_size} if cameras else {}),
            "observation_space": {"shape": list(space.shape)},
            "action_space": {"shape": list(env.single_action_space.shape),
                             "low": env.single_action_space.low.tolist(), "high": env.single_action_space.high.tolist()},
            "created_by": created_by or f"flowrl.agents.collect.collect({str(source)!r}, {str(out)!r}, "
                                        f"episodes={episodes}, noise={noise}, seed={seed}, level={level!r}, "
                                        f"label={label!r})",
            "created_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_clock_s": round(time.time() - start, 1)}
    data = Episodes.from_list(recorded, meta)
    if fmt == "robomimic":
        from flowrl.envs.backends.robosuite import robomimic_env_args

        write_robomimic(out, data, list(info.obs_layout), robomimic_env_args(info, env.max_episode_steps))
    else:
        write_dataset(out, data)
    return data
