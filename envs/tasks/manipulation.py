"""robosuite's manipulation tasks (Panda, OSC_POSE), with robomimic's low-dimensional observations.

They run in robosuite itself, one worker process per env (:mod:`flowrl.envs.backends.robosuite`).
The observation is robomimic's low-dimensional keys concatenated in sorted key order (the order the
robomimic dataset reader uses): ``object`` (the task's object state), then per robot the end
effector's position and quaternion (x, y, z, w) and the gripper's finger joint positions.
"""

from __future__ import annotations

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


def _register(env_name: str, robots: str | list[str], object_dim: int, horizon: int, description: str) -> None:
    n = 1 if isinstance(robots, str) else len(robots)
    layout = robot_keys(n, object_dim)
    register(TaskInfo(f"robosuite/{env_name}", sum(s for _, s in layout), 7 * n, horizon, ("robosuite",),
                      aliases=(env_name,), envs={"robosuite": _robosuite_env}, has_success=True, obs_layout=layout,
                      description=description, extra={"env_name": env_name, "robots": robots}))


_register("Lift", "Panda", 10, 400, "lift a cube off the table")
_register("PickPlaceCan", "Panda", 14, 400, "move a can from one bin to its place in another")
_register("NutAssemblySquare", "Panda", 14, 400, "fit the square nut onto its peg")
_register("TwoArmTransport", ["Panda", "Panda"], 41, 800, "two arms hand an object over a barrier into a bin")
