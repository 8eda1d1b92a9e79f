"""A new user's first hour (issue 14): malformed checkpoints give one line, the Python API takes run
folders like the CLI, checkpoints describe their observation layout, runs plot without TensorBoard,
and videos show one whole episode, in real time, from a camera that follows the robot."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gl_missing

from flowrl.checkpoint import load_policy, load_train_state, save_checkpoint
from flowrl.cli import main
from flowrl.config import PolicyConfig
from flowrl.errors import FlowrlError
from flowrl.policy import FlowPolicy

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("evaluating ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("flowrl: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, hopper_dataset: Path) -> Path:
    """A real (tiny) pretraining run: 30 gradient steps, periodic evaluations every 10."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["pretrain", str(REPO / "configs" / "quickstart.yaml"), "--steps", "30", "--out", str(out), "--quiet",
                 f"data.path={hopper_dataset}", "train.eval_every=10", "train.eval_episodes=2", "train.log_every=5",
                 "train.checkpoint_every=10", "eval.episodes=2", "eval.steps=[1]", "policy.hidden_dim=32"])
    assert code == 0
    return out


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    """A small, valid Hopper checkpoint inside a run folder."""
    policy = FlowPolicy(PolicyConfig(hidden_dim=16, depth=1), 11, 3)
    folder = tmp_path / "run" / "checkpoints" / "7"
    save_checkpoint(folder, policy, {"task": "Hopper", "step": 7}, train_state={"step": torch.tensor(7)})
    return folder


# -- malformed checkpoints: one line, exit 2 (item 10) ---------------------------------------------------
@pytest.mark.parametrize("content, fragment", [
    ("[1, 2, 3]", "a JSON list"),
    ('"just a string"', "a JSON str"),
    ("{not json", "not valid JSON"),
])
def test_config_json_not_an_object_is_one_line(capsys, checkpoint: Path, content: str, fragment: str) -> None:
    (checkpoint / "config.json").write_text(content)
    for command in (["eval", checkpoint, "--episodes", "1", "--k", "1"], ["describe", checkpoint]):
        code, _, err = run_cli(capsys, *command)
        assert_one_line_error(code, err, "config.json", fragment)
    with pytest.raises(FlowrlError):
        load_policy(checkpoint)


@pytest.mark.parametrize("key, value, fragment", [
    ("policy", 5, "'policy' must be an object"),
    ("policy", {"head": "reflow", "hidden_dim": "wide"}, "hidden_dim"),
    ("policy", {"head": "diffusion"}, "head"),
    ("policy", {"horizon": 2, "act_steps": 4}, "act_steps"),
    ("obs_dim", "eleven", "'obs_dim' must be a positive integer"),
    ("act_dim", -3, "'act_dim' must be a positive integer"),
    ("task", ["Hopper"], "'task' must be a string"),
])
def test_config_json_with_wrong_types_is_one_line(capsys, checkpoint: Path, key: str, value, fragment: str) -> None:
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg[key] = value
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "eval", checkpoint, "--episodes", "1", "--k", "1")
    assert_one_line_error(code, err, "config.json", fragment)


