"""Every shipped preset loads, validates, and (for pretraining) points at data that is shipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowrl.config import detect_stage, load_stage_config

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
UNSHIPPED_DATA = {"data/humanoid-medium.hdf5",  # made by the commands in data/README.md
                  "data/can-images.hdf5", "data/square-images.hdf5"}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_and_validates(preset: str) -> None:
    stage = detect_stage(REPO / preset)
    assert stage == ("finetune" if Path(preset).name.startswith("finetune") else "pretrain")
    if stage == "finetune":
        load_stage_config(stage, REPO / preset, ["init=some/checkpoint"])
    else:
        cfg = load_stage_config(stage, REPO / preset)
        assert cfg.data.path in UNSHIPPED_DATA or (REPO / cfg.data.path).is_file(), cfg.data.path


def test_every_task_family_has_presets() -> None:
    folders = {Path(p).parent.name for p in PRESETS}
    assert {"hopper", "walker2d", "ant", "humanoid", "lift", "can", "square", "transport"} <= folders
