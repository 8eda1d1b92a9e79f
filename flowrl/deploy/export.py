"""Export a policy's deterministic K-step sampler as one graph: ONNX or a torch.export program.

The exported graph takes ``obs`` (batch, obs_history, obs_dim) raw observations and ``noise``
(batch, horizon, act_dim) standard Gaussian noise (a policy with a steering head maps it to the flow's
initial point inside the graph) and returns ``actions`` (batch, horizon, act_dim) in env
units: the observation normalisation, the K Euler steps on the policy's grid for K (``t_k = k/K``, or
the non-uniform grid the checkpoint holds for that K; heads that take a step size see each step's),
the clipping to [-1, 1] and the scaling to the action bounds are all inside, so a
controller needs nothing of flowrl. The batch dimension is dynamic.

A pixel policy's graph also takes one uint8 input per camera, after ``noise`` in the order of the
policy's ``cameras``: ``image_<camera>`` (batch, obs_history, image_size, image_size, 3), RGB, top
row first (as :class:`flowrl.envs.cameras.CameraRenderer` and robomimic-layout datasets give them).
The image encoder runs inside, once per call, through the policy's own :meth:`FlowPolicy.encode`.

The unrolled graph is the policy's computation rearranged for inference, not a new model: the time
(and step-size) embeddings of the K fixed times are constants, computed once at export and folded
with the first layer's bias, and the observation part of the first layer (its columns of the
conditioning features: the standardised states, for a pixel policy followed by the image features)
is applied once per call instead of once per step, each step's output layer is premultiplied by
its step size, and the scaling to the action bounds is one multiply-add: at batch 1 every node of the
graph costs a dispatch (a policy whose velocity is more than the plain network is unrolled through its
own ``velocity``). :func:`export` checks the result against the eager
:meth:`FlowPolicy.predict` on random inputs (random uint8 images for pixel policies) and refuses to
keep an export that differs by more than ``tolerance`` (1e-4 by default).

A JSON file beside the export (``<out>.json``) records what a controller must know: task, dims,
K, the time grid, horizon, act_steps, obs_history, head, observation layout, action bounds, the graph's inputs
(and for pixel policies the cameras, the image size and the image inputs' names), flowrl version.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowrl.checkpoint import load_policy, resolve_checkpoint
from flowrl.config import renamed_argument
from flowrl.deploy._deps import require
from flowrl.deploy.meta import (
    META_FORMAT,  # noqa: F401 (re-exported)
    export_metadata,
    image_input_name,
    metadata_path,
    read_metadata,  # noqa: F401 (re-exported)
)
from flowrl.deploy.runtime import make_backend
from flowrl.errors import FlowrlError
from flowrl.io import atomic_path, write_json
from flowrl.policy import OBS_CLIP, FlowPolicy

FORMATS = ("onnx", "torch-export")
TOLERANCE = 1e-4


def mish_from_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Mish, ``x * tanh(softplus(x))``, written as ``x * a / (2 - a)`` with ``s = sigmoid(x)``, ``a = s (2 - s)``.

    The same function (``tanh(softplus(x)) = (1 - u^2) / (1 + u^2)`` for ``u = 1 - s``), bounded everywhere,
    in operations ONNX Runtime runs vectorised: its ``Softplus`` kernel is several times slower than
    ``Sigmoid`` plus four elementwise nodes on a 512-wide row, which matters at batch 1."""
    s = torch.sigmoid(x)
    a = s * (2.0 - s)
    return x * a / (2.0 - a)


