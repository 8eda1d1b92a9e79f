"""Export of pixel policies: camera images as uint8 graph inputs ``image_<camera>`` beside ``obs`` and
``noise``, equal to eager ``predict`` in ONNX Runtime and torch.export; the metadata names the cameras, the
image size and the image inputs; the deploy runtime (and so the server) refuses pixel policies in one line."""

from __future__ import annotations

import dataclasses
import json
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
from flowrl.deploy.export import UnrolledSampler, export  # noqa: E402
from flowrl.deploy.meta import export_metadata, metadata_path, read_metadata  # noqa: E402
from flowrl.deploy.runtime import make_backend, onnx_session  # noqa: E402
from flowrl.errors import FlowrlError  # noqa: E402
from flowrl.policy import FlowPolicy  # noqa: E402
from tests.test_deploy import make_checkpoint  # noqa: E402

SIZE = 16
CAMERAS = ["agentview", "wrist"]
IMAGE_KW = {"image_size": SIZE, "image_features": 4, "image_shift": 2}


def _inputs(batch: int, obs_history: int, cameras: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   dict[str, torch.Tensor]]:
    """Observations (some beyond the clipping), noise and uniformly random uint8 images."""
    gen = torch.Generator().manual_seed(seed)
    obs = 2.0 * torch.randn(batch, obs_history, 4, generator=gen)
    noise = torch.randn(batch, 4, 2, generator=gen)
    images = {c: torch.randint(0, 256, (batch, obs_history, SIZE, SIZE, 3), generator=gen, dtype=torch.uint8)
              for c in cameras}
    return obs, noise, images


def pixel_checkpoint(folder: Path, head: str, obs_history: int, cameras: list[str], seed: int = 0) -> Path:
    """:func:`make_checkpoint`'s policy seeing ``cameras``, its image features made to matter.

    At initialisation the spatial softmax of random images is nearly flat, so the image features barely move
    and the images change the actions by ~1e-4, too little for a comparison at that tolerance to see a wrong
    image path; sharper feature maps and a larger output map move the features by about one unit."""
    policy, config = load_policy(make_checkpoint(folder / "init", head, obs_history, seed, cameras=cameras,
                                                 **IMAGE_KW))
    with torch.no_grad():
        for trunk in policy.image_encoder.trunks.values():
            trunk.conv[-1].weight.mul_(100.0)
            trunk.conv[-1].bias.mul_(100.0)
            trunk.out.weight.mul_(10.0)
    info = {k: config[k] for k in ("task", "observation_layout")}
    return save_checkpoint(folder / "sharp", policy, info)


@pytest.fixture(scope="module")
def pixel(tmp_path_factory) -> dict[str, Path]:
    """A two-camera reflow pixel policy (history 2) exported to ONNX, and a one-camera shortcut pixel policy
    (history 1) exported by torch.export at K = 2 (each export takes seconds: once per module)."""
    root = tmp_path_factory.mktemp("pixel")
    reflow = pixel_checkpoint(root / "reflow", "reflow", 2, CAMERAS)
    shortcut = pixel_checkpoint(root / "shortcut", "shortcut", 1, ["agentview"], seed=1)
    export(reflow, root / "reflow.onnx", "onnx")
    export(shortcut, root / "shortcut.pt2", "torch-export", k=2)
    return {"reflow": reflow, "shortcut": shortcut, "onnx": root / "reflow.onnx", "pt2": root / "shortcut.pt2"}


def test_onnx_export_of_a_pixel_policy_matches_eager_with_its_uint8_image_inputs(pixel) -> None:
    policy, _ = load_policy(pixel["reflow"])
    session = onnx_session(pixel["onnx"])
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert list(inputs) == ["obs", "noise", "image_agentview", "image_wrist"]
    assert inputs["image_wrist"][0] == "tensor(uint8)" and inputs["obs"][0] == "tensor(float)"
    assert inputs["image_agentview"][1][1:] == [2, SIZE, SIZE, 3]
    assert [o.name for o in session.get_outputs()] == ["actions"]
    for batch in (1, 5):  # the batch dimension is dynamic
        obs, noise, images = _inputs(batch, 2, CAMERAS, seed=batch)
        feeds = {"obs": obs.numpy(), "noise": noise.numpy(), **{f"image_{c}": x.numpy() for c, x in images.items()}}
        got = torch.from_numpy(session.run(["actions"], feeds)[0])
        torch.testing.assert_close(got, policy.predict(obs, 4, noise, images=images), rtol=0, atol=1e-4)
    # the images matter: other pictures of one camera, other actions (in the graph and in eager alike)
    other = dict(images, wrist=255 - images["wrist"])
    feeds["image_wrist"] = other["wrist"].numpy()
    moved = torch.from_numpy(session.run(["actions"], feeds)[0])
    torch.testing.assert_close(moved, policy.predict(obs, 4, noise, images=other), rtol=0, atol=1e-4)
    assert (moved - got).abs().max() > 0.05


