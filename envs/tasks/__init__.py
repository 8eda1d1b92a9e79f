"""The built-in tasks, one file each (locomotion's five share ``locomotion``); importing this package registers
them (see :mod:`flowrl.envs.registry`), in this order."""

# the registry's order, which listings and gymnasium's ids follow
from flowrl.envs.tasks import locomotion  # noqa: F401,I001
from flowrl.envs.tasks import lift, pick_place_can, nut_assembly_square, two_arm_transport  # noqa: F401,I001
from flowrl.envs.tasks import point_reach  # noqa: F401,I001

__all__ = ["lift", "locomotion", "nut_assembly_square", "pick_place_can", "point_reach", "two_arm_transport"]
