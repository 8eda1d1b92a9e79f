"""Atomic file writes: write beside the target, then rename over it.

A crash or Ctrl-C mid-write leaves either the old file or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it over ``target``.

    Works for files and for folders (a folder target replaces the old folder as a whole).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    inner = tmp / target.name
    try:
        yield inner
        if target.is_dir() and not target.is_symlink():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(inner, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(inner, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(target: str | os.PathLike[str], writer: Callable[[Path], Any]) -> None:
    """Call ``writer(path)`` on a temporary path and move the result to ``target``."""
    with atomic_path(target) as tmp:
        writer(tmp)


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    write_atomic(target, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in ``path``; a file that cannot be read or parsed is a one-line FlowrlError naming it."""
    from flowrl.errors import FlowrlError

    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlowrlError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise FlowrlError(f"{path}: cannot read ({e.strerror})") from None
