"""ReinFlow from pixels: a pixel policy's rollouts carry the rendered images into the PPO update, the
first ratio is exactly 1, and only the policy objective trains the image encoder."""

from __future__ import annotations

import pytest
import torch

from conftest import gl_missing
from flowrl.agents.reinflow import ReinFlow
from flowrl.checkpoint import save_checkpoint
from flowrl.config import PolicyConfig, load_stage_config
from flowrl.envs import make
from flowrl.policy import FlowPolicy

pytestmark = pytest.mark.skipif(gl_missing(), reason="no offscreen OpenGL (EGL or OSMesa)")

TASK, SIZE, ENVS, DECISIONS, ACT_STEPS = "robosuite/Lift", 16, 3, 3, 2


@pytest.fixture(scope="module")
def pixel_checkpoint(tmp_path_factory) -> str:
    env = make(TASK, 1, backend="cpu", seed=0)
    cfg = PolicyConfig(hidden_dim=32, depth=1, horizon=ACT_STEPS, act_steps=ACT_STEPS, k=2, time_embed_dim=8,
                       cameras=["agentview"], image_size=SIZE, image_features=4)
    torch.manual_seed(0)
    policy = FlowPolicy(cfg, env.obs_dim, env.act_dim, env.single_action_space.low, env.single_action_space.high)
    return str(save_checkpoint(tmp_path_factory.mktemp("pixel") / "ckpt", policy, {"task": TASK}))


def _agent(checkpoint: str, *overrides: str) -> ReinFlow:
    return ReinFlow(load_stage_config("finetune", None, [
        f"init={checkpoint}", "device=cpu", "train.backend=cpu", f"train.num_envs={ENVS}",
        f"train.rollout_steps={DECISIONS}", f"train.minibatch_size={ENVS * DECISIONS}", "train.update_epochs=2",
        "train.critic_warmup_iterations=0", "train.actor_lr=1e-3", "train.critic_hidden_dim=16",
        "train.noise_hidden_dim=16", *overrides]))


def test_rollouts_carry_the_decisions_images_and_the_first_ratio_is_exactly_one(pixel_checkpoint) -> None:
    agent = _agent(pixel_checkpoint)
    agent.env.max_episode_steps = 4  # cut at the horizon inside the rollout: bootstrapped from their last images
    seen = agent.observer.get()["agentview"].clone()  # what the first decision will see
    batch = agent.collect()
    images = batch["image:agentview"]
    assert images.dtype == torch.uint8 and images.shape == (DECISIONS * ENVS, 1, SIZE, SIZE, 3)
    torch.testing.assert_close(images[:ENVS], seen, rtol=0, atol=0)
    assert not torch.equal(images[:ENVS], images[-ENVS:])  # later decisions see the moved scene
    encoder = [p.detach().clone() for p in agent.policy.image_encoder.parameters()]
    logs = agent.update(batch)
    assert logs["train/first_ratio_deviation"] == 0.0 and logs["train/approx_kl"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(encoder, agent.policy.image_encoder.parameters()))
    agent.close()


def test_the_value_loss_does_not_reach_the_image_encoder(pixel_checkpoint) -> None:
    """Two agents alike but for the value loss's weight: the same rollouts and the same policy (image encoder
    included) after an update; only the critics differ."""
    agents = [_agent(pixel_checkpoint, f"train.vf_coef={c}", "seed=3") for c in (0.1, 10.0)]
    for agent in agents:
        agent.update(agent.collect())
    policies = [list(a.policy.parameters()) for a in agents]
    assert all(torch.equal(p, q) for p, q in zip(*policies))
    assert any(not torch.equal(p, q) for p, q in zip(agents[0].critic.parameters(), agents[1].critic.parameters()))
    for agent in agents:
        agent.close()
