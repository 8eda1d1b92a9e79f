"""Deploying flow policies to robot controllers.

- :mod:`flowrl.deploy.export`: the K-step deterministic sampler unrolled into one graph
  (normalisation, clipping and scaling to the action bounds inside), as ONNX or a torch.export
  program, with a JSON of facts beside it, checked against eager before it is kept.
- :mod:`flowrl.deploy.runtime`: :func:`load` gives a policy with ``reset``, ``act`` (observation
  history, action queue, optional temporal ensembling) and ``act_chunk`` (a
  :class:`flowrl.rollout.ChunkPolicy`), the same from eager, ONNX Runtime and torch.export.
- :mod:`flowrl.deploy.control`: a fixed-rate control loop with deadline accounting.
- :mod:`flowrl.deploy.server`: a gRPC policy server and its Python client.

ONNX, ONNX Runtime and gRPC come with the ``deploy`` extra and are imported only when used.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """``flowrl.deploy.load`` is :func:`flowrl.deploy.runtime.load`, imported on first use (the runtime pulls in
    what the ``deploy`` extra brings only when a policy is loaded)."""
    if name == "load":
        from flowrl.deploy.runtime import load

        return load
    raise AttributeError(f"module 'flowrl.deploy' has no attribute {name!r}")


__all__ = ["load"]
