"""MLE reconstruction fine-tuning: gradients through every solver step, the contracting residual,
inversion, a 2-D multimodal dataset whose modes must survive, and exact resume."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from conftest import ctrl_c_after

from flowrl.agents.bc import BehaviorCloning
from flowrl.agents.mle import MLEFineTuning, held_out_reconstruction, invert, jacobian_bounds
from flowrl.config import load_stage_config
from flowrl.datasets import Episodes, write_dataset
from flowrl.errors import Interrupted
from flowrl.sampler import euler_sample
from flowrl.training import Trainer

MODE = 0.6  # demonstrations: (+MODE, +MODE) or (-MODE, -MODE), whatever the observation


@pytest.fixture(scope="module")
def bimodal(tmp_path_factory) -> tuple[str, str]:
    """PointReach-shaped demonstrations with a two-mode action distribution, and a BC policy of them."""
    root = tmp_path_factory.mktemp("bimodal")
    rng = np.random.default_rng(0)
    eps = []
    for _ in range(40):
        n = 25
        sign = rng.choice([-1.0, 1.0], size=(n, 1))
        eps.append({"observations": rng.uniform(-1, 1, (n, 4)), "actions": (sign * MODE + 0.02 * rng.standard_normal((n, 2))
                                                                            ).astype(np.float32),
                    "rewards": np.zeros(n), "terminated": np.zeros(n, bool),
                    "truncated": np.r_[np.zeros(n - 1, bool), True]})
    data = root / "bimodal.hdf5"
    write_dataset(data, Episodes.from_list(eps, {"task": "PointReach"}))
    cfg = load_stage_config("pretrain", None, [
        "task=PointReach", f"data.path={data}", "device=cpu", "policy.hidden_dim=64", "policy.depth=2",
        "policy.horizon=1", "policy.act_steps=1", "policy.k=4", "policy.time_embed_dim=16",
        "train.steps=300", "train.batch_size=128", "train.eval_every=0", "train.checkpoint_every=300",
        "train.warmup_steps=20"])
    Trainer(BehaviorCloning(cfg), root / "bc", progress=False).fit()
    return str(root / "bc" / "checkpoints" / "300"), str(data)


def _cfg(init: str, *overrides: str):
    return load_stage_config("finetune", None, [
        "algo=mle", f"init={init}", "device=cpu", "train.batch_size=128", "train.eval_every=0",
        "train.checkpoint_every=1000", "train.inversion_steps=16", "eval.episodes=2", "eval.k=[1]", *overrides])


def test_gradients_reach_every_solver_step(bimodal) -> None:
    agent = MLEFineTuning(_cfg(bimodal[0], "train.k=3", "train.latents=prior"))
    outputs: list[torch.Tensor] = []
    original = agent.model.velocity

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        out.retain_grad()
        outputs.append(out)
        return out

    agent.model.velocity = recording  # type: ignore[method-assign]
    obs, actions = agent.data.batch(torch.arange(32))
    loss, _ = agent.reconstruction_loss(obs, agent.model.normalize_action(actions), torch.randn(32, 1, 2))
    loss.backward()
    assert len(outputs) == 3 and all(o.grad is not None and float(o.grad.abs().sum()) > 0 for o in outputs)


def test_jacobian_bounds_of_a_linear_field_are_its_norm_and_its_symmetric_parts_top_eigenvalue(bimodal) -> None:
    from flowrl.checkpoint import load_policy

    policy = load_policy(bimodal[0])[0]
    gen = torch.Generator().manual_seed(0)
    n = policy.chunk_shape[0] * policy.chunk_shape[1]
    obs = torch.zeros(8, policy.cfg.obs_history, policy.obs_dim)
    for _ in range(3):
        a = torch.randn(n, n, generator=gen) * 3  # not symmetric: its norm and its one-sided bound differ
        policy.velocity = lambda t, x, cond, d=None, a=a: (x.flatten(1) @ a.T).view_as(x)  # J = a everywhere
        lipschitz, one_sided = jacobian_bounds(policy, obs, 4, iterations=100, generator=gen)
        assert lipschitz == pytest.approx(float(torch.linalg.matrix_norm(a, 2)), rel=1e-4)
        assert one_sided == pytest.approx(float(torch.linalg.eigvalsh(0.5 * (a + a.T)).max()), rel=1e-4, abs=1e-5)


def test_resft_trains_only_a_contracting_residual(bimodal) -> None:
    agent = MLEFineTuning(_cfg(bimodal[0], "train.method=resft", "train.latents=prior", "train.lipschitz_samples=64"))
    model = agent.model
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("residual.")}
    assert agent.lipschitz > 0 and agent.one_sided <= agent.lipschitz
    assert float(model.residual.gain_min) == pytest.approx(max(agent.one_sided, 0) + 0.1 * agent.lipschitz)
    for i in range(3):
        agent.train_iteration(i)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("residual."))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.residual.parameters())
    # the combined field's action Jacobian has a negative-definite symmetric part at sampled points
    obs, _ = agent.data.batch(torch.arange(16))
    cond = model.encode(obs)
    for i in range(16):
        t = torch.tensor([i / 16])
        jac = torch.autograd.functional.jacobian(lambda a: model.velocity(t, a.view(1, 1, 2), cond[i:i + 1]).flatten(),
                                                 torch.randn(2))
        assert float(torch.linalg.eigvalsh(0.5 * (jac + jac.T)).max()) < 0
    # and the solver's sensitivity to its initial noise shrinks (K = 8)
    x0 = torch.randn(64, 1, 2)
    delta = 1e-3 * torch.randn(64, 1, 2)

    def spread(policy) -> float:
        with torch.no_grad():
            decode = lambda x: euler_sample(policy.velocity_fn(policy.encode(obs[:1].expand(64, -1, -1)), 8), x, 8)  # noqa: E731
            return float((decode(x0 + delta) - decode(x0)).norm() / delta.norm())

    from flowrl.checkpoint import load_policy

    pretrained = load_policy(bimodal[0])[0]
    assert spread(model) < 0.5 * spread(pretrained) and spread(model) < 1.0


def test_inversion_then_decoding_returns_the_demonstration(bimodal) -> None:
    from flowrl.checkpoint import load_policy

    policy = load_policy(bimodal[0])[0]
    agent = MLEFineTuning(_cfg(bimodal[0], "train.latents=prior"))
    obs, actions = agent.data.batch(torch.arange(256))
    x1 = policy.normalize_action(actions)
    with torch.no_grad():
        x0 = invert(policy, obs, x1, 128)
        back = euler_sample(policy.velocity_fn(policy.encode(obs), 128), x0, 128)
    assert float((back - x1).abs().max()) < 0.05


def _mode_mass(policy) -> tuple[float, float, float]:
    """Fractions of one-step (K = 1) actions within 0.25 of each mode and of the midpoint between them."""
    with torch.no_grad():
        obs = torch.rand(2000, 1, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
        a = policy.predict(obs, k=1, generator=torch.Generator().manual_seed(0))[:, 0]
    near = lambda m: float(((a - torch.tensor(m)).norm(dim=1) < 0.25).float().mean())  # noqa: E731
    return near([MODE, MODE]), near([-MODE, -MODE]), near([0.0, 0.0])


def test_ft_with_inverted_latents_keeps_both_modes_and_cuts_the_reconstruction_error(bimodal) -> None:
    """At K = 1 a flow policy's one Euler step blurs a two-mode distribution into its middle; MLE
    through that step with latents paired by inversion makes the one-step decoder hit the
    demonstrations and moves mass to both modes. With prior latents it collapses to the mean
    (measured: middle 25% -> 76%; inverted: modes 2% / 4% -> 14% / 27%, middle 25% -> 13%)."""
    from flowrl.checkpoint import load_policy

    pretrained = load_policy(bimodal[0])[0]
    before_modes = _mode_mass(pretrained)
    runs = {}
    for latents in ("inverted", "prior"):
        agent = MLEFineTuning(_cfg(bimodal[0], "train.k=1", "train.lr=1e-3", f"train.latents={latents}"))
        for i in range(150):
            agent.train_iteration(i)
        runs[latents] = agent
    before = held_out_reconstruction(pretrained, runs["inverted"].data, 1, reference=pretrained)
    after = held_out_reconstruction(runs["inverted"].model, runs["inverted"].data, 1, reference=pretrained)
    assert after < 0.1 * before, (before, after)
    plus, minus, middle = _mode_mass(runs["inverted"].model)
    assert min(plus, minus) > 0.1 and plus > 3 * before_modes[0] and minus > 3 * before_modes[1], before_modes
    assert middle < before_modes[2]
    assert _mode_mass(runs["prior"].model)[2] > before_modes[2]  # the prior's MLE averages the modes


def test_resume_is_exact(bimodal, tmp_path) -> None:
    cfg = _cfg(bimodal[0], "train.steps=10", "train.variance=learned", "train.checkpoint_every=2",
               "train.latents=prior")
    full = Trainer(MLEFineTuning(cfg), tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(MLEFineTuning(cfg), tmp_path / "part", progress=False)
    ctrl_c_after(part.agent, 4)
    with pytest.raises(Interrupted):
        part.fit()
    resumed = Trainer(MLEFineTuning(cfg), tmp_path / "part", resume=True, progress=False)
    resumed.fit()
    for a, b in zip(full.agent.model.state_dict().values(), resumed.agent.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(full.agent.log_std.value, resumed.agent.log_std.value)
