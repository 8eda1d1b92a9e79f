"""Dataset readers (one small file per layout, written here as those tools write them), our
layout's round trip, chunking, and the errors for bad files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from flowrl.cli import main
from flowrl.datasets import ChunkDataset, Episodes, read_dataset, write_dataset
from flowrl.errors import FlowrlError

LENGTHS = [5, 3, 7]
OBS_DIM, ACT_DIM = 4, 2


def _episodes(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    eps = []
    for i, n in enumerate(LENGTHS):
        term = np.zeros(n, bool)
        trunc = np.zeros(n, bool)
        (term if i == 1 else trunc)[-1] = True
        eps.append({"observations": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
                    "actions": rng.uniform(-1, 1, size=(n, ACT_DIM)).astype(np.float32),
                    "rewards": rng.normal(size=n).astype(np.float32), "terminated": term, "truncated": trunc})
    return eps


def _expected_info(fmt: str, eps: list[dict[str, np.ndarray]]) -> dict:
    rets = np.array([e["rewards"].astype(np.float64).sum() for e in eps])
    return {"format": fmt, "episodes": len(eps), "transitions": sum(LENGTHS), "obs_dim": OBS_DIM,
            "act_dim": ACT_DIM, "return_mean": pytest.approx(rets.mean(), rel=1e-6),
            "return_std": pytest.approx(rets.std(), rel=1e-6)}


def write_d4rl(path, eps) -> None:
    with h5py.File(path, "w") as f:
        cat = lambda k: np.concatenate([e[k] for e in eps])  # noqa: E731
        f["observations"] = cat("observations")
        f["next_observations"] = cat("observations")
        f["actions"] = cat("actions")
        f["rewards"] = cat("rewards")
        f["terminals"] = cat("terminated")
        f["timeouts"] = cat("truncated")
        f["infos/qpos"] = np.zeros((sum(LENGTHS), 3))
        f.create_group("metadata").attrs["algorithm"] = "SAC"


def write_robomimic(path, eps) -> None:
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = sum(LENGTHS)
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {}})
        for i, e in enumerate(eps):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = len(e["actions"])
            g["obs/robot0_eef_pos"] = e["observations"][:, :3]
            g["obs/object"] = e["observations"][:, 3:]
            g["next_obs/robot0_eef_pos"] = e["observations"][:, :3]
            g["next_obs/object"] = e["observations"][:, 3:]
            g["actions"] = e["actions"]
            g["rewards"] = e["rewards"]
            g["dones"] = e["terminated"].astype(np.int64)
            g["states"] = np.zeros((len(e["actions"]), 9))
        f.create_group("mask")["train"] = np.array([b"demo_0", b"demo_1"])


def write_minari(path, eps) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["total_episodes"] = len(eps)
        for i, e in enumerate(eps):
            g = f.create_group(f"episode_{i}")
            g.attrs["id"] = i
            g["observations"] = np.concatenate([e["observations"], e["observations"][-1:] + 1])
            g["actions"] = e["actions"]
            g["rewards"] = e["rewards"].astype(np.float64)
            g["terminations"] = e["terminated"]
            g["truncations"] = e["truncated"]


@pytest.mark.parametrize("fmt,writer", [("d4rl", write_d4rl), ("robomimic", write_robomimic), ("minari", write_minari)])
def test_reader_of_each_layout(tmp_path, fmt, writer, capsys) -> None:
    eps = _episodes()
    path = tmp_path / f"{fmt}.hdf5"
    writer(path, eps)
    data = read_dataset(path)
    assert data.format == fmt
    assert data.episode_lengths.tolist() == LENGTHS
    # robomimic concatenates observation keys in sorted order: object (1 dim) before eef_pos (3 dims).
    obs = np.concatenate([e["observations"] for e in eps])
    if fmt == "robomimic":
        obs = np.concatenate([obs[:, 3:], obs[:, :3]], axis=1)
    np.testing.assert_array_equal(data.observations, obs)
    np.testing.assert_array_equal(data.actions, np.concatenate([e["actions"] for e in eps]))
    np.testing.assert_array_equal(data.terminated, np.concatenate([e["terminated"] for e in eps]))
    assert main(["data", "info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == _expected_info(fmt, eps)


def test_d4rl_boundaries_from_terminals_and_timeouts(tmp_path) -> None:
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.zeros((10, 2), np.float32)
        f["actions"] = np.zeros((10, 1), np.float32)
        f["rewards"] = np.arange(10, dtype=np.float32)
        f["terminals"] = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 0], bool)
        f["timeouts"] = np.array([0, 0, 0, 0, 0, 1, 0, 0, 0, 0], bool)
    data = read_dataset(path)
    assert data.episode_lengths.tolist() == [3, 3, 4]  # the unfinished tail is an episode of its own
    assert data.truncated.tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert data.episode_returns().tolist() == [3.0, 12.0, 30.0]


def test_our_layout_round_trip(tmp_path) -> None:
    eps = Episodes.from_list(_episodes(), {"task": "Hopper", "policy": {"kind": "test"}})
    path = tmp_path / "ours.hdf5"
    write_dataset(path, eps)
    back = read_dataset(path)
    for key in ("observations", "actions", "rewards", "terminated", "truncated", "episode_lengths"):
        np.testing.assert_array_equal(getattr(back, key), getattr(eps, key))
    assert back.meta["task"] == "Hopper" and back.meta["policy"] == {"kind": "test"}
    assert back.meta["return_mean"] == pytest.approx(eps.episode_returns().mean())


@pytest.mark.parametrize("history,horizon", [(1, 1), (1, 4), (3, 2), (2, 7)])
def test_chunks_never_cross_episode_boundaries(history, horizon) -> None:
    # Observation and action values encode (episode, step), so every gathered row can be checked.
    eps = []
    for i, n in enumerate(LENGTHS):
        steps = np.arange(n, dtype=np.float32)
        eps.append({"observations": np.stack([np.full(n, i, np.float32), steps], 1),
                    "actions": np.stack([np.full(n, i, np.float32), steps], 1),
                    "rewards": np.zeros(n), "terminated": np.zeros(n, bool), "truncated": np.zeros(n, bool)})
    chunks = ChunkDataset(Episodes.from_list(eps), history, horizon)
    assert len(chunks) == sum(max(0, n - horizon + 1) for n in LENGTHS)
    obs, act = chunks.batch(torch.arange(len(chunks)))
    assert obs.shape == (len(chunks), history, 2) and act.shape == (len(chunks), horizon, 2)
    for o, a in zip(obs, act):
        episode, start = a[0, 0], a[0, 1]
        assert (a[:, 0] == episode).all() and (o[:, 0] == episode).all()
        assert torch.equal(a[:, 1], start + torch.arange(horizon, dtype=torch.float32))
        expected_hist = (start - torch.arange(history - 1, -1, -1, dtype=torch.float32)).clamp_min(0)
        assert torch.equal(o[:, 1], expected_hist)


def test_nan_in_dataset_is_rejected(tmp_path) -> None:
    eps = _episodes()
    eps[1]["observations"][2, 1] = np.nan
    path = tmp_path / "nan.hdf5"
    write_d4rl(path, eps)
    with pytest.raises(FlowrlError, match=r"'observations' holds NaN or inf \(first at row 7\)"):
        read_dataset(path)


def test_inf_reward_is_rejected(tmp_path) -> None:
    eps = _episodes()
    eps[0]["rewards"][1] = np.inf
    path = tmp_path / "inf.hdf5"
    write_dataset(path, Episodes.from_list(eps))
    with pytest.raises(FlowrlError, match="'rewards' holds NaN or inf"):
        read_dataset(path)


def test_missing_corrupt_and_unknown_files(tmp_path) -> None:
    with pytest.raises(FlowrlError, match="dataset not found"):
        read_dataset(tmp_path / "nope.hdf5")
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(FlowrlError, match="not a readable HDF5 file"):
        read_dataset(bad)
    good = tmp_path / "good.hdf5"
    write_dataset(good, Episodes.from_list(_episodes()))
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FlowrlError, match="truncated.hdf5"):
        read_dataset(truncated)
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as f:
        f["images"] = np.zeros(3)
    with pytest.raises(FlowrlError, match="unrecognised dataset layout"):
        read_dataset(other)


def test_robomimic_missing_actions_names_the_key(tmp_path) -> None:
    path = tmp_path / "rm.hdf5"
    write_robomimic(path, _episodes())
    with h5py.File(path, "a") as f:
        del f["data/demo_1/actions"]
    with pytest.raises(FlowrlError, match="missing dataset '/data/demo_1/actions'"):
        read_dataset(path)


def test_failed_write_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "keep.hdf5"
    write_dataset(path, Episodes.from_list(_episodes()))
    before = path.read_bytes()
    broken = Episodes.from_list(_episodes())
    broken.meta["unserialisable"] = object()
    with pytest.raises(TypeError):
        write_dataset(path, broken)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.hdf5"]


def test_head_and_tail_split_episodes() -> None:
    lengths = [3, 5, 2, 4]
    eps = Episodes.from_list([{"observations": np.full((n, 2), i), "actions": np.full((n, 1), i),
                               "rewards": np.zeros(n), "terminated": np.zeros(n, bool), "truncated": np.zeros(n, bool)}
                              for i, n in enumerate(lengths)])
    head, tail = eps.head(3), eps.tail(1)
    assert list(head.episode_lengths) == [3, 5, 2] and list(tail.episode_lengths) == [4]
    assert head.num_transitions + tail.num_transitions == eps.num_transitions
    assert (tail.observations == 3).all() and (head.actions[-2:] == 2).all()
    assert eps.tail(10) is eps
    with pytest.raises(ValueError):
        eps.tail(0)


def test_camera_images_round_trip_in_the_robomimic_layout_and_stay_out_of_the_observations(tmp_path) -> None:
    from flowrl.datasets import write_robomimic as write_ours

    rng = np.random.default_rng(3)
    eps = _episodes()
    for e in eps:
        e["images"] = {"agentview": rng.integers(0, 256, size=(len(e["actions"]), 6, 5, 3), dtype=np.uint8)}
    data = Episodes.from_list(eps)
    path = tmp_path / "images.hdf5"
    write_ours(path, data, [("robot0_eef_pos", 3), ("object", 1)], {"env_name": "Lift"})
    with h5py.File(path) as f:
        frames = f["data/demo_2/obs/agentview_image"]
        assert frames.shape == (7, 6, 5, 3) and frames.dtype == np.uint8 and frames.chunks == (1, 6, 5, 3)
    low_dim = read_dataset(path)  # images never enter the flat observation
    np.testing.assert_array_equal(low_dim.observations[:, [1, 2, 3, 0]], data.observations)  # keys sorted
    assert low_dim.images == {} and low_dim.info()["cameras"] == {"agentview": [6, 5, 3]}
    back = read_dataset(path, cameras=["agentview"])
    np.testing.assert_array_equal(back.images["agentview"], data.images["agentview"])
    np.testing.assert_array_equal(back.tail(1).images["agentview"], eps[-1]["images"]["agentview"])
    assert back.head(1).images["agentview"].shape == (5, 6, 5, 3)
    with pytest.raises(FlowrlError, match=r"missing dataset 'data/demo_0/obs/wrist_image' \(camera wrist; the file "
                                          r"has agentview_image\)"):
        read_dataset(path, cameras=["wrist"])
    ours = tmp_path / "ours.hdf5"
    write_dataset(ours, Episodes.from_list(_episodes()))
    with pytest.raises(FlowrlError, match="camera images are read from robomimic files; this one is flowrl"):
        read_dataset(ours, cameras=["agentview"])
