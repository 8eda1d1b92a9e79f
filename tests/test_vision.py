"""Pixel policies: the image encoder and its augmentation, images through the policy's encoding, and a tiny
pixel policy that must learn from the images what the states cannot tell it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowrl.checkpoint import load_policy
from flowrl.config import PolicyConfig, load_stage_config
from flowrl.datasets import Episodes, write_robomimic
from flowrl.errors import FlowrlError
from flowrl.policy import FlowPolicy
from flowrl.vision import ImageEncoder, random_photometric, random_shift

SIZE = 12


def test_random_shift_is_a_crop_of_the_replicate_padded_image_within_the_shift() -> None:
    images = torch.rand(6, 3, 7, 9)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    offsets = set()
    for i in range(6):
        found = [(r, c) for r in range(5) for c in range(5) if torch.equal(padded[i, :, r:r + 7, c:c + 9], shifted[i])]
        assert found, i
        offsets.add(found[0])
    assert len(offsets) > 1  # every image its own shift
    assert torch.equal(random_shift(images, 0), images)


def test_random_photometric_scales_contrast_brightness_and_gain_within_the_jitter() -> None:
    images = 0.35 + 0.3 * torch.rand(64, 3, 8, 8)  # away from 0 and 1: no clipping at jitter 0.2
    out = random_photometric(images, 0.2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and torch.equal(random_photometric(images, 0.0), images)
    # contrast c, brightness b, gains g: out = ((x - m) c + m) b g, so per image and channel
    # out - mean(out) = (x - mean(x)) c b g, with c b g in [0.8^2 0.9, 1.2^2 1.1]
    centred_in = images - images.mean(dim=(2, 3), keepdim=True)
    centred_out = out - out.mean(dim=(2, 3), keepdim=True)
    factor = (centred_out * centred_in).sum(dim=(2, 3)) / centred_in.square().sum(dim=(2, 3))  # (B, C)
    torch.testing.assert_close(centred_out, centred_in * factor[..., None, None])  # one factor each
    assert bool((factor > 0.8 ** 2 * 0.9 - 1e-4).all() and (factor < 1.2 ** 2 * 1.1 + 1e-4).all())
    assert factor.std() > 0.02 and len({round(float(f), 3) for f in factor[:, 0]}) > 32  # every image its own
    bright = torch.ones(4, 3, 5, 5)
    assert float(random_photometric(bright, 0.5, torch.Generator().manual_seed(1)).max()) <= 1.0  # clipped


def test_photometric_jitter_applies_only_while_training() -> None:
    encoder = ImageEncoder(["agentview"], SIZE, 5, shift=0, jitter=0.3)
    images = {"agentview": torch.randint(0, 256, (4, SIZE, SIZE, 3), dtype=torch.uint8)}
    assert not torch.equal(encoder(images), encoder(images))  # training, gradients on: jittered
    with torch.no_grad():
        assert torch.equal(encoder(images), encoder(images))
    encoder.eval()
    assert torch.equal(encoder(images), encoder(images))
    plain = ImageEncoder(["agentview"], SIZE, 5, shift=0)
    assert torch.equal(plain(images), plain(images))  # no shift, no jitter: nothing random
    policy = FlowPolicy(PolicyConfig(cameras=["agentview"], image_size=SIZE, image_jitter=0.3), 3, 2)
    assert policy.image_encoder.jitter == 0.3


def test_policy_encodes_the_state_then_each_history_steps_image_features() -> None:
    cfg = PolicyConfig(obs_history=2, hidden_dim=32, depth=1, cameras=["agentview", "wrist"], image_size=SIZE,
                       image_features=5)
    policy = FlowPolicy(cfg, obs_dim=3, act_dim=2)
    assert policy.uses_images and policy.cond_dim == 2 * (3 + 2 * 5)
    obs = torch.randn(4, 2, 3)
    images = {c: torch.randint(0, 256, (4, 2, SIZE, SIZE, 3), dtype=torch.uint8) for c in cfg.cameras}
    with torch.no_grad():  # no augmentation without gradients: the encoding is a function of its inputs
        cond = policy.encode(obs, images)
        assert torch.equal(cond, policy.encode(obs, images))
    assert cond.shape == (4, policy.cond_dim)
    torch.testing.assert_close(cond[:, :6], FlowPolicy(PolicyConfig(obs_history=2), 3, 2).encode(obs))
    flat = {c: x[:, 1] for c, x in images.items()}
    with torch.no_grad():
        torch.testing.assert_close(cond[:, 6 + 10:], policy.image_encoder(flat))  # the second history step's
    assert not torch.equal(policy.encode(obs, images), policy.encode(obs, images))  # training: shifted images
    with pytest.raises(ValueError, match="sees camera images"):
        policy.encode(obs)
    with pytest.raises(ValueError, match="camera\\(s\\) wrist are missing"):
        policy.encode(obs, {"agentview": images["agentview"]})
    with pytest.raises(ValueError, match=r"have shape \(8, 6, 6, 3\), expected \(B, 12, 12, 3\)"):
        ImageEncoder(["agentview"], SIZE, 5, 0)({"agentview": torch.zeros(8, 6, 6, 3, dtype=torch.uint8)})


def _square(left: bool) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 200, dtype=np.uint8)
    cols = slice(0, SIZE // 2) if left else slice(SIZE // 2, SIZE)
    image[2:SIZE - 2, cols] = (220, 30, 30)
    return image


def test_a_pixel_policy_learns_what_only_the_images_tell(tmp_path) -> None:
    """The state is the same in every demonstration; the action is +0.5 when a red block fills the left half
    and -0.5 when it is on the right half. Behaviour cloning through the image encoder must act by the image."""
    from flowrl.agents.bc import BehaviorCloning
    from flowrl.training import Trainer

    episodes = []
    for i in range(8):
        left, n = i % 2 == 0, 12
        episodes.append({"observations": np.zeros((n, 19), np.float32),
                         "actions": np.full((n, 7), 0.5 if left else -0.5, np.float32),
                         "rewards": np.zeros(n, np.float32), "terminated": np.zeros(n, bool),
                         "truncated": np.eye(n, dtype=bool)[-1],
                         "images": {"agentview": np.stack([_square(left)] * n)}})
    data = Episodes.from_list(episodes)
    path = tmp_path / "squares.hdf5"
    write_robomimic(path, data, [("state", 19)], {"env_name": "Lift"})
    cfg = load_stage_config("pretrain", None, [
        "task=robosuite/Lift", f"data.path={path}", "device=cpu", "policy.hidden_dim=64", "policy.depth=2",
        "policy.horizon=1", "policy.act_steps=1", "policy.k=4", "policy.time_embed_dim=16",
        "policy.cameras=[agentview]", f"policy.image_size={SIZE}", "policy.image_features=8", "policy.image_shift=1",
        "train.steps=300", "train.batch_size=64", "train.lr=2e-3", "train.warmup_steps=10", "train.ema_decay=0.9",
        "train.eval_every=0",
        "train.checkpoint_every=300"])
    agent = BehaviorCloning(cfg)
    agent.evaluates_in_simulation = False  # Lift episodes rendered in software take minutes: test_pixel_rollout's
    Trainer(agent, tmp_path / "bc", progress=False).fit()
    policy, config = load_policy(tmp_path / "bc" / "checkpoints" / "300")
    assert config["policy"]["cameras"] == ["agentview"] and policy.uses_images
    n = 32  # initial noises per image
    noise = torch.randn(2 * n, 1, 7, generator=torch.Generator().manual_seed(0))
    images = {"agentview": torch.as_tensor(np.stack([_square(True)] * n + [_square(False)] * n))}
    actions = policy.predict(np.zeros((2 * n, 19), np.float32), noise=noise, images=images).view(2, n, 7)
    error = (actions - torch.tensor([0.5, -0.5]).view(2, 1, 1)).abs().mean(dim=2)  # (image, noise)
    assert (error.median(dim=1).values < 0.1).all(), error  # a state-only policy splits its samples: ~0.5
    assert (actions[0].mean(1) > 0).all() and (actions[1].mean(1) < 0).all()
    with pytest.raises(FlowrlError, match="MLE fine-tuning, collection, videos and the deploy runtime take state-only"):
        from flowrl.agents.collect import collect

        collect(str(tmp_path / "bc" / "checkpoints" / "300"), tmp_path / "x.hdf5", episodes=1, progress=False)


def test_bad_image_settings_are_one_line_config_errors() -> None:
    base = ["task=robosuite/Lift", "data.path=x.hdf5"]
    with pytest.raises(FlowrlError, match=r"policy.image_size: must be > 0"):
        load_stage_config("pretrain", None, [*base, "policy.image_size=0"])
    with pytest.raises(FlowrlError, match=r"policy.cameras: names a camera twice"):
        load_stage_config("pretrain", None, [*base, "policy.cameras=[agentview,agentview]"])
    with pytest.raises(FlowrlError, match=r"policy.image_jitter: must be in \[0, 1\), got 1.5"):
        load_stage_config("pretrain", None, [*base, "policy.image_jitter=1.5"])