def test_truncated_weights_are_one_line(capsys, checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli(capsys, "describe", checkpoint)
    assert_one_line_error(code, err, "model.safetensors", "corrupt")


@pytest.mark.parametrize("garbage", [b"", b"\x00garbage" * 10, b"PK\x03\x04 truncated zip"])
def test_garbage_train_state_is_a_flowrl_error(checkpoint: Path, garbage: bytes) -> None:
    (checkpoint / "train_state.pt").write_bytes(garbage)
    with pytest.raises(FlowrlError, match="train_state.pt: corrupt training state"):
        load_train_state(checkpoint)


def test_resume_from_garbage_train_state_is_one_line(capsys, tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / "30" / "train_state.pt").write_bytes(b"not a torch file")
    code, _, err = run_cli(capsys, "pretrain", "--resume", "--out", run, "--quiet")
    lines = [line for line in err.splitlines() if line.startswith("flowrl")]
    assert code == 2 and lines == [lines[0]] and "train_state.pt: corrupt training state" in lines[0], err
    assert "Traceback" not in err


# -- the Python API takes run folders like the CLI (item 7) ---------------------------------------------
def test_load_policy_takes_a_run_folder(tiny_run: Path) -> None:
    policy, config = load_policy(tiny_run)  # best if it has one, else the newest: as `flowrl eval RUN`
    assert (tiny_run / "checkpoints" / "best").is_dir()
    same, _ = load_policy(tiny_run / "checkpoints" / "best")
    for (k, a), (_, b) in zip(policy.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), k
    assert config["task"] == "Hopper"
    with pytest.raises(FlowrlError, match="checkpoint not found"):
        load_policy(tiny_run / "no-such-folder")


# -- observation layout (item 11) ------------------------------------------------------------------------
def test_checkpoints_record_their_observation_layout(tiny_run: Path) -> None:
    from flowrl.envs import resolve_task

    cfg = json.loads((tiny_run / "checkpoints" / "30" / "config.json").read_text())
    assert cfg["observation_layout"] == [list(p) for p in resolve_task("Hopper").obs_layout]


def test_describe_prints_task_policy_layout_and_bounds(capsys, tiny_run: Path) -> None:
    code, out, _ = run_cli(capsys, "describe", tiny_run)
    assert code == 0
    assert "task         Hopper" in out
    assert "reflow head, K = 4" in out and "chunks of 4 actions" in out and "1 observation(s) of history" in out
    policy, _ = load_policy(tiny_run)
    assert f"{sum(p.numel() for p in policy.parameters()):,} parameters" in out
    from flowrl.envs import resolve_task

    layout = resolve_task("Hopper").obs_layout
    if layout:
        for name, _size in layout:
            assert name in out
    else:
        assert "(one vector of 11)" in out
    assert "action       3 float values" in out
    assert out.count("       -1         1") == 3  # Hopper's torques are in [-1, 1]
    code, info, _ = run_cli(capsys, "eval", tiny_run, "--info")
    assert code == 0 and info == out  # `eval --info` is the same output and evaluates nothing


def test_describe_robosuite_layout_names_order_and_indices(tmp_path: Path) -> None:
    from flowrl.describe import describe_checkpoint, format_description
    from flowrl.envs import resolve_task

    policy = FlowPolicy(PolicyConfig(hidden_dim=16, depth=1), 19, 7)
    old = save_checkpoint(tmp_path / "old", policy, {"task": "robosuite/Lift"})  # predates recorded layouts
    d = describe_checkpoint(old)
    parts = d["observation"]["layout"]
    assert [(p["name"], p["size"]) for p in parts] == list(resolve_task("robosuite/Lift").obs_layout)
    assert [p["start"] for p in parts] == [0, 10, 13, 17]
    assert "registry" in d["observation"]["layout_source"]
    text = format_description(d)
    assert "  0-9          10  object" in text and "  17-18         2  robot0_gripper_qpos" in text
    assert "robot0_gripper" in text
    # a recorded layout wins over the registry's, and one that does not add up is refused
    recorded = save_checkpoint(tmp_path / "new", policy, {"task": "robosuite/Lift",
                                                          "observation_layout": [["a", 12], ["b", 7]]})
    assert [p["name"] for p in describe_checkpoint(recorded)["observation"]["layout"]] == ["a", "b"]
    bad = save_checkpoint(tmp_path / "bad", policy, {"task": "robosuite/Lift", "observation_layout": [["a", 5]]})
    with pytest.raises(FlowrlError, match="add up to 5"):
        describe_checkpoint(bad)


# -- flowrl plot (item 11) --------------------------------------------------------------------------------
def test_plot_one_run(capsys, tiny_run: Path, tmp_path: Path) -> None:
    out_png = tmp_path / "curves.png"
    code, out, err = run_cli(capsys, "plot", tiny_run, "--out", out_png)
    assert code == 0, err
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eval/mean_reward" in out and "at step 30" in out and "3 points" in out
    code, _, err = run_cli(capsys, "plot", tiny_run, "--out", tmp_path / "wall.png", "--x", "wall_clock")
    assert code == 0 and (tmp_path / "wall.png").stat().st_size > 1000, err


def test_plot_groups_runs_that_differ_only_by_seed(tiny_run: Path, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from flowrl.plot import plot_runs

    def copy(name: str, **changes) -> Path:
        run = tmp_path / name
        shutil.copytree(tiny_run, run)
        cfg = OmegaConf.load(run / "config.yaml")
        for k, v in changes.items():
            OmegaConf.update(cfg, k, v)
        OmegaConf.save(cfg, run / "config.yaml")
        return run

    a, b, c = copy("s1", seed=1), copy("s2", seed=2), copy("lr", **{"train.lr": 0.5})
    drawn = plot_runs([tiny_run, a, b, c], tmp_path / "all.png")
    assert drawn["groups"] == [[str(tiny_run), str(a), str(b)], [str(c)]]
    assert (tmp_path / "all.png").is_file()


def test_plot_errors_are_one_line(capsys, tmp_path: Path, tiny_run: Path, monkeypatch) -> None:
    code, _, err = run_cli(capsys, "plot", tmp_path / "missing")
    assert_one_line_error(code, err, "run folder not found")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "plot", tmp_path / "empty")
    assert_one_line_error(code, err, "no TensorBoard event files")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the bench extra were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    code, _, err = run_cli(capsys, "plot", tiny_run, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "matplotlib", "bench")


# -- videos (items 2, 3) ---------------------------------------------------------------------------------
def test_frame_stride_plays_in_real_time() -> None:
    from flowrl.video import frame_stride

    assert frame_stride(125.0) == (5, 25.0)  # Hopper, Walker2d: dt 0.008 s
    assert frame_stride(20.0) == (1, 20.0)  # robosuite's control rate, Ant, HalfCheetah
    stride, fps = frame_stride(1 / 0.015)  # Humanoid: no integer rate below 60 fps
    assert stride == 2 and fps == pytest.approx(100 / 3)
    for rate in (125.0, 20.0, 1 / 0.015, 500.0, 1000.0, 7.0):
        stride, fps = frame_stride(rate)
        assert fps * stride == pytest.approx(rate) and fps <= 60  # real time, a sane frame rate
    with pytest.raises(ValueError):
        frame_stride(0.0)


class StubRenderer:
    """Records the state each frame shows instead of drawing it (no OpenGL needed)."""

    made: list["StubRenderer"] = []

    def __init__(self, model, width: int, height: int) -> None:
        self.size, self.qpos, self.cameras, self.closed = (width, height), [], [], False
        StubRenderer.made.append(self)

    def frame(self, data, camera) -> np.ndarray:
        self.qpos.append(np.array(data.qpos))
        self.cameras.append(camera)
        return np.zeros((self.size[1], self.size[0], 3), np.uint8)

    def close(self) -> None:
        self.closed = True


def _reference_episode(policy: FlowPolicy, seed: int) -> tuple[int, list[np.ndarray]]:
    """The same episode stepped independently: its length and the qpos after every step it ran."""
    from flowrl.envs import make
    from flowrl.rollout import FlowChunkPolicy

    env = make("Hopper", 1, backend="cpu")
    obs = env.reset(seed=seed)
    chunk_policy = FlowChunkPolicy(policy, 2, torch.Generator().manual_seed(seed))
    states = [env.get_state()[0][0].numpy().copy()]
    while True:
        chunk = chunk_policy.act_chunk(obs.unsqueeze(1))[:, :policy.cfg.act_steps]
        for j in range(chunk.shape[1]):
            r = env.step_chunk(chunk[:, j:j + 1])
            if bool(r.done[0]):
                env.close()
                return len(states), states
            states.append(env.get_state()[0][0].numpy().copy())
            obs = r.obs


def test_locomotion_video_is_one_whole_episode_from_a_tracking_camera() -> None:
    import mujoco

    from flowrl.video import episode_video

    torch.manual_seed(0)
    policy = FlowPolicy(PolicyConfig(hidden_dim=16, depth=1), 11, 3)  # untrained: Hopper falls within ~100 steps
    StubRenderer.made.clear()
    video = episode_video("Hopper", policy, num_steps=2, seed=123, renderer=StubRenderer)
    length, states = _reference_episode(policy, 123)
    assert video.length == length and 0 < length < 1000
    assert (video.stride, video.fps) == (5, 25.0)
    # a frame every 5th step while the episode runs, none after its end (no next episode's reset pose)
    assert video.frame_steps == list(range(0, length, 5))
    stub = StubRenderer.made[-1]
    assert len(video.frames) == len(stub.qpos) == len(range(0, length, 5)) and stub.closed
    for t, qpos in zip(video.frame_steps, stub.qpos):
        np.testing.assert_array_equal(qpos, states[t])
    cam = stub.cameras[0]
    assert cam.type == mujoco.mjtCamera.mjCAMERA_TRACKING and cam.trackbodyid == 1  # follows the torso


def test_cli_video_after_the_evaluation_is_saved(capsys, checkpoint: Path, monkeypatch) -> None:
    """A failing video costs nothing of the evaluation: the table is printed and eval.json written first."""
    import flowrl.video

    def broken(*args, **kwargs):
        raise FlowrlError("cannot render videos: no offscreen OpenGL (egl: stub); set MUJOCO_GL=egl")

    monkeypatch.setattr(flowrl.video, "record_video", broken)
    code, out, err = run_cli(capsys, "eval", checkpoint, "--episodes", "1", "--k", "1", "--video")
    assert_one_line_error(code, err, "MUJOCO_GL")
    assert "return mean" in out  # the table
    records = json.loads((checkpoint.parent.parent / "eval.json").read_text())["evaluations"]
    assert records[-1]["results"][0]["num_steps"] == 1


def test_cli_video_writes_a_real_time_mp4(capsys, checkpoint: Path) -> None:
    why = gl_missing()
    if why:
        pytest.skip(f"no offscreen OpenGL here: {why}")
    import imageio.v2 as imageio

    code, out, err = run_cli(capsys, "eval", checkpoint, "--episodes", "1", "--k", "2", "--video")
    assert code == 0, err
    path = checkpoint.parent.parent / "videos" / "7_K2.mp4"
    assert f"video: {path}" in out
    reader = imageio.get_reader(path)
    meta = reader.get_meta_data()
    frames = [f for f in reader]
    reader.close()
    assert meta["fps"] == 25.0 and frames[0].shape[2] == 3
    # the evaluation's episode (same env seed, same initial noise): a frame every 5th of its steps
    length = json.loads((checkpoint.parent.parent / "eval.json").read_text())["evaluations"][-1]["results"][0]
    assert len(frames) == len(range(0, int(length["length_mean"]), 5))
    assert frames[0].std() > 5  # a picture, not a blank frame


@pytest.mark.slow  # robosuite worker processes: seconds each; run with -m slow
def test_robosuite_video_from_agentview() -> None:
    pytest.importorskip("robosuite")
    import mujoco

    from flowrl.video import episode_video

    policy = FlowPolicy(PolicyConfig(hidden_dim=16, depth=1), 19, 7)
    StubRenderer.made.clear()
    video = episode_video("robosuite/Lift", policy, num_steps=1, seed=5, size=(32, 24), renderer=StubRenderer)
    assert (video.stride, video.fps) == (1, 20.0) and video.length == 400  # robosuite's 20 Hz, whole horizon
    assert len(video.frames) == 401 and video.frame_steps[-1] == 400  # the first state and every step, no more
    cam = StubRenderer.made[-1].cameras[0]
    assert cam.type == mujoco.mjtCamera.mjCAMERA_FIXED


def test_cli_eval_per_episode(capsys, checkpoint: Path, monkeypatch) -> None:
    """--per-episode: each episode's numbers in the JSON; the table names the env seeds of failed episodes."""
    code, out, _ = run_cli(capsys, "eval", checkpoint, "--episodes", "2", "--k", "1", "--per-episode", "--json")
    row = json.loads(out)["results"][0]
    assert code == 0 and len(row["episode_returns"]) == len(row["episode_lengths"]) == 2
    assert np.mean(row["episode_returns"]) == pytest.approx(row["return_mean"])
    assert "episode_success" not in row  # Hopper has no success
    import flowrl.evaluation

    def with_failures(self, policy, k, episodes, seed=None, per_episode=False):
        return {"num_steps": k, "episodes": 3, "seed": 100_000, "return_mean": 1 / 3, "return_std": 0.5,
                "length_mean": 300.0, "length_std": 100.0, "wall_clock_s": 1.0, "success_rate": 1 / 3,
                **({"episode_success": [False, True, False]} if per_episode else {})}

    monkeypatch.setattr(flowrl.evaluation.Evaluator, "__call__", with_failures)
    code, out, _ = run_cli(capsys, "eval", checkpoint, "--episodes", "3", "--k", "1", "4", "--per-episode")
    assert code == 0 and "K=1: 2 failed episode(s), env seeds 100000 100002" in out and "K=4: 2 failed" in out
    code, out, _ = run_cli(capsys, "eval", checkpoint, "--episodes", "3", "--k", "1")
    assert "failed episode" not in out
