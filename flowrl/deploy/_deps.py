"""Lazy imports of the ``deploy`` extra: flowrl works without it, and a missing package is one line.

ONNX, ONNX Runtime, gRPC and protobuf are needed only to export and serve, so nothing in flowrl
imports them at module level; every use goes through :func:`require`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from flowrl.errors import FlowrlError

EXTRA_HINT = 'pip install -e ".[deploy]"'


def require(module: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise a one-line :class:`FlowrlError` naming the ``deploy`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        name = package or module.split(".")[0]
        raise FlowrlError(f"{name} is not installed ({str(e).splitlines()[0]}); it comes with the deploy extra: "
                          f"{EXTRA_HINT}") from None
