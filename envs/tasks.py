"""The tasks flowrl knows, by canonical name, and how user spellings map onto them."""

from __future__ import annotations

from dataclasses import dataclass

from flowrl.errors import FlowrlError


@dataclass(frozen=True)
class TaskSpec:
    """What every backend needs to know about a task."""

    name: str
    gym_id: str
    obs_dim: int
    act_dim: int
    max_episode_steps: int = 1000
    # Return of a medium-quality demonstrator, D4RL-like; used to pick the `medium` expert snapshot.
    medium_return: float = 0.0


LOCOMOTION: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("Hopper", "Hopper-v5", 11, 3, medium_return=1600.0),
        TaskSpec("Walker2d", "Walker2d-v5", 17, 6, medium_return=2500.0),
        TaskSpec("HalfCheetah", "HalfCheetah-v5", 17, 6, medium_return=4500.0),
        TaskSpec("Ant", "Ant-v5", 105, 8, medium_return=2500.0),
        TaskSpec("Humanoid", "Humanoid-v5", 348, 17, medium_return=2000.0),
        # Humanoid with the Newton solver instead of the XML's PGS: what MuJoCo Warp can run.
        TaskSpec("Humanoid-Newton", "Humanoid-v5", 348, 17, medium_return=2000.0),
    )
}

def _all_tasks() -> dict[str, TaskSpec]:
    from flowrl.envs.point_reach import SPEC as POINT_REACH

    return {**LOCOMOTION, POINT_REACH.name: POINT_REACH}


TASKS: dict[str, TaskSpec] = _all_tasks()


def resolve_task(name: str) -> TaskSpec:
    """Look a task up case-insensitively; ``hopper``, ``Hopper`` and ``Hopper-v5`` are the same."""
    key = name.strip().lower()
    for spec in TASKS.values():
        if key == spec.name.lower():
            return spec
    for spec in TASKS.values():
        if spec.gym_id and key == spec.gym_id.lower():
            return spec
    known = ", ".join(sorted(TASKS))
    raise FlowrlError(f"unknown task '{name}'; known tasks: {known}")