class UnrolledSampler(nn.Module):
    """``(obs, noise[, *images]) -> actions``: the deterministic sampler of ``policy`` at K steps, unrolled.

    Equal to ``policy.predict(obs, K, noise, images=...)`` up to float rounding (the first layer is split
    into its action, conditioning and embedding columns, and the embeddings of the K times are constants).
    A pixel policy's images come after ``noise``, one (B, obs_history, H, W, 3) uint8 tensor per camera
    in the order of ``cameras``.
    """

    def __init__(self, policy: FlowPolicy, k: int) -> None:
        super().__init__()
        if k < 1:
            raise FlowrlError(f"K must be >= 1, got {k}")
        cfg = policy.cfg
        self.k = k
        # the rearranged graph knows the plain velocity network only; a policy whose velocity has more
        # (a subclass, an added residual field) is unrolled through its own ``velocity`` instead
        self.fused = type(policy).velocity is FlowPolicy.velocity and getattr(policy, "residual", None) is None
        self.policy = None if self.fused else policy
        # pixel policies: the conditioning features (states, then image features) come from the policy's own
        # ``encode``, once per call; state-only ones standardise the states inline, as they always have
        self.cameras: tuple[str, ...] = tuple(cfg.cameras) if getattr(policy, "uses_images", False) else ()
        self.encoder = policy if self.cameras else None
        self.takes_step_size = policy.takes_step_size
        times = policy.time_grid(k)
        self.times = times
        self.steps = [end - start for start, end in zip(times, times[1:])]
        self.chunk_shape = (cfg.horizon, policy.act_dim)
        chunk = cfg.horizon * policy.act_dim
        feat = policy.cond_dim  # obs_history * obs_dim for state-only policies
        inp = policy.velocity_net.inp
        with torch.no_grad():
            w = inp.weight.detach().clone()
            self.register_buffer("obs_mean", policy.obs_mean.detach().clone())
            self.register_buffer("obs_std", policy.obs_std.detach().clone())
            self.register_buffer("w_action", w[:, :chunk].T.contiguous())
            self.register_buffer("w_obs", w[:, chunk:chunk + feat].T.contiguous())
            # per step: W_emb [temb(t_k), demb(d_k)] + b, one (1, hidden) row each
            emb = [policy.time_embed(torch.tensor(times[:-1], dtype=torch.float32))]
            if policy.step_embed is not None:
                emb.append(policy.step_embed(torch.tensor(self.steps, dtype=torch.float32)))
            step_bias = torch.cat(emb, dim=-1) @ w[:, chunk + feat:].T + inp.bias
            # the first step's bias rides on the once-per-call observation product; later steps add the difference
            self.register_buffer("obs_bias", step_bias[0].detach().clone())
            self.register_buffer("step_bias_offset", (step_bias - step_bias[0]).detach().clone())
            # each step's output layer premultiplied by its step size: x + dt v is one product and one sum
            last = policy.velocity_net.out[-1]
            self.register_buffer("step_out_weight", torch.stack([dt * last.weight.detach() for dt in self.steps]))
            self.register_buffer("step_out_bias", torch.stack([dt * last.bias.detach() for dt in self.steps]))
            # clip to [-1, 1], then one multiply-add to the action bounds
            self.register_buffer("action_scale", 0.5 * (policy.action_high - policy.action_low).detach().clone())
            self.register_buffer("action_offset", policy.action_low.detach() + self.action_scale)
        self.blocks = policy.velocity_net.blocks
        self.out = policy.velocity_net.out
        self.steering = getattr(policy, "steering", None)

    def _step_from_hidden(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """``dt_i`` times the velocity, from the hidden state after the input layer: each pre-norm residual
        block, then the output layer premultiplied by step ``i``'s size (``flowrl.nets.ResidualMLP``), with
        Mish as :func:`mish_from_sigmoid`."""
        for block in self.blocks:
            norm, first, _, second = block.net
            h = h + second(mish_from_sigmoid(first(norm(h))))
        norm = self.out[0]
        return torch.nn.functional.linear(mish_from_sigmoid(norm(h)), self.step_out_weight[i], self.step_out_bias[i])

    def forward(self, obs: torch.Tensor, noise: torch.Tensor, *images: torch.Tensor) -> torch.Tensor:
        if len(images) != len(self.cameras):
            raise FlowrlError(f"the sampler takes {len(self.cameras)} image input(s) "
                              f"({', '.join(self.cameras) or 'state only'}), got {len(images)}")
        if self.encoder is not None:
            z = self.encoder.encode(obs, dict(zip(self.cameras, images)))
        else:
            z = ((obs - self.obs_mean) / self.obs_std).clamp(-OBS_CLIP, OBS_CLIP).flatten(1)
        if self.steering is not None:
            noise = self.steering(z, noise)
        if self.policy is not None:
            x = noise
            ones = z.new_ones(z.shape[0])
            for start, dt in zip(self.times, self.steps):
                x = x + dt * self.policy.velocity(ones * start, x, z, ones * dt if self.takes_step_size else None)
            x = x.flatten(1)
        else:
            h_obs = torch.addmm(self.obs_bias, z, self.w_obs)
            x = noise.flatten(1)
            for i in range(self.k):
                h = torch.addmm(h_obs if i == 0 else h_obs + self.step_bias_offset[i], x, self.w_action)
                x = x + self._step_from_hidden(h, i)
        a = x.clamp(-1.0, 1.0).view(-1, *self.chunk_shape)
        return a * self.action_scale + self.action_offset


def _example_inputs(policy: FlowPolicy, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random observations around the normalisation statistics (3 std: some get clipped) and noise, then
    (pixel policies) uniformly random uint8 images, one tensor per camera in the policy's order."""
    gen = torch.Generator().manual_seed(seed)
    cfg = policy.cfg
    z = 3.0 * torch.randn((batch, cfg.obs_history, policy.obs_dim), generator=gen)
    obs = policy.obs_mean.cpu() + z * policy.obs_std.cpu()
    noise = torch.randn((batch, cfg.horizon, policy.act_dim), generator=gen)
    shape = (batch, cfg.obs_history, cfg.image_size, cfg.image_size, 3)
    images = [torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
              for _ in (cfg.cameras if policy.uses_images else ())]
    return obs, noise, *images


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters' deprecation notes and registry chatter (torchvision ops) are not the user's concern."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _dynamic_shapes(module: UnrolledSampler) -> dict[str, Any]:
    """A dynamic batch (dimension 0) for every input; the images, ``forward``'s ``*images``, as a tuple."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    shapes: dict[str, Any] = {"obs": {0: batch}, "noise": {0: batch}}
    if module.cameras:
        shapes["images"] = tuple({0: batch} for _ in module.cameras)
    return shapes


def _write_onnx(module: UnrolledSampler, example: tuple[torch.Tensor, ...], path: Path) -> None:
    require("onnx")
    require("onnxscript")
    names = ["obs", "noise", *(image_input_name(c) for c in module.cameras)]
    try:
        program = torch.onnx.export(module, example, input_names=names, output_names=["actions"],
                                    dynamic_shapes=_dynamic_shapes(module), dynamo=True, optimize=True,
                                    verbose=False)
    except Exception as e:  # the exporter raises many types; an export failure is a bug to report, kept to one line
        raise FlowrlError(f"ONNX export failed: {str(e).strip().splitlines()[0]}") from None
    program.save(str(path))


def _write_torch_export(module: UnrolledSampler, example: tuple[torch.Tensor, ...], path: Path) -> None:
    program = torch.export.export(module, example, dynamic_shapes=_dynamic_shapes(module))
    torch.export.save(program, str(path))


def export(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", k: int | None = None,
           tolerance: float = TOLERANCE, check_batch: int = 16, seed: int = 0, *,
           num_steps: int | None = None) -> dict[str, Any]:
    """Export ``checkpoint``'s deterministic sampler at K = ``k`` (default: the policy's own)
    to ``out`` (ONNX or a torch.export ``.pt2`` program) with ``<out>.json`` beside it.

    The export is loaded back (ONNX Runtime for ONNX, the saved program for torch.export) and
    compared with eager ``predict`` on ``check_batch`` random observations and noises (and uint8
    images for a pixel policy); above
    ``tolerance`` nothing is written and a :class:`FlowrlError` says by how much. Both files are
    written atomically. Returns the metadata with ``max_abs_error`` added. ``num_steps`` is the old
    name of ``k``."""
    k = renamed_argument("export", "num_steps", "k", num_steps, k)
    if fmt not in FORMATS:
        raise FlowrlError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    policy, config = load_policy(resolve_checkpoint(checkpoint), "cpu")
    k = policy.cfg.k if k is None else int(k)
    if k < 1:
        raise FlowrlError(f"--k must be >= 1, got {k}")
    if check_batch < 2:
        raise FlowrlError(f"check_batch must be >= 2, got {check_batch}")
    out = Path(out)
    if out.is_dir():
        raise FlowrlError(f"--out {out} is a folder; give a file path (e.g. {out / 'policy.onnx'})")
    module = UnrolledSampler(policy, k).eval()
    meta = export_metadata(policy, config, k, fmt)
    with torch.no_grad():
        example = _example_inputs(policy, 2, seed)
        obs, noise, *images = _example_inputs(policy, check_batch, seed + 1)
        expected = policy.predict(obs, k, noise, images=dict(zip(module.cameras, images)) or None).numpy()
    with atomic_path(out) as tmp:
        with _quiet_exporter():
            if fmt == "onnx":
                _write_onnx(module, example, tmp)
            else:
                _write_torch_export(module, example, tmp)
        run = make_backend(tmp, fmt, cameras=module.cameras)
        got = run(obs.numpy(), noise.numpy(), {c: x.numpy() for c, x in zip(module.cameras, images)} or None)
        err = float(abs(got - expected).max())
        if not err <= tolerance:  # NaN fails too
            raise FlowrlError(f"export differs from eager by {err:.3g} (> {tolerance:g}); nothing written")
    meta["max_abs_error"] = err
    write_json(metadata_path(out), meta)
    return meta
