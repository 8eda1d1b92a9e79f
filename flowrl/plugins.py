"""Third-party tasks and agents: packages that declare an entry point in the group ``flowrl.plugins``
are imported once, the first time a registry is read; importing them registers what they define."""

from __future__ import annotations

from importlib.metadata import entry_points

from flowrl.errors import FlowrlError

_loaded = False


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in entry_points(group="flowrl.plugins"):
        try:
            ep.load()
        except Exception as e:  # a broken plugin names itself instead of failing somewhere deep
            raise FlowrlError(f"flowrl plugin '{ep.name}' ({ep.value}) failed to load: {e}") from e
