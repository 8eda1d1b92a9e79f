"""A new user's first hour: every mistake is one line and exit 2 (malformed checkpoints, an unusable
--device, an unwritable --out, a malformed YAML with its line and column, a preset of the other stage, a
busy port); a run folder stands for one checkpoint everywhere, the final table's included; the Python API
takes run folders like the CLI; checkpoints describe their observation layout; runs plot without
TensorBoard, with spread, demonstrations and an honest axis; `config show` takes every shipped preset;
nothing shipped is overwritten by the help's examples; and videos show one whole episode, in real time,
from a camera that follows the robot."""

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
                 "train.checkpoint_every=10", "eval.episodes=2", "eval.k=[1]", "policy.hidden_dim=32"])
    assert code == 0
    return out


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    """A small, valid Hopper checkpoint inside a run folder."""
    policy = FlowPolicy(PolicyConfig(hidden_dim=16, depth=1), 11, 3)
    folder = tmp_path / "run" / "checkpoints" / "7"
    save_checkpoint(folder, policy, {"task": "Hopper", "step": 7}, train_state={"step": torch.tensor(7)})
    return folder


# -- malformed checkpoints: one line, exit 2 ----------------------------------------------------------------
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


# -- the Python API takes run folders like the CLI ------------------------------------------------------
def test_load_policy_takes_a_run_folder(tiny_run: Path) -> None:
    policy, config = load_policy(tiny_run)  # as `flowrl eval RUN`: `best` chosen on 2 episodes is not used
    assert (tiny_run / "checkpoints" / "best").is_dir()
    same, _ = load_policy(tiny_run / "checkpoints" / "30")
    for (k, a), (_, b) in zip(policy.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), k
    assert config["task"] == "Hopper"
    with pytest.raises(FlowrlError, match="checkpoint not found"):
        load_policy(tiny_run / "no-such-folder")


# -- observation layout ---------------------------------------------------------------------------------
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


# -- flowrl plot ----------------------------------------------------------------------------------------
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


# -- videos ---------------------------------------------------------------------------------------------
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
    video = episode_video("Hopper", policy, k=2, seed=123, renderer=StubRenderer)
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
    assert records[-1]["results"][0]["k"] == 1


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
    video = episode_video("robosuite/Lift", policy, k=1, seed=5, size=(32, 24), renderer=StubRenderer)
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
        return {"k": k, "episodes": 3, "seed": 100_000, "return_mean": 1 / 3, "return_std": 0.5,
                "length_mean": 300.0, "length_std": 100.0, "wall_clock_s": 1.0, "success_rate": 1 / 3,
                **({"episode_success": [False, True, False]} if per_episode else {})}

    monkeypatch.setattr(flowrl.evaluation.Evaluator, "__call__", with_failures)
    code, out, _ = run_cli(capsys, "eval", checkpoint, "--episodes", "3", "--k", "1", "4", "--per-episode")
    assert code == 0 and "K=1: 2 failed episode(s), env seeds 100000 100002" in out and "K=4: 2 failed" in out
    code, out, _ = run_cli(capsys, "eval", checkpoint, "--episodes", "3", "--k", "1")
    assert "failed episode" not in out


