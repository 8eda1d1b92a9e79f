"""flowrl: reinforcement learning of flow-matching robot policies."""

from flowrl.errors import FlowrlError

__version__ = "0.1.0"
__all__ = ["FlowrlError", "__version__"]
