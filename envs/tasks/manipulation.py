"""robosuite's manipulation tasks (Panda, OSC_POSE), with robomimic's low-dimensional observations.

They run in robosuite itself, one worker process per env (:mod:`flowrl.envs.backends.robosuite`), and
Lift, PickPlaceCan and NutAssemblySquare also on our ``cpu`` and ``warp`` backends, from the scenes shipped in
``envs/assets/robosuite`` with a batched OSC controller and no robosuite at run time
(:mod:`flowrl.envs.tasks.robosuite_scenes`). robosuite stays their first backend, so ``auto`` keeps using it on
a CPU machine and picks warp on CUDA.
The observation is robomimic's low-dimensional keys concatenated in sorted key order (the order the
robomimic dataset reader uses): ``object`` (the task's object state), then per robot the end
effector's position and quaternion (x, y, z, w) and the gripper's finger joint positions.
"""

from __future__ import annotations

import functools
from typing import Any

from flowrl.envs.registry import TaskInfo, register


def robot_keys(num_robots: int, object_dim: int) -> tuple[tuple[str, int], ...]:
    """(robomimic key, size) in observation order."""
    sizes = {"object": object_dim}
    for r in range(num_robots):
        sizes.update({f"robot{r}_eef_pos": 3, f"robot{r}_eef_quat": 4, f"robot{r}_gripper_qpos": 2})
    return tuple((k, sizes[k]) for k in sorted(sizes))


def _robosuite_env(info: TaskInfo, num_envs: int, device: Any = "cpu", seed: int | None = None, **kwargs: Any):
    from flowrl.envs.backends.robosuite import RobosuiteEnv

    return RobosuiteEnv(info, num_envs, device=device, seed=seed, **kwargs)


def _scene_task(name: str) -> Any:
    """The cpu/warp task object of ``robosuite/<name>`` (imported here: it loads MuJoCo scenes)."""
    from flowrl.envs.registry import resolve_task
    from flowrl.envs.tasks.robosuite_scenes import make_task

    return make_task(resolve_task(name))


def _register(env_name: str, robots: str | list[str], object_dim: int, horizon: int, description: str,
              warp_buffers: tuple[int, int] | None = None) -> None:
    """``warp_buffers`` (contacts, constraint rows per world): the task also runs on the cpu and warp backends."""
    n = 1 if isinstance(robots, str) else len(robots)
    layout = robot_keys(n, object_dim)
    name = f"robosuite/{env_name}"
    ours = warp_buffers is not None
    register(TaskInfo(name, sum(s for _, s in layout), 7 * n, horizon,
                      ("robosuite", "cpu", "warp") if ours else ("robosuite",),
                      aliases=(env_name,), task=functools.partial(_scene_task, name) if ours else None,
                      envs={"robosuite": _robosuite_env}, has_success=True, obs_layout=layout,
                      model_file=f"envs/assets/robosuite/{env_name}/scene.xml" if ours else "",
                      warp_buffers=warp_buffers or (64, 256), description=description,
                      extra={"env_name": env_name, "robots": robots}))


# warp_buffers: Lift 64/512 held 4096 worlds on an H200 without overflow. Measured on C MuJoCo (most contacts /
# constraint rows at the end of any env step over 4 scripted-expert episodes of 250 steps): Lift 18/69, Can 26/113,
# Square 67/277 (the nut's many convex pieces on the peg and in the fingers), so Square gets 3x contacts.
_register("Lift", "Panda", 10, 400, "lift a cube off the table", warp_buffers=(64, 512))
_register("PickPlaceCan", "Panda", 14, 400, "move a can from one bin to its place in another", warp_buffers=(64, 512))
_register("NutAssemblySquare", "Panda", 14, 400, "fit the square nut onto its peg", warp_buffers=(192, 1024))
_register("TwoArmTransport", ["Panda", "Panda"], 41, 800, "two arms hand an object over a barrier into a bin")
