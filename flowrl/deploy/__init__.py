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

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowrl.deploy.runtime import DeployedPolicy


def load(path: Any, backend: str = "auto", **kwargs: Any) -> "DeployedPolicy":
    """A deployable policy from a checkpoint folder (eager), an ``.onnx`` or a torch.export ``.pt2``
    file; see :func:`flowrl.deploy.runtime.load`."""
    from flowrl.config import renamed_argument
    from flowrl.deploy.runtime import load as _load

    if "num_steps" in kwargs:  # the old name of k, warned about here so the warning points at the caller
        kwargs["k"] = renamed_argument("flowrl.deploy.load", "num_steps", "k", kwargs.pop("num_steps"), kwargs.get("k"))

    return _load(path, backend=backend, **kwargs)


__all__ = ["load"]
