"""The stages end to end through the CLI: expert -> collect -> pretrain -> eval (with video),
TensorBoard names, and the files each stage leaves behind."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from flowrl.agents.expert import load_manifest, load_snapshot, train_expert
from flowrl.cli import main
from flowrl.datasets import read_dataset

TINY = ["policy.hidden_dim=32", "policy.depth=1", "policy.time_embed_dim=8", "train.batch_size=32",
        "train.eval_every=4", "train.eval_episodes=2", "train.checkpoint_every=4", "train.log_every=2",
        "train.warmup_steps=1", "device=cpu", "eval.episodes=2", "eval.k=[1,2]"]


@pytest.fixture(scope="module")
def tiny_expert(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("expert") / "hopper"
    train_expert("Hopper", out, total_steps=4096, num_envs=8, snapshot_every=2048, eval_episodes=2, progress=False)
    return out


def test_expert_snapshots_and_levels(tiny_expert) -> None:
    manifest = load_manifest(tiny_expert)
    assert [s["step"] for s in manifest["snapshots"]] == [2048, 4096]
    assert manifest["expert"] in (2048, 4096) and manifest["medium"] in (2048, 4096)
    for s in manifest["snapshots"]:
        assert (tiny_expert / "snapshots" / f"{s['step']:09d}" / "obs_norm.safetensors").is_file()


def test_collect_from_expert_is_seeded_and_self_describing(tiny_expert, tmp_path, capsys) -> None:
    args = ["collect", str(tiny_expert), "--level", "medium", "--episodes", "3", "--noise", "0.1", "--seed", "4"]
    assert main([*args, "--out", str(tmp_path / "a.hdf5")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.hdf5")]) == 0
    a, b = read_dataset(tmp_path / "a.hdf5"), read_dataset(tmp_path / "b.hdf5")
    assert a.num_episodes == 3 and (a.observations == b.observations).all() and (a.actions == b.actions).all()
    assert a.meta["task"] == "Hopper" and a.meta["policy"]["kind"] == "sb3_expert"
    assert a.meta["action_noise"] == 0.1 and a.meta["created_by"].startswith("flowrl collect")
    assert (abs(a.actions) <= 1).all()
    # every episode ends in a termination or a truncation, nowhere else
    ends = a.episode_starts + a.episode_lengths - 1
    done = a.terminated | a.truncated
    assert done[ends].all() and done.sum() == a.num_episodes



def test_collect_can_label_the_noisy_states_with_the_sources_own_actions(tiny_expert, tmp_path) -> None:
    """``--label source`` (DART): the same noisy execution, each step labelled with the expert's own noise-free
    (clipped) action at the state it reached, not with the action executed."""
    import torch

    from flowrl.agents.collect import _source

    args = ["collect", str(tiny_expert), "--level", "medium", "--episodes", "2", "--noise", "0.3", "--seed", "4"]
    assert main([*args, "--out", str(tmp_path / "executed.hdf5")]) == 0
    assert main([*args, "--label", "source", "--out", str(tmp_path / "source.hdf5")]) == 0
    executed, source = read_dataset(tmp_path / "executed.hdf5"), read_dataset(tmp_path / "source.hdf5")
    assert (executed.observations == source.observations).all()  # the same seeded noisy rollouts
    assert source.meta["action_label"] == "source" and executed.meta["action_label"] == "executed"
    expert, _, _ = _source(tiny_expert, "medium", None, "cpu", 1)
    own = expert.act_chunk(torch.as_tensor(source.observations)[:, None])[:, 0].clamp(-1, 1).numpy()
    np.testing.assert_allclose(source.actions, own, atol=1e-6)
    assert np.abs(executed.actions - source.actions).mean() > 0.1  # the executed ones carry the noise

def test_pretrain_eval_video_and_tensorboard(tmp_path, hopper_dataset, capsys) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text(f"task: Hopper\ndata:\n  path: {hopper_dataset}\n")
    run = tmp_path / "run"
    assert main(["pretrain", str(preset), *TINY, "--steps", "8", "--out", str(run), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "return mean" in printed and "evaluation of" in printed
    saved = json.loads((run / "eval.json").read_text())["evaluations"]
    assert len(saved) == 1 and [r["k"] for r in saved[0]["results"]] == [1, 2] and saved[0]["step"] == 8
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "8", "best"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(run)).Reload().Tags()["scalars"])
    assert {"train/loss", "train/bc_loss", "train/learning_rate", "time/fps", "eval/mean_reward",
            "eval/mean_ep_length"} <= tags

    assert main(["eval", str(run / "checkpoints" / "8"), "--episodes", "2", "--k", "1", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"].endswith("checkpoints/8") and [r["k"] for r in result["results"]] == [1, 4]
    records = json.loads((run / "eval.json").read_text())["evaluations"]
    assert len(records) == 2 and records[0] == saved[0]  # the pretraining's record is kept
    assert {k: v for k, v in records[1].items() if k != "time"} == result
    assert main(["eval", str(run), "--episodes", "3", "--k", "4", "--json", "--max-envs", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["episodes"] == 3  # rounds of 2 envs

    # headless rendering (EGL, Mesa's software EGL on CPU machines) is part of what is tested
    assert main(["eval", str(run / "checkpoints" / "4"), "--episodes", "1", "--k", "2", "--video"]) == 0
    video = run / "videos" / "4_K2.mp4"
    assert video.is_file() and video.stat().st_size > 1000
    import imageio.v2 as imageio

    frames = imageio.mimread(video, memtest=False)
    length = json.loads((run / "eval.json").read_text())["evaluations"][-1]["results"][0]["length_mean"]
    assert len(frames) == len(range(0, int(length), 5)) and frames[0].ndim == 3  # real time: every 5th step


def test_expert_on_a_batched_backend_keeps_snapshots_small(tmp_path) -> None:
    """--backend cpu: SB3 PPO over our batched env, snapshots evaluated in one batched env, and no
    per-env rollout state in the saved model (megabytes with thousands of envs)."""
    out = tmp_path / "hopper"
    manifest = train_expert("Hopper", out, total_steps=512, num_envs=16, snapshot_every=256, eval_episodes=2,
                            progress=False, backend="cpu")
    assert manifest["backend"] == "cpu" and [s["step"] for s in manifest["snapshots"]] == [256, 512]
    assert all(abs(s["eval_return"]) > 0 for s in manifest["snapshots"])
    snap_dir = out / "snapshots" / f"{512:09d}"
    with zipfile.ZipFile(snap_dir / "model.zip") as z:
        data = json.loads(z.read("data"))
    assert "_last_obs" not in data and "ep_info_buffer" not in data
    snap = load_snapshot(out, "medium")
    assert snap.act(np.zeros((3, 11), np.float32)).shape == (3, 3)


def test_humanoid_medium_data_from_the_shipped_snapshot(tmp_path, capsys) -> None:
    """The shipped Humanoid expert snapshot makes demonstrations of Humanoid-Newton (cpu backend),
    and behaviour cloning takes them (its task check must not build a gymnasium Humanoid-Newton)."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "h.hdf5"
    assert main(["collect", str(repo / "data" / "experts" / "humanoid"), "--level", "medium", "--episodes", "2",
                 "--noise", "0.05", "--num-envs", "2", "--backend", "cpu", "--out", str(out)]) == 0
    data = read_dataset(out)
    assert data.meta["task"] == "Humanoid-Newton" and data.obs_dim == 348 and data.act_dim == 17
    assert data.meta["policy"]["step"] == 3250176
    # the medium snapshot walks for a while: far longer than a random policy's ~20 steps
    assert data.episode_lengths.min() > 100
    run = tmp_path / "run"
    assert main(["pretrain", str(repo / "configs" / "humanoid" / "pretrain_reflow.yaml"), *TINY, f"data.path={out}",
                 "--steps", "2", "--no-eval", "--out", str(run), "--quiet"]) == 0
    assert (run / "checkpoints" / "2").is_dir()
