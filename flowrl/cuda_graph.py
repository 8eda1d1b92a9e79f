"""Running a training step's gradient computation as one CUDA graph.

A gradient step of the small networks flowrl trains is a few hundred kernels of microseconds each: on a
GPU, launching them one by one from Python costs more than running them. :class:`StepGraph` captures the
step once and replays it, so the whole step is one launch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Matrix products and convolutions on CUDA in TensorFloat-32 (10-bit mantissa inputs, float32 sums) inside
    the block, or not; the process's own setting is back after it, so what runs outside (evaluations, other
    code of the user) is untouched."""
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [b.allow_tf32 for b in backends]
    for b in backends:
        b.allow_tf32 = enabled
    try:
        yield
    finally:
        for b, value in zip(backends, before):
            b.allow_tf32 = value


def fused_if_cuda(device: torch.device) -> dict[str, bool]:
    """The optimiser keyword that runs Adam/AdamW as one fused kernel on a CUDA device (nothing elsewhere)."""
    return {"fused": True} if device.type == "cuda" else {}


def graphs_usable(device: torch.device, distributed: bool, uses_images: bool) -> bool:
    """Whether a training step may run as a captured CUDA graph: on a CUDA device, in one process (a
    gradient all-reduce is not captured), for state-only policies (image augmentation draws its own noise)."""
    return device.type == "cuda" and not distributed and not uses_images


class StepGraph:
    """A gradient computation ``fn(inputs) -> outputs`` (forward, backward, clipping) run as one CUDA graph.

    ``inputs`` and ``outputs`` are dicts of tensors. The first ``warmup`` calls run eagerly on a side
    stream (the allocator, cuBLAS and autograd settle), the next is captured, and every call from then on
    copies its inputs into the captured input buffers and replays. Everything else ``fn`` reads (weights,
    buffers of the caller) must stay at the same addresses, updated in place. Gradients live in the graph's
    memory, and each replay overwrites them as a fresh backward pass would; a replay gives each parameter back
    the graph's gradient tensor should an eager step in between have set it to None. The outputs are the graph's
    own tensors, overwritten by the next replay: read or copy them before calling again.
    """

    def __init__(self, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], warmup: int = 3) -> None:
        self.fn, self.warmup = fn, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        """Each parameter with the gradient tensor the graph writes."""

    def __call__(self, inputs: dict[str, torch.Tensor],
                 optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.graph is not None:
            for k, v in inputs.items():
                self.inputs[k].copy_(v)
            for p, g in self.grads:  # an eager step in between may have set them to None
                if p.grad is not g:
                    p.grad = g
            self.graph.replay()
            return dict(self.outputs)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if self.calls <= self.warmup:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.fn(inputs)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs = self.fn(self.inputs)
        self.grads = [(p, p.grad) for opt in optimizers for group in opt.param_groups for p in group["params"]
                      if p.grad is not None]
        self.graph = graph
        graph.replay()
        return dict(self.outputs)
