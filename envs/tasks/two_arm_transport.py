"""robosuite's TwoArmTransport: two Panda arms hand an object over a barrier into a bin (robosuite only).

The object state (41) is robosuite's ``object-state`` of the task; the observation and action follow
:class:`~flowrl.envs.tasks.robosuite_scenes.RobosuiteTask` for two robots (14 action dimensions).
"""

from __future__ import annotations

from flowrl.envs.registry import register
from flowrl.envs.tasks.robosuite_scenes import RobosuiteTask

register(RobosuiteTask(env_name="TwoArmTransport", robots=("Panda", "Panda"), object_dim=41, max_episode_steps=800,
                       description="two arms hand an object over a barrier into a bin"))
