"""Export and the deploy runtime: export parity with eager for ONNX and torch.export,
reflow and shortcut heads and an observation history of two; closed-loop equality of exported and
eager policies in simulation; the action queue and ACT's temporal ensembling against an offline
computation; bad inputs as one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import flowrl.deploy  # noqa: E402
from flowrl.checkpoint import load_policy, save_checkpoint  # noqa: E402
from flowrl.cli import main  # noqa: E402
from flowrl.config import PolicyConfig  # noqa: E402
from flowrl.deploy.export import export, metadata_path, mish_from_sigmoid  # noqa: E402
from flowrl.deploy.runtime import make_backend  # noqa: E402
from flowrl.envs import make  # noqa: E402
from flowrl.errors import FlowrlError  # noqa: E402
from flowrl.policy import FlowPolicy  # noqa: E402
from flowrl.rollout import ChunkPolicy, run_episodes  # noqa: E402

SUFFIX = {"onnx": "onnx", "torch-export": "pt2"}


def make_checkpoint(folder: Path, head: str, obs_history: int = 2, seed: int = 0, **kw) -> Path:
    """A PointReach-shaped policy with random weights, non-trivial normalisation and asymmetric bounds.

    Random weights are enough here: every test compares two ways of computing the same function."""
    torch.manual_seed(seed)
    cfg = PolicyConfig(head=head, obs_history=obs_history, horizon=4, act_steps=3, k=4, hidden_dim=64,
                       depth=2, time_embed_dim=16, **kw)
    policy = FlowPolicy(cfg, 4, 2, np.array([-1.0, -0.5]), np.array([1.0, 0.8]))
    rng = np.random.default_rng(seed)
    policy.set_normalization(rng.normal(0, 0.3, 4), rng.uniform(0.3, 0.8, 4))
    return save_checkpoint(folder, policy, {"task": "PointReach",
                                            "observation_layout": [["position", 2], ["goal_minus_position", 2]]})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deploy")
    return {head: make_checkpoint(root / head, head) for head in ("reflow", "shortcut")}


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Each head exported in each format once (an ONNX export takes seconds)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for head, ckpt in checkpoints.items():
        for fmt, suffix in SUFFIX.items():
            path = root / f"{head}.{suffix}"
            export(ckpt, path, fmt, k=2 if head == "shortcut" else None)
            out[head, fmt] = path
    return out


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
@pytest.mark.parametrize("head", ["reflow", "shortcut"])
def test_export_matches_eager(checkpoints, exports, head, fmt) -> None:
    path = exports[head, fmt]
    meta = json.loads(metadata_path(path).read_text())
    k = 2 if head == "shortcut" else 4
    assert meta["k"] == k and meta["head"] == head and meta["obs_history"] == 2
    assert meta["step_size"] == (0.5 if head == "shortcut" else None)
    assert (meta["task"], meta["obs_dim"], meta["act_dim"], meta["horizon"], meta["act_steps"]) == ("PointReach", 4, 2, 4, 3)
    assert meta["action_low"] == [-1.0, -0.5] and meta["action_high"] == pytest.approx([1.0, 0.8])
    assert meta["observation_layout"] == [["position", 2], ["goal_minus_position", 2]]
    assert meta["max_abs_error"] <= 1e-4 and meta["flowrl_version"]
    policy, _ = load_policy(checkpoints[head])
    deployed = flowrl.deploy.load(path)
    assert deployed.backend == fmt
    gen = torch.Generator().manual_seed(5)
    for batch in (1, 7):  # the batch dimension is dynamic
        obs = torch.randn(batch, 2, 4, generator=gen) * 2
        noise = torch.randn(batch, 4, 2, generator=gen)
        expected = policy.predict(obs, k, noise)
        got = deployed.act_chunk(obs, noise)
        assert got.shape == (batch, 4, 2)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        # actions within the bounds: clipping and scaling are in the graph
        assert bool((got >= torch.tensor([-1.0, -0.5])).all() and (got <= torch.tensor([1.0, 0.8]) + 1e-6).all())


def test_the_exports_mish_is_mish() -> None:
    """The export's Mish, written with a sigmoid, is torch's Mish to float rounding over the whole float range
    the network meets (no overflow at either end: a bounded sigmoid instead of an exponential)."""
    x = torch.cat([torch.linspace(-100.0, 100.0, 20001, dtype=torch.float64),
                   torch.tensor([-1e30, -88.8, 88.8, 1e30], dtype=torch.float64)])
    torch.testing.assert_close(mish_from_sigmoid(x), torch.nn.functional.mish(x), rtol=1e-12, atol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(mish_from_sigmoid(x32), torch.nn.functional.mish(x32), rtol=1e-6, atol=1e-6)


def test_export_refused_above_tolerance_writes_nothing(checkpoints, tmp_path) -> None:
    out = tmp_path / "p.pt2"
    with pytest.raises(FlowrlError, match="differs from eager"):
        export(checkpoints["reflow"], out, "torch-export", tolerance=-1.0)
    assert not out.exists() and not metadata_path(out).exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_closed_loop_returns_equal_eager_episode_for_episode(checkpoints, exports, fmt) -> None:
    """Same seed, same noise drawn inside the runtime: the exported policy's episodes are eager's."""
    results = {}
    for name, path in (("eager", checkpoints["reflow"]), (fmt, exports["reflow", fmt])):
        policy = flowrl.deploy.load(path, seed=11)
        assert isinstance(policy, ChunkPolicy)
        env = make("PointReach", 6)
        results[name] = run_episodes(env, policy, seed=300)
        env.close()
    np.testing.assert_allclose(results[fmt]["returns"], results["eager"]["returns"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(results[fmt]["lengths"], results["eager"]["lengths"])
    assert len(set(np.round(results["eager"]["returns"], 3))) > 1  # distinct episodes, not one repeated


def test_act_is_a_receding_horizon_over_act_steps(exports) -> None:
    policy = flowrl.deploy.load(exports["reflow", "onnx"], seed=3)
    offline = flowrl.deploy.load(exports["reflow", "onnx"], seed=3)
    obs = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    actions, inferred = [], []
    for o in obs:
        actions.append(policy.act(o))
        inferred.append(policy.inferred)
    assert inferred == [True, False, False] * 3 + [True]
    # offline: a chunk at steps 0, 3, 6, 9 from the history then (the first observation repeated at the start)
    expected = []
    for start in (0, 3, 6, 9):
        hist = np.stack([obs[max(start - 1, 0)], obs[start]])
        chunk = offline.infer(hist[None])[0]
        expected += list(chunk[:3])
    np.testing.assert_allclose(np.stack(actions), np.stack(expected[:10]), rtol=0, atol=1e-6)
    policy.reset(3)  # reset: same noise again, history forgotten
    np.testing.assert_allclose(policy.act(obs[0]), actions[0], rtol=0, atol=1e-7)


@pytest.mark.parametrize("m", [0.01, 0.5])
def test_temporal_ensembling_matches_an_offline_computation(checkpoints, m) -> None:
    policy = flowrl.deploy.load(checkpoints["shortcut"], temporal_ensemble=m, seed=4)
    offline = flowrl.deploy.load(checkpoints["shortcut"], seed=4)
    obs = np.random.default_rng(1).normal(size=(9, 4)).astype(np.float32)
    chunks = [offline.infer(np.stack([obs[max(t - 1, 0)], obs[t]])[None])[0] for t in range(9)]
    for t, o in enumerate(obs):
        got = policy.act(o)
        assert policy.inferred
        # every chunk computed at s with t - s < horizon predicts step t; oldest first, weights exp(-m i)
        preds = [chunks[s][t - s] for s in range(max(0, t - 3), t + 1)]
        w = np.exp(-m * np.arange(len(preds)))
        expected = sum(wi * p for wi, p in zip(w, preds)) / w.sum()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_eager_runtime_at_another_k_and_shortcut_step_size(checkpoints) -> None:
    policy, _ = load_policy(checkpoints["shortcut"])
    deployed = flowrl.deploy.load(checkpoints["shortcut"], k=8)
    obs, noise = torch.randn(3, 2, 4), torch.randn(3, 4, 2)
    torch.testing.assert_close(deployed.act_chunk(obs, noise), policy.predict(obs, 8, noise))
    assert not torch.allclose(deployed.act_chunk(obs, noise), policy.predict(obs, 4, noise))


def test_bad_inputs_are_one_line_errors(checkpoints, exports, tmp_path) -> None:
    onnx = exports["reflow", "onnx"]
    policy = flowrl.deploy.load(onnx)
    cases = [
        (lambda: policy.act_chunk(np.zeros((2, 3, 4))), "must be \\(batch, 2, 4\\)"),
        (lambda: policy.act_chunk(np.full((1, 2, 4), np.nan)), "NaN"),
        (lambda: policy.act_chunk(np.zeros((1, 2, 4)), np.zeros((1, 4, 3))), "noise must be"),
        (lambda: policy.act(np.zeros(5)), "one observation of shape \\(4,\\)"),
        (lambda: flowrl.deploy.load(tmp_path / "missing.onnx"), "not found"),
        (lambda: flowrl.deploy.load(onnx, backend="torch-export"), "onnx export"),
        (lambda: flowrl.deploy.load(onnx, k=3), "exported at K = 4"),
        (lambda: flowrl.deploy.load(checkpoints["reflow"], backend="onnx"), "export"),
        (lambda: flowrl.deploy.load(onnx, backend="tensorrt"), "unknown backend"),
        (lambda: export(checkpoints["reflow"], tmp_path / "x", "tflite"), "unknown export format"),
        (lambda: export(checkpoints["reflow"], tmp_path / "x", "onnx", k=0), "must be >= 1, got 0"),
        (lambda: make_backend(onnx, "onnx")(np.zeros((1, 2, 4), np.float32), np.zeros((1, 4, 2), np.float32),
                                            {"agentview": np.zeros((1, 2, 84, 84, 3), np.uint8)}), "state only"),
    ]
    for call, pattern in cases:
        with pytest.raises(FlowrlError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    metadata_path(garbage).write_text(metadata_path(onnx).read_text())
    with pytest.raises(FlowrlError, match="ONNX Runtime cannot load it"):
        flowrl.deploy.load(garbage)
    (tmp_path / "nometa.onnx").write_bytes(onnx.read_bytes())
    with pytest.raises(FlowrlError, match="no nometa.onnx.json beside it"):
        flowrl.deploy.load(tmp_path / "nometa.onnx")


def test_missing_extra_is_a_one_line_error_naming_it(exports, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(FlowrlError, match=r"deploy extra: pip install -e \"\.\[deploy\]\""):
        flowrl.deploy.load(exports["reflow", "onnx"])


def test_cli_export(checkpoints, tmp_path, capsys) -> None:
    out = tmp_path / "policy.pt2"
    assert main(["export", str(checkpoints["shortcut"]), "--format", "torch-export", "--out", str(out), "--k", "1"]) == 0
    assert "K=1, shortcut head" in capsys.readouterr().out
    assert json.loads(metadata_path(out).read_text())["step_size"] == 1.0
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowrl: error: checkpoint not found") and err.count("\n") == 1
    assert main(["export", str(checkpoints["reflow"]), "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_policy_with_its_own_velocity_is_unrolled_through_it(checkpoints) -> None:
    """The rearranged graph knows the plain network only; anything else goes through ``velocity``."""
    from flowrl.deploy.export import UnrolledSampler

    policy, _ = load_policy(checkpoints["shortcut"])

    class Damped(FlowPolicy):
        def velocity(self, t, action, cond, step_size=None):
            return super().velocity(t, action, cond, step_size) - 0.3 * action * t.view(-1, 1, 1)

    damped = Damped(policy.cfg, policy.obs_dim, policy.act_dim)
    damped.load_state_dict(policy.state_dict())
    obs, noise = torch.randn(3, 2, 4), torch.randn(3, 4, 2)
    for p, fused in ((policy, True), (damped, False)):
        module = UnrolledSampler(p, 3)
        assert module.fused == fused
        with torch.no_grad():
            torch.testing.assert_close(module(obs, noise), p.predict(obs, 3, noise), rtol=0, atol=1e-5)
