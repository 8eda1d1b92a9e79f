"""The built-in task families; importing this package registers their tasks (see :mod:`flowrl.envs.registry`)."""

from flowrl.envs.tasks import locomotion, manipulation, point_reach, robosuite_scenes  # noqa: F401

__all__ = ["locomotion", "manipulation", "point_reach", "robosuite_scenes"]
