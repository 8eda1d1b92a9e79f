"""Running a training step as one CUDA graph.

A gradient step of the small networks flowrl trains is a few hundred kernels of microseconds each: on a
GPU, launching them one by one from Python costs more than running them. :class:`StepGraph` captures the
step once and replays it, so the whole step (its random draws, forward, backward, clipping, the optimiser's
and the EMA's updates, where the caller puts them in) is one launch.
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


def device_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Hold each parameter group's learning rate as a 0-d tensor on its parameters' device.

    A captured optimiser step reads a float learning rate once, at capture; a tensor is read at every replay,
    and learning-rate schedulers update a tensor rate in place. The state the optimiser saves keeps floats,
    and a loaded state gets its rates back as device tensors, so checkpoints move between devices as before.
    """
    def to_tensors(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=group["params"][0].device)

    def to_floats(opt: torch.optim.Optimizer, state: dict) -> dict:
        for group in state["param_groups"]:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"])
        return state

    to_tensors(optimizer)
    optimizer.register_state_dict_post_hook(to_floats)
    optimizer.register_load_state_dict_post_hook(to_tensors)


def keep_device_flags(optimizer: torch.optim.Optimizer) -> None:
    """A loaded optimiser state keeps this optimiser's implementation flags (``fused``, ``foreach``,
    ``capturable``: choices for the device it runs on) rather than those of the run that saved it."""
    flags = ("fused", "foreach", "capturable")
    own = [{k: group.get(k) for k in flags} for group in optimizer.param_groups]

    def keep(opt: torch.optim.Optimizer, state: dict) -> dict:
        for group, mine in zip(state["param_groups"], own):
            group.update(mine)
        return state

    optimizer.register_load_state_dict_pre_hook(keep)


def graphs_usable(device: torch.device, distributed: bool, uses_images: bool) -> bool:
    """Whether a training step may run as a captured CUDA graph: on a CUDA device, in one process (a
    gradient all-reduce is not captured), for state-only policies (image augmentation draws its own noise)."""
    return device.type == "cuda" and not distributed and not uses_images


def graph_safe_generators() -> bool:
    """Whether this torch lets a CUDA graph draw from a caller's generator (each replay advancing it as the
    eager draws would)."""
    return hasattr(torch.cuda.CUDAGraph, "register_generator_state")


class StepGraph:
    """A training step ``fn(inputs) -> outputs`` (forward, backward, clipping, optionally the optimiser's
    step) run as one CUDA graph.

    ``inputs`` and ``outputs`` are dicts of tensors. The first ``warmup`` calls run eagerly on a side
    stream (the allocator, cuBLAS and autograd settle), the next is captured, and every call from then on
    copies its inputs into the captured input buffers and replays. Everything else ``fn`` reads (weights,
    optimiser state, buffers of the caller) must stay at the same addresses, updated in place; an optimiser
    stepped inside ``fn`` must be ``capturable`` with :func:`device_learning_rates`. Gradients live in the
    graph's memory, and each replay overwrites them as a fresh backward pass would; a replay gives each
    parameter back the graph's gradient tensor should an eager step in between have set it to None. The
    outputs are the graph's own tensors, overwritten by the next replay: read or copy them before calling again.

    ``draw() -> inputs`` (with the ``generator`` it draws from) makes a step's random draws: inside the graph
    where torch can capture them (:func:`graph_safe_generators`), else before each call; the same numbers in
    the same order either way.
    """

    def __init__(self, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], warmup: int = 3,
                 draw: Callable[[], dict[str, torch.Tensor]] | None = None,
                 generator: torch.Generator | None = None) -> None:
        if (draw is None) != (generator is None):
            raise ValueError("StepGraph: draw and the generator it draws from go together")
        self.fn, self.warmup, self.draw, self.generator = fn, warmup, draw, generator
        self.draws_in_graph = draw is not None and graph_safe_generators()
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        """Each parameter with the gradient tensor the graph writes."""

    def __call__(self, inputs: dict[str, torch.Tensor],
                 optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.draw is not None and not self.draws_in_graph:
            inputs = {**inputs, **self.draw()}
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
                out = self._step(inputs)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        if self.draws_in_graph:
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs = self._step(self.inputs)
        self.grads = [(p, p.grad) for opt in optimizers for group in opt.param_groups for p in group["params"]
                      if p.grad is not None]
        self.graph = graph
        graph.replay()
        return dict(self.outputs)

    def _step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.draws_in_graph:
            inputs = {**inputs, **self.draw()}
        return self.fn(inputs)
