"""Camera images of the cpu backend's robosuite scenes: each env's own state, robosuite's image of the same
state (flipped: robosuite's rows start at the bottom), clear errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import gl_missing

from flowrl.envs import make
from flowrl.errors import FlowrlError


needs_gl = pytest.mark.skipif(gl_missing() is not None, reason="no offscreen OpenGL here")


@needs_gl
def test_every_env_is_rendered_from_its_own_state() -> None:
    from flowrl.envs.cameras import CameraRenderer

    env = make("robosuite/Lift", 3, backend="cpu", seed=0)
    env.reset()
    with CameraRenderer(env, ["agentview"], height=32, width=40) as cams:
        images = cams.render()["agentview"]
        assert images.shape == (3, 32, 40, 3) and images.dtype == torch.uint8
        assert not torch.equal(images[0], images[1])  # the cubes lie in different places
        again = cams.render([2, 0])["agentview"]
        assert torch.equal(again[0], images[2]) and torch.equal(again[1], images[0])
        qpos, qvel = env.get_state()
        env.set_state(qpos[[0, 0, 0]], qvel[[0, 0, 0]])
        same = cams.render()["agentview"]
        assert torch.equal(same[1], images[0]) and torch.equal(same[2], images[0])
        with pytest.raises(FlowrlError, match=r"env ids \[3\] out of range"):
            cams.render([3])
    env.close()


def test_unknown_cameras_and_envs_without_images_are_one_line_errors() -> None:
    from flowrl.envs.cameras import CameraRenderer

    env = make("robosuite/Lift", 1, backend="cpu", seed=0)
    with pytest.raises(FlowrlError, match=r"robosuite/Lift has no camera wristcam \(it has: frontview, .*agentview"):
        CameraRenderer(env, ["agentview", "wristcam"])
    with pytest.raises(FlowrlError, match="size must be positive"):
        CameraRenderer(env, ["agentview"], height=0)
    env.close()
    with pytest.raises(FlowrlError, match="the object env renders none"):
        CameraRenderer(object())


@pytest.mark.slow
@needs_gl
def test_images_equal_robosuites_own_camera_observations_flipped() -> None:
    """robosuite renders the same state (its offscreen renderer, robomimic's cameras at 84 x 84): the mean
    absolute difference is under 2 of 255 per channel (measured 0.6-0.8), against 50+ unflipped."""
    from test_manipulation_tasks import ENV_KWARGS, _copy_state, _robosuite

    from flowrl.envs.cameras import ROBOMIMIC_CAMERAS, CameraRenderer

    kwargs = {**ENV_KWARGS, "has_offscreen_renderer": True, "use_camera_obs": True,
              "camera_names": list(ROBOMIMIC_CAMERAS), "camera_heights": 84, "camera_widths": 84}
    rs = _robosuite().make("Lift", **kwargs)
    rs.rng.bit_generator.state = np.random.default_rng(7).bit_generator.state
    rs.reset()
    rng = np.random.default_rng(0)
    ours = make("robosuite/Lift", 1, backend="cpu", seed=0)
    ours.reset()
    with CameraRenderer(ours) as cams:
        for _ in range(2):
            obs, *_ = rs.step(rng.uniform(-1, 1, 7))
            _copy_state(rs, ours)
            images = cams.render()
            for cam in ROBOMIMIC_CAMERAS:
                theirs = obs[f"{cam}_image"].astype(np.int16)
                mine = images[cam][0].numpy().astype(np.int16)
                assert np.abs(mine - np.flipud(theirs)).mean() < 2.0, cam
                assert np.abs(mine - theirs).mean() > 30.0, cam  # the orientation is what differs
    rs.close()
    ours.close()


@pytest.mark.slow
@needs_gl
@pytest.mark.parametrize("backend", ["cpu", "warp"])
def test_collected_images_are_the_states_before_each_step(tmp_path, backend) -> None:
    """``flowrl collect --cameras``: the first image of a demonstration is the seeded reset state's (cpu:
    OpenGL; warp, on Warp's CPU device here: the batched ray tracer)."""
    from flowrl.agents.collect import collect
    from flowrl.datasets import read_dataset
    from flowrl.envs import warp_available
    from flowrl.envs.cameras import camera_renderer

    if backend == "warp" and not warp_available():
        pytest.skip("mujoco-warp not installed")
    path = tmp_path / "lift_images.hdf5"
    written = collect("scripted", path, episodes=1, task="robosuite/Lift", num_envs=1, seed=5, fmt="robomimic",
                      backend=backend, progress=False, after_success=0, cameras=["agentview"], image_size=16)
    back = read_dataset(path, cameras=["agentview"])
    frames = back.images["agentview"]
    assert frames.shape == (written.num_transitions, 16, 16, 3)
    np.testing.assert_array_equal(frames, written.images["agentview"])
    env = make("robosuite/Lift", 1, backend=backend, device="cpu")
    env.reset(seed=5)
    with camera_renderer(env, ["agentview"], 16, 16) as cams:
        first = cams.render()["agentview"][0].cpu().numpy()
    env.close()
    np.testing.assert_array_equal(frames[0], first)
    assert not np.array_equal(frames[0], frames[-1])  # the arm has moved
    with pytest.raises(FlowrlError, match="--format robomimic"):
        collect("scripted", tmp_path / "x.hdf5", episodes=1, task="robosuite/Lift", num_envs=1, backend="cpu",
                progress=False, cameras=["agentview"])
    assert not (tmp_path / "x.hdf5").exists()


@pytest.mark.slow
@needs_gl
def test_warp_ray_traced_images_match_the_opengl_renderer_of_the_same_states() -> None:
    """MuJoCo Warp's batched renderer (Warp's CPU device here) against MuJoCo's OpenGL renderer, the same
    Lift states in two worlds: same orientation and scene (mean absolute difference under 16 of 255,
    measured ~7-9 at 84 x 84 from the lighting models' difference; 50+ when flipped), each world its own
    state, ``ids`` selecting worlds."""
    from flowrl.envs import warp_available
    from flowrl.envs.cameras import CameraRenderer, WarpCameraRenderer, camera_renderer

    if not warp_available():
        pytest.skip("mujoco-warp not installed")
    warp_env = make("robosuite/Lift", 2, backend="warp", device="cpu", seed=0)
    warp_env.reset(seed=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        warp_env.step(0.5 * torch.randn((2, warp_env.act_dim), generator=gen))
    cpu_env = make("robosuite/Lift", 2, backend="cpu", seed=0)
    qpos, qvel = warp_env.get_state()
    cpu_env.set_state(qpos.double(), qvel.double())
    cameras = ["agentview", "robot0_eye_in_hand"]
    renderer = camera_renderer(warp_env, cameras, 48, 48)
    assert isinstance(renderer, WarpCameraRenderer)
    traced = renderer.render()
    with CameraRenderer(cpu_env, cameras, 48, 48) as gl:
        drawn = gl.render()
    for c in cameras:
        assert traced[c].dtype == torch.uint8 and traced[c].shape == (2, 48, 48, 3)
        same = (traced[c].float() - drawn[c].float()).abs().mean()
        flipped = (traced[c].flip(1).float() - drawn[c].float()).abs().mean()
        assert same < 16 and flipped > 3 * same, (c, float(same), float(flipped))
    assert not torch.equal(traced["agentview"][0], traced["agentview"][1])  # two worlds, two states
    torch.testing.assert_close(renderer.render([1])["agentview"][0], traced["agentview"][1], rtol=0, atol=0)
    with pytest.raises(FlowrlError, match="out of range"):
        renderer.render([2])


@pytest.mark.slow
@needs_gl
def test_robosuite_backend_images_are_robosuites_own_top_row_first() -> None:
    """The robosuite backend's images (robosuite's renderer in its workers) equal robosuite's own camera
    observations of the same seeded reset flipped to top row first, and our OpenGL renderer's of that
    state within 2 of 255; a chunk brings back each step's images and the last ones of an ended episode."""
    from test_manipulation_tasks import ENV_KWARGS, _copy_state, _robosuite

    from flowrl.envs.cameras import ROBOMIMIC_CAMERAS, CameraRenderer, RobosuiteCameraRenderer, camera_renderer

    env = make("robosuite/Lift", 1, backend="robosuite", seed=0, render=True, horizon=3)
    try:
        env.reset(seed=7)
        renderer = camera_renderer(env, list(ROBOMIMIC_CAMERAS), 84, 84)
        assert isinstance(renderer, RobosuiteCameraRenderer)
        images = renderer.render()
        renderer.capture(every_step=True)
        result = env.step_chunk(torch.zeros((1, 4, env.act_dim)))
        assert bool(result.truncated[0]) and result.info["step_images"]["agentview"].shape == (1, 4, 84, 84, 3)
        torch.testing.assert_close(result.info["final_images"]["agentview"][0],
                                   result.info["step_images"]["agentview"][0, 2], rtol=0, atol=0)
        assert not bool(result.info["step_images"]["agentview"][0, 3].any())  # no fourth step was taken
        renderer.close()
    finally:
        env.close()
    kwargs = {**ENV_KWARGS, "has_offscreen_renderer": True, "use_camera_obs": True,
              "camera_names": list(ROBOMIMIC_CAMERAS), "camera_heights": 84, "camera_widths": 84}
    rs = _robosuite().make("Lift", **kwargs)
    rs.rng.bit_generator.state = np.random.default_rng(7).bit_generator.state
    obs = rs.reset()
    ours = make("robosuite/Lift", 1, backend="cpu", seed=0)
    ours.reset()
    _copy_state(rs, ours)
    with CameraRenderer(ours) as cams:
        drawn = cams.render()
    for cam in ROBOMIMIC_CAMERAS:
        np.testing.assert_array_equal(images[cam][0].numpy(), np.flipud(obs[f"{cam}_image"]))
        assert np.abs(images[cam][0].numpy().astype(np.int16) - drawn[cam][0].numpy().astype(np.int16)).mean() < 2.0
    rs.close()
    ours.close()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.slow
@needs_gl
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_a_rendering_robosuite_worker_keeps_its_memory_over_resets() -> None:
    """robosuite rebuilds its simulator at every reset; a rendering worker frees the old one and its GL
    context first (with robosuite's default it grew by gigabytes over tens of resets)."""
    from flowrl.envs.cameras import camera_renderer

    env = make("robosuite/Lift", 1, backend="robosuite", seed=0, render=True)
    try:
        renderer = camera_renderer(env, ["agentview"], 84, 84)
        pid, rss = env._procs[0].pid, []
        for _ in range(25):
            env.reset()
            assert renderer.render()["agentview"].float().mean() > 10  # still draws the scene
            rss.append(_rss_mb(pid))
        # leaking, each reset adds ~300 MB until the garbage collector frees some: a sawtooth
        assert max(rss[5:]) - min(rss[5:]) < 150, f"worker memory over resets: {[round(m) for m in rss]} MB"
    finally:
        env.close()
