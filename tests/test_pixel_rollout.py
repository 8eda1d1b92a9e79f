"""Rolling out policies that see camera images: the images each decision gets are the renders of the
env's state at that decision (and, with a history, after the steps before it), on the cpu backend."""

from __future__ import annotations

import pytest
import torch

from conftest import gl_missing

pytestmark = pytest.mark.skipif(gl_missing(), reason="no offscreen OpenGL (EGL or OSMesa)")

TASK, CAMERA, SIZE, ACT_STEPS, CHUNKS = "robosuite/Lift", "agentview", 16, 2, 3


class RecordingPixelPolicy:
    """Seeded small random actions; keeps every (observation history, images) it is given."""

    cameras = (CAMERA,)
    image_size = SIZE
    act_steps = ACT_STEPS

    def __init__(self, obs_history: int, act_dim: int) -> None:
        self.obs_history, self.act_dim = obs_history, act_dim
        self.gen = torch.Generator().manual_seed(0)
        self.calls: list[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]] = []

    def act_chunk(self, obs: torch.Tensor, noise: torch.Tensor | None = None,
                  images: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        assert images is not None
        actions = 0.3 * torch.randn((obs.shape[0], ACT_STEPS, self.act_dim), generator=self.gen).double()
        self.calls.append((obs.clone(), {c: x.clone() for c, x in images.items()}, actions))
        return actions


def _end_after(chunks: int):
    seen = [0]

    def on_chunk(obs, chunk, result, active):
        seen[0] += 1
        ended = torch.zeros_like(result.valid)
        if seen[0] == chunks:
            ended[:, -1] = True
        return ended

    return on_chunk


@pytest.mark.parametrize("backend,obs_history", [pytest.param("cpu", 1, marks=pytest.mark.slow), ("cpu", 2),
                                                 pytest.param("warp", 2, marks=pytest.mark.slow)])
def test_each_decision_sees_the_renders_of_its_states(backend: str, obs_history: int) -> None:
    from flowrl.envs import make, warp_available
    from flowrl.envs.cameras import camera_renderer
    from flowrl.rollout import run_episodes

    if backend == "warp" and not warp_available():
        pytest.skip("mujoco-warp not installed")
    env = make(TASK, 2, backend=backend, device="cpu", seed=0)
    policy = RecordingPixelPolicy(obs_history, env.act_dim)
    run_episodes(env, policy, seed=11, on_chunk=_end_after(CHUNKS))
    assert len(policy.calls) == CHUNKS

    replay = make(TASK, 2, backend=backend, device="cpu", seed=0)
    replay.reset(seed=11)
    with camera_renderer(replay, [CAMERA], SIZE, SIZE) as renderer:
        rendered = [renderer.render()[CAMERA]]  # the state at each step, starting with the reset state
        for _, _, actions in policy.calls:
            for j in range(ACT_STEPS):
                replay.step_chunk(actions[:, j:j + 1])
                rendered.append(renderer.render()[CAMERA])
    for i, (obs, images, _) in enumerate(policy.calls):
        seen = images[CAMERA]
        assert seen.dtype == torch.uint8 and seen.shape == (2, obs_history, SIZE, SIZE, 3)
        now = i * ACT_STEPS
        torch.testing.assert_close(seen[:, -1], rendered[now], rtol=0, atol=0)
        if obs_history == 2:  # the step before; the first decision repeats its reset image
            torch.testing.assert_close(seen[:, 0], rendered[max(now - 1, 0)], rtol=0, atol=0)
    assert not torch.equal(rendered[0], rendered[-1])  # the actions did move the scene


def test_an_episode_that_ends_inside_a_chunk_keeps_its_last_images_before_the_reset() -> None:
    """What a truncated episode is bootstrapped from: the images of its last state, not of its successor's
    first (the boundary images, which the history takes)."""
    from flowrl.envs import make
    from flowrl.envs.cameras import camera_renderer
    from flowrl.rollout import CameraObserver

    env = make(TASK, 2, backend="cpu", seed=0)
    env.reset(seed=5)
    env.max_episode_steps = 3  # both episodes truncate at the first step of the second chunk
    observer = CameraObserver(env, [CAMERA], SIZE, 1, finals=True)
    actions = 0.3 * torch.randn((2, 4, env.act_dim), generator=torch.Generator().manual_seed(1)).double()
    finals = []
    for chunk in (actions[:, :2], actions[:, 2:]):
        result = env.step_chunk(chunk, **observer.step_kwargs())
        finals.append(observer.push_chunk(result)[CAMERA])
    assert bool(result.truncated.all())
    replay = make(TASK, 2, backend="cpu", seed=0)
    replay.reset(seed=5)
    with camera_renderer(replay, [CAMERA], SIZE, SIZE) as renderer:
        for j in range(3):
            replay.step_chunk(actions[:, j:j + 1])
        last = renderer.render()[CAMERA]
    torch.testing.assert_close(finals[1][:, -1], last, rtol=0, atol=0)
    assert not torch.equal(observer.get()[CAMERA][:, -1], last)  # the history moved on to the new episode
    observer.close()


def test_state_histories_still_pad_and_reset_as_before() -> None:
    from flowrl.rollout import ObsHistory

    first = torch.arange(6.0).view(2, 3)
    h = ObsHistory(first, 3)
    assert torch.equal(h.get(), first.unsqueeze(1).repeat(1, 3, 1))
    h.push(first + 10, torch.tensor([False, True]))
    assert torch.equal(h.get()[0], torch.stack([first[0], first[0], first[0] + 10]))
    assert torch.equal(h.get()[1], (first[1] + 10).expand(3, 3))
    images = ObsHistory(torch.zeros((2, 4, 4, 3), dtype=torch.uint8), 2)
    images.push(torch.full((2, 4, 4, 3), 7, dtype=torch.uint8), torch.tensor([True, False]))
    assert images.get().shape == (2, 2, 4, 4, 3)
    assert (images.get()[0] == 7).all() and (images.get()[1, 0] == 0).all() and (images.get()[1, 1] == 7).all()
    assert images.get().dtype == torch.uint8


@pytest.mark.slow
def test_flowrl_eval_rolls_a_pixel_checkpoint_out_on_the_cpu_backend(tmp_path) -> None:
    """A random-weight pixel policy on Lift: `flowrl eval` (backend auto) renders its images from the cpu
    backend and evaluates whole episodes, and so it does in robosuite itself (`--backend robosuite`); a
    video is refused with a one-line error."""
    import json
    import subprocess
    import sys

    from flowrl.checkpoint import save_checkpoint
    from flowrl.config import PolicyConfig
    from flowrl.envs import make
    from flowrl.policy import FlowPolicy

    env = make(TASK, 1, backend="cpu", seed=0)
    cfg = PolicyConfig(hidden_dim=32, depth=1, horizon=8, act_steps=8, k=1, time_embed_dim=8,
                       cameras=[CAMERA], image_size=SIZE, image_features=4)
    torch.manual_seed(0)
    policy = FlowPolicy(cfg, env.obs_dim, env.act_dim, env.single_action_space.low, env.single_action_space.high)
    ckpt = save_checkpoint(tmp_path / "pixel", policy, {"task": TASK})
    out = subprocess.run([sys.executable, "-m", "flowrl", "eval", str(ckpt), "--episodes", "2", "--k", "1", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout)[0] if out.stdout.lstrip().startswith("[") else json.loads(out.stdout)["results"][0]
    assert row["episodes"] == 2 and row["length_mean"] == env.max_episode_steps and "success_rate" in row
    pytest.importorskip("robosuite")
    theirs = subprocess.run([sys.executable, "-m", "flowrl", "eval", str(ckpt), "--episodes", "1", "--k", "1", "--json",
                             "--backend", "robosuite", "--max-envs", "1"], capture_output=True, text=True, timeout=600)
    assert theirs.returncode == 0, theirs.stderr[-2000:]  # robosuite itself renders the images
    row = json.loads(theirs.stdout)[0] if theirs.stdout.lstrip().startswith("[") else json.loads(theirs.stdout)["results"][0]
    assert row["episodes"] == 1 and row["length_mean"] == env.max_episode_steps
    video = subprocess.run([sys.executable, "-m", "flowrl", "eval", str(ckpt), "--episodes", "1", "--k", "1", "--video"],
                           capture_output=True, text=True, timeout=600)
    assert video.returncode != 0 and "videos and the deploy runtime take state-only" in video.stderr
    assert "Traceback" not in video.stderr
