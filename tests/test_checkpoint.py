"""Checkpoint folders: bit-exact round trip and clear errors for broken folders."""

from __future__ import annotations

import json

import pytest
import torch

from flowrl.checkpoint import load_policy, load_train_state, resolve_checkpoint, save_checkpoint
from flowrl.config import PolicyConfig
from flowrl.errors import FlowrlError
from flowrl.policy import FlowPolicy


def _policy(head: str = "reflow") -> FlowPolicy:
    torch.manual_seed(0)
    p = FlowPolicy(PolicyConfig(head=head, hidden_dim=32, depth=2, obs_history=2), 5, 3, [-1, -2, -3], [1, 2, 3])
    p.set_normalization(torch.randn(5).numpy(), torch.rand(5).numpy() + 0.5)
    return p


@pytest.mark.parametrize("head", ["reflow", "shortcut"])
def test_round_trip_is_bit_exact(tmp_path, head) -> None:
    policy = _policy(head)
    state = {"step": 7, "optimizer": {"lr": torch.tensor(0.5)}, "generator": torch.Generator().get_state()}
    save_checkpoint(tmp_path / "ck", policy, {"task": "Hopper", "step": 7}, state)
    back, config = load_policy(tmp_path / "ck")
    assert config["task"] == "Hopper" and config["policy"]["head"] == head
    for (k, a), (k2, b) in zip(policy.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    obs, noise = torch.randn(4, 2, 5), policy.initial_noise(4, torch.Generator().manual_seed(3))
    assert torch.equal(policy.predict(obs, 3, noise=noise), back.predict(obs, 3, noise=noise))
    loaded = load_train_state(tmp_path / "ck")
    assert loaded["step"] == 7 and torch.equal(loaded["generator"], state["generator"])
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors",
                                                                    "train_state.pt"]


def test_missing_and_corrupt_files_are_named(tmp_path) -> None:
    save_checkpoint(tmp_path / "ck", _policy(), {"task": "Hopper"})
    with pytest.raises(FlowrlError, match="missing train_state.pt"):
        load_train_state(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(FlowrlError, match="model.safetensors: corrupt weights file"):
        load_policy(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FlowrlError, match="missing model.safetensors"):
        load_policy(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(FlowrlError, match="config.json: not valid JSON"):
        load_policy(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").unlink()
    with pytest.raises(FlowrlError, match="neither a checkpoint \\(no config.json\\)"):
        load_policy(tmp_path / "ck")
    with pytest.raises(FlowrlError, match="checkpoint not found"):
        load_policy(tmp_path / "nowhere")


def test_weights_that_do_not_match_the_config(tmp_path) -> None:
    save_checkpoint(tmp_path / "ck", _policy(), {"task": "Hopper"})
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["policy"]["hidden_dim"] = 64
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlowrlError, match="weights do not match config.json"):
        load_policy(tmp_path / "ck")


def test_overwrite_is_atomic_and_run_folders_resolve(tmp_path) -> None:
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "10", _policy(), {"task": "Hopper"})
    save_checkpoint(run / "checkpoints" / "200", _policy(), {"task": "Hopper"})
    assert resolve_checkpoint(run) == run / "checkpoints" / "200"  # numeric, not lexical, order
    save_checkpoint(run / "checkpoints" / "200", _policy("shortcut"), {"task": "Hopper"})
    assert load_policy(run / "checkpoints" / "200")[1]["policy"]["head"] == "shortcut"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "200"]