def test_torch_export_of_a_shortcut_pixel_policy_matches_eager(pixel) -> None:
    policy, _ = load_policy(pixel["shortcut"])
    program = torch.export.load(str(pixel["pt2"])).module()
    for batch in (1, 3):
        obs, noise, images = _inputs(batch, 1, ["agentview"], seed=10 + batch)
        with torch.no_grad():
            got = program(obs, noise, images["agentview"])
        torch.testing.assert_close(got, policy.predict(obs, 2, noise, images=images), rtol=0, atol=1e-4)
    # the runtime's backend feeds the images by camera name; without them it says which are missing
    run = make_backend(pixel["pt2"], "torch-export", cameras=["agentview"])
    np.testing.assert_allclose(run(obs.numpy(), noise.numpy(), {"agentview": images["agentview"].numpy()}),
                               got.numpy(), rtol=0, atol=1e-6)
    cases = [(lambda: run(obs.numpy(), noise.numpy()), "sees camera\\(s\\) agentview; images of agentview are missing"),
             (lambda: run(obs.numpy(), noise.numpy(), {"agentview": images["agentview"].numpy().astype(np.float32)}),
              "must be uint8 RGB; got agentview \\(float32\\)")]
    for call, pattern in cases:
        with pytest.raises(FlowrlError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)


def test_metadata_lists_the_cameras_the_image_size_and_the_image_inputs(pixel) -> None:
    meta = json.loads(metadata_path(pixel["onnx"]).read_text())
    assert meta["cameras"] == CAMERAS and meta["image_size"] == SIZE
    assert meta["image_inputs"] == ["image_agentview", "image_wrist"]
    image_shape = ["batch", 2, SIZE, SIZE, 3]
    assert meta["inputs"] == {"obs": ["batch", 2, 4], "noise": ["batch", 4, 2], "image_agentview": image_shape,
                              "image_wrist": image_shape}
    assert meta["input_dtypes"]["image_wrist"] == "uint8" and meta["input_dtypes"]["obs"] == "float32"
    assert meta["max_abs_error"] <= 1e-4 and read_metadata(pixel["onnx"])["cameras"] == CAMERAS
    shortcut = json.loads(metadata_path(pixel["pt2"]).read_text())
    assert (shortcut["cameras"], shortcut["step_size"], shortcut["obs_history"]) == (["agentview"], 0.5, 1)
    # a state-only policy's metadata has nothing new
    state_only = export_metadata(FlowPolicy(PolicyConfig(), 4, 2), {}, 4, "onnx")
    assert not {"cameras", "image_size", "image_inputs", "input_dtypes"} & set(state_only)
    assert list(state_only["inputs"]) == ["obs", "noise"]


def test_the_deploy_runtime_and_the_server_refuse_pixel_policies_in_one_line(pixel, capsys) -> None:
    cases = [(pixel["onnx"], ("run the exported graph with its image inputs \\(image_agentview, image_wrist: "
                              f"uint8 \\(batch, 2, {SIZE}, {SIZE}, 3\\)\\)")),
             (pixel["pt2"], "run the exported graph"),
             (pixel["reflow"], "`flowrl export` it and run the graph")]
    for path, hint in cases:
        with pytest.raises(FlowrlError, match=f"sees camera images \\(agentview.*\\); the deploy runtime feeds "
                                              f"state only: {hint}") as info:
            flowrl.deploy.load(path)
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    assert main(["serve", str(pixel["onnx"]), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "sees camera images (agentview, wrist); the deploy runtime feeds state only" in err and err.count("\n") == 1


def test_a_pixel_policy_with_a_residual_field_is_unrolled_through_its_velocity(pixel) -> None:
    """The fused graph knows the plain network only; with a residual the images still go through ``encode``."""
    policy, _ = load_policy(pixel["reflow"])
    cfg = dataclasses.replace(policy.cfg, residual_hidden_dim=16, residual_gain_min=0.5)
    residual = FlowPolicy(cfg, policy.obs_dim, policy.act_dim, policy.action_low, policy.action_high)
    residual.load_state_dict(policy.state_dict(), strict=False)  # the same encoder and network, plus the residual
    torch.nn.init.normal_(residual.residual.net[-1].weight, std=0.1)  # a non-zero target and gain
    obs, noise, images = _inputs(3, 2, CAMERAS, seed=7)
    for p, fused in ((policy, True), (residual, False)):
        module = UnrolledSampler(p, 3).eval()
        assert module.fused == fused and module.cameras == tuple(CAMERAS)
        with torch.no_grad():
            got = module(obs, noise, *images.values())
        torch.testing.assert_close(got, p.predict(obs, 3, noise, images=images), rtol=0, atol=1e-5)
    with pytest.raises(FlowrlError, match="takes 2 image input\\(s\\) \\(agentview, wrist\\), got 1"):
        module(obs, noise, images["agentview"])