# -- an unusable --device: one line, exit 2, for every command that takes one ------------------------------
@pytest.fixture()
def cpu_only_torch(monkeypatch) -> None:
    """As on a CPU-only build of torch, whatever this machine has."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_on_a_cpu_only_torch_is_one_line(capsys, checkpoint: Path, tmp_path: Path, cpu_only_torch) -> None:
    out = tmp_path / "demos.hdf5"
    for command in (["eval", checkpoint, "--device", "cuda"],
                    ["collect", "scripted", "--task", "robosuite/Lift", "--backend", "warp", "--device", "cuda",
                     "--episodes", "2", "--out", out],
                    ["collect", checkpoint, "--device", "cuda:0", "--episodes", "2", "--out", out],
                    ["expert", "Hopper", "--device", "cuda", "--out", tmp_path / "expert"]):
        code, _, err = run_cli(capsys, *command)
        device = command[command.index("--device") + 1]
        assert_one_line_error(code, err, f"--device {device}: this torch", "has no CUDA", "cpu")
    assert not out.exists() and not (tmp_path / "expert").exists()
    code, _, err = run_cli(capsys, "eval", checkpoint, "--device", "gpu")
    assert_one_line_error(code, err, "--device gpu: not a torch device")


def test_device_beyond_the_gpus_present_is_one_line(capsys, checkpoint: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = run_cli(capsys, "eval", checkpoint, "--device", "cuda:3")
    assert_one_line_error(code, err, "--device cuda:3", "1 CUDA device(s)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CUDA build on a machine without a GPU
    code, _, err = run_cli(capsys, "eval", checkpoint, "--device", "cuda")
    assert_one_line_error(code, err, "--device cuda", "no GPU visible")


def test_config_device_on_a_cpu_only_torch_is_one_line(capsys, hopper_dataset: Path, tmp_path: Path,
                                                       cpu_only_torch) -> None:
    code, _, err = run_cli(capsys, "pretrain", REPO / "configs" / "quickstart.yaml", f"data.path={hopper_dataset}",
                           "device=cuda", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "config: device: 'cuda'", "has no CUDA")
    assert not (tmp_path / "run").exists()


# -- an output that cannot be written: one line naming it, before any work --------------------------------
def test_export_to_an_unwritable_path_is_one_line(capsys, checkpoint: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    targets = [blocker / "h.onnx"] + ([Path("/proc/nope/h.onnx")] if Path("/proc/self").is_dir() else [])
    for target in targets:
        code, _, err = run_cli(capsys, "export", checkpoint, "--format", "onnx", "--out", target)
        assert_one_line_error(code, err, f"--out {target}: cannot")
    code, _, err = run_cli(capsys, "export", checkpoint, "--format", "onnx", "--out", tmp_path)
    assert_one_line_error(code, err, f"--out {tmp_path}: is a folder")
    code, _, err = run_cli(capsys, "plot", checkpoint.parent.parent, "--out", blocker / "curves.png")
    assert_one_line_error(code, err, "curves.png: cannot")


# -- collect keeps an existing file unless --force; the help's examples write nothing shipped ---------------
def test_collect_keeps_an_existing_file_unless_forced(capsys, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "demos.hdf5"
    out.write_bytes(b"precious")
    code, _, err = run_cli(capsys, "collect", checkpoint, "--episodes", "2", "--num-envs", "2", "--out", out)
    assert_one_line_error(code, err, f"--out {out}: exists", "--force")
    assert out.read_bytes() == b"precious"
    code, stdout, err = run_cli(capsys, "collect", checkpoint, "--episodes", "2", "--num-envs", "2", "--out", out,
                                "--force")
    assert code == 0, err
    assert f"wrote {out}: 2 episodes" in stdout and out.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


def test_help_examples_write_nothing_shipped(capsys) -> None:
    import re
    import subprocess

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    outs = re.findall(r"--out (\S+)", help_text)
    assert any(o.endswith(".hdf5") for o in outs), help_text  # the collect example is there
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    shipped = set(tracked) or {str(p.relative_to(REPO)) for p in (REPO / "data").rglob("*") if p.is_file()}
    for out in outs:
        assert out not in shipped and not (REPO / out).is_file(), f"`flowrl --help` example overwrites {out}"


def test_the_readme_export_folder_is_ignored_by_git() -> None:
    import subprocess

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("deploy/hopper.onnx", "deploy/hopper.onnx.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert ignored.returncode == 0, f"{path} is not git-ignored"
    kept = subprocess.run(["git", "check-ignore", "-q", "flowrl/deploy/server.py"], cwd=REPO)
    assert kept.returncode == 1  # the package's own deploy module stays tracked


# -- config files: line and column of a YAML mistake; a preset of the other stage ---------------------------
@pytest.mark.parametrize("text, where", [
    ("task: Hopper\ndata: [unclosed\ntrain: {}\n", "line 3, column 6"),
    ("task: Hopper\n  data: x\n", "line 2, column 7"),
    ("task: 'Hopper\n", "line 2, column 1"),
])
def test_malformed_yaml_names_line_and_column(capsys, tmp_path: Path, text: str, where: str) -> None:
    import yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(yaml.YAMLError) as raised:
        yaml.safe_load(text)
    mark = raised.value.problem_mark  # PyYAML's own position, 0-based
    assert where == f"line {mark.line + 1}, column {mark.column + 1}"
    for command in (["pretrain", bad], ["config", "show", bad]):
        code, _, err = run_cli(capsys, *command)
        assert_one_line_error(code, err, f"{bad}: not valid YAML: {where}: ")


def test_a_preset_of_the_other_stage_says_which_command_takes_it(capsys, tmp_path: Path, checkpoint: Path) -> None:
    finetune = REPO / "configs" / "hopper" / "finetune_reflow.yaml"
    code, _, err = run_cli(capsys, "pretrain", finetune, "--out", tmp_path / "a")
    assert_one_line_error(code, err, f"{finetune} is a finetune config, not a pretrain one",
                          f"flowrl finetune {finetune} --init RUN")
    mle = REPO / "configs" / "hopper" / "finetune_mle.yaml"
    code, _, err = run_cli(capsys, "pretrain", mle, "--out", tmp_path / "b")
    assert_one_line_error(code, err, "is a finetune config (algo: mle)", "flowrl finetune")
    pretrain = REPO / "configs" / "hopper" / "pretrain_reflow.yaml"
    code, _, err = run_cli(capsys, "finetune", pretrain, "--init", checkpoint, "--out", tmp_path / "c")
    assert_one_line_error(code, err, f"{pretrain} is a pretrain config, not a finetune one",
                          f"flowrl pretrain {pretrain}")
    assert not any((tmp_path / n).exists() for n in "abc")
    # a typo in a preset of the right stage is still named as such
    code, _, err = run_cli(capsys, "pretrain", pretrain, "train.stepz=3")
    assert_one_line_error(code, err, "train.stepz", "not in 'BCConfig'")
    # a preset that names no task
    no_task = tmp_path / "no_task.yaml"
    no_task.write_text("data:\n  path: data/hopper-medium.hdf5\n")
    code, _, err = run_cli(capsys, "pretrain", no_task, "--out", tmp_path / "d")
    assert_one_line_error(code, err, "task: required but not set")


# -- flowrl config show takes every shipped preset ---------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_config_show_takes_every_shipped_preset(capsys, preset: str, cpu_only_torch) -> None:
    from omegaconf import OmegaConf

    code, out, err = run_cli(capsys, "config", "show", REPO / preset)
    assert code == 0, err
    assert "note:" not in err  # shipped presets use the current key names (no RenamedWarning)
    shown = OmegaConf.create(out)
    preset_cfg = OmegaConf.load(REPO / preset)
    assert shown.task == preset_cfg.get("task", shown.task) and shown.algo
    for key, value in OmegaConf.to_container(preset_cfg.get("train", {})).items():
        assert shown.train[key] == value, key  # the preset's own values, resolved
    if "data" in shown:  # pretraining: no key left to the command line
        assert not out.startswith("#")
    else:  # fine-tuning: the pretrained checkpoint comes from --init at run time
        assert out.startswith("# unset, given when the finetune runs: init") and OmegaConf.is_missing(shown, "init")
        code, out, _ = run_cli(capsys, "config", "show", REPO / preset, "init=runs/pretrained")
        assert code == 0 and OmegaConf.create(out).init == "runs/pretrained" and not out.startswith("#")


# -- flowrl serve on a busy port: its own line only ----------------------------------------------------------
def test_serve_on_a_busy_port_is_one_line(capfd, checkpoint: Path) -> None:
    pytest.importorskip("grpc")
    pytest.importorskip("grpc_tools")
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", str(checkpoint), "--port", str(port)])
    _, err = capfd.readouterr()  # file-descriptor level: gRPC's C core would write here
    assert_one_line_error(code, err, f"cannot listen on 127.0.0.1:{port}: the port is in use", "--port 0")


# -- MuJoCo's settotalmass deprecation, from gymnasium's HalfCheetah model ----------------------------------
def _assert_no_settotalmass(code: str) -> None:
    """``code`` runs in a fresh Python (Python's own warnings off) and prints neither an error nor MuJoCo's
    settotalmass deprecation."""
    import os
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0 and "made" in proc.stdout, proc.stderr
    assert "settotalmass" not in proc.stdout + proc.stderr


def test_halfcheetah_loads_without_mujoco_deprecation_warnings() -> None:
    code = ("from flowrl.envs import make\n"
            "for backend in ('cpu', 'gymnasium'):\n"
            "    env = make('HalfCheetah', 2, backend=backend); env.reset(seed=0); env.close()\n"
            "print('made')\n")
    _assert_no_settotalmass(code)


def test_halfcheetah_expert_without_mujoco_deprecation_warnings() -> None:
    """`flowrl expert HalfCheetah`: SB3's training envs and the snapshot evaluation's gymnasium env."""
    pytest.importorskip("stable_baselines3")
    code = ("import numpy as np\n"
            "from agents.expert import evaluate_snapshot, training_env\n"
            "training_env('HalfCheetah', 'gymnasium', 2, seed=0).close()\n"
            "class Still:\n"
            "    def act(self, obs): return np.zeros((len(obs), 6), dtype=np.float32)\n"
            "evaluate_snapshot(Still(), 'HalfCheetah-v5', 1, seed=0)\n"
            "print('made')\n")
    _assert_no_settotalmass(code)


def test_other_mujoco_warnings_still_show(capsys) -> None:
    import mujoco

    from flowrl.envs.tasks.base import SETTOTALMASS_DEPRECATED, quiet_settotalmass

    before = mujoco.get_mju_user_warning()
    with quiet_settotalmass():
        handler = mujoco.get_mju_user_warning()
        handler(SETTOTALMASS_DEPRECATED + " and will be removed")
        handler("Nan, Inf or huge value in QACC at DOF 0")
    assert mujoco.get_mju_user_warning() is before
    err = capsys.readouterr().err
    assert "settotalmass" not in err and "WARNING: Nan, Inf or huge value in QACC" in err


# -- a run folder stands for one checkpoint: the final table's, eval's, describe's, export's -----------------
def _final_record(run: Path) -> dict:
    return [r for r in json.loads((run / "eval.json").read_text())["evaluations"] if r.get("stage") == "pretrain"][-1]


def test_final_table_is_of_the_checkpoint_eval_run_takes(capsys, tiny_run: Path) -> None:
    """Periodic evaluations of 2 episodes: `best` is kept but the run folder stands for the last checkpoint."""
    final = _final_record(tiny_run)
    assert final["checkpoint"] == str(tiny_run / "checkpoints" / "30") and final["step"] == 30
    assert "fewer than 20" in final["chosen"]
    code, out, err = run_cli(capsys, "eval", tiny_run, "--episodes", "2", "--k", "1", "--json")
    assert code == 0 and "the last checkpoint: `best` was chosen on 2 episodes" in err
    row = json.loads(out)["results"][0]
    assert json.loads(out)["checkpoint"] == final["checkpoint"]
    assert row["return_mean"] == pytest.approx(final["results"][0]["return_mean"], abs=1e-9)


def test_best_stands_for_the_run_when_chosen_on_enough_episodes(capsys, tmp_path: Path, hopper_dataset: Path) -> None:
    from flowrl.checkpoint import checkpoint_choice

    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "pretrain", REPO / "configs" / "quickstart.yaml", "--steps", "20", "--out", run,
                             "--quiet", f"data.path={hopper_dataset}", "train.eval_every=10", "train.eval_episodes=20",
                             "train.checkpoint_every=10", "eval.episodes=3", "eval.k=[1]", "policy.hidden_dim=32")
    assert code == 0, err
    best = run / "checkpoints" / "best"
    assert checkpoint_choice(run) == (best, "`best`, chosen on 20 episodes per evaluation")
    final = _final_record(run)
    best_step = json.loads((best / "config.json").read_text())["step"]
    assert final["checkpoint"] == str(best) and final["step"] == best_step
    assert f"evaluation of {best} (step {best_step}; `best`, chosen on 20 episodes" in out
    code, out, _ = run_cli(capsys, "eval", run, "--episodes", "3", "--k", "1", "--json")
    assert code == 0 and json.loads(out)["results"][0]["return_mean"] == pytest.approx(
        final["results"][0]["return_mean"], abs=1e-9)
    from flowrl.describe import describe_checkpoint

    assert describe_checkpoint(run) == describe_checkpoint(best)


def test_checkpoint_choice_rule(tmp_path: Path) -> None:
    from flowrl.checkpoint import checkpoint_choice, resolve_checkpoint

    policy = FlowPolicy(PolicyConfig(hidden_dim=8, depth=1), 11, 3)
    run = tmp_path / "run"
    for step in (10, 20):
        save_checkpoint(run / "checkpoints" / str(step), policy, {"task": "Hopper", "step": step})
    assert checkpoint_choice(run) == (run / "checkpoints" / "20", "the last checkpoint")
    best = run / "checkpoints" / "best"
    for episodes, expected in ((19, run / "checkpoints" / "20"), (20, best), (256, best)):
        save_checkpoint(best, policy, {"task": "Hopper", "step": 10, "eval": {"episodes": episodes}})
        assert resolve_checkpoint(run) == expected, episodes
    save_checkpoint(best, policy, {"task": "Hopper", "step": 10})  # written before the rule: no record
    assert checkpoint_choice(run)[0] == run / "checkpoints" / "20"
    assert "unrecorded" in checkpoint_choice(run)[1]
    assert checkpoint_choice(best) == (best, "")  # a checkpoint folder is itself


# -- flowrl plot: spread, demonstrations, an honest axis -------------------------------------------------------
def test_plot_draws_spread_demonstrations_and_zero(tiny_run: Path, tmp_path: Path, hopper_episodes) -> None:
    from matplotlib.collections import PolyCollection

    from flowrl.plot import plot_runs

    drawn = plot_runs([tiny_run], tmp_path / "one.png")
    demos = float(np.mean([e["rewards"].sum() for e in hopper_episodes]))
    assert drawn["demonstrations"] == [pytest.approx(demos)]
    low, high = drawn["ylim"]["eval/mean_reward"]
    assert low <= 0 < demos <= high  # the returns (~10 for this tiny policy) are not blown up to fill the panel
    ax = drawn["figure"].axes[0]
    assert any(isinstance(c, PolyCollection) for c in ax.collections)  # the episodes' std band
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(demos)
    assert "demonstrations (" in dashed[0].get_label()


def test_plot_band_of_seeds_is_their_std(tmp_path: Path) -> None:
    from flowrl.plot import Curve, _mean_band

    steps, seconds = np.array([0, 10, 20]), np.array([0.0, 1.0, 2.0])
    curves = [Curve(steps, np.array(v, dtype=float), seconds) for v in ([1, 2, 3], [3, 4, 5], [5, 6, 10])]
    x, mean, low, high = _mean_band(curves, "env_steps")
    np.testing.assert_array_equal(x, steps)
    np.testing.assert_allclose(mean, [3, 4, 6])
    np.testing.assert_allclose(high - mean, np.std([[1, 2, 3], [3, 4, 5], [5, 6, 10]], axis=0, ddof=1))
    np.testing.assert_allclose(mean - low, high - mean)


def test_plot_finds_the_demonstrations_of_a_finetuning_run(tmp_path: Path) -> None:
    from flowrl.plot import demonstrations_return

    policy = FlowPolicy(PolicyConfig(hidden_dim=8, depth=1), 11, 3)
    pre = save_checkpoint(tmp_path / "pre" / "checkpoints" / "100", policy, {"task": "Hopper",
                                                                            "dataset_return_mean": 1643.1})
    save_checkpoint(tmp_path / "ft" / "checkpoints" / "5000", policy, {"task": "Hopper", "init": {"path": str(pre)}})
    assert demonstrations_return(tmp_path / "ft") == pytest.approx(1643.1)
    save_checkpoint(tmp_path / "lone" / "checkpoints" / "1", policy, {"task": "Hopper"})
    assert demonstrations_return(tmp_path / "lone") is None
