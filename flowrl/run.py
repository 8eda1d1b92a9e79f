"""Run folders: ``runs/<name>/`` with the resolved config, TensorBoard events, checkpoints and
``eval.json``. Shared by every training stage."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from flowrl.checkpoint import list_checkpoints
from flowrl.config import rename_old_keys, to_dict
from flowrl.errors import FlowrlError
from flowrl.io import read_json, write_atomic, write_json


class RunFolder:
    """One training run on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._writer: Any = None

    @staticmethod
    def default_name(stage: str, task: str, head: str) -> str:
        name = task.lower().replace("/", "-")  # robosuite/lift -> robosuite-lift, one folder
        return f"{name}-{stage}-{head}-{time.strftime('%Y%m%d-%H%M%S')}"

    def start(self, cfg: Any, resume: bool, resumable_keys: tuple[str, ...] = ("train.steps",)) -> bool:
        """Create the folder and write ``config.yaml``. On resume, check the config did not change and
        return whether there is a checkpoint to continue from (a run stopped before its first one,
        or a folder that does not exist yet, starts from the beginning, so a requeued job can always
        pass ``--resume``)."""
        cfg_path = self.path / "config.yaml"
        new = to_dict(cfg)
        if resume and cfg_path.is_file():
            now = _flat(new)
            written = rename_old_keys(OmegaConf.structured(type(cfg)), [OmegaConf.load(cfg_path)], warn=False)[0]
            old = _flat(OmegaConf.to_container(written))  # an older flowrl's key names read as the current ones
            default = _flat(to_dict(type(cfg)()))  # a key newer than the run's flowrl: its default is what it ran
            diffs = [k for k in now if k not in resumable_keys and old.get(k, default.get(k)) != now[k]]
            if diffs:
                k = diffs[0]
                raise FlowrlError(f"--resume: config key '{k}' differs from the run's config.yaml "
                                  f"({old.get(k)!r} there, {now[k]!r} now)")
        elif not resume and self.checkpoints.exists() and list_checkpoints(self.path):
            raise FlowrlError(f"{self.path} already holds checkpoints; pass --resume to continue it "
                              "or choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(cfg_path, lambda p: p.write_text(OmegaConf.to_yaml(OmegaConf.create(new))))
        return resume and self.latest_checkpoint() is not None

    def writer(self, purge_step: int | None = None) -> Any:
        """The TensorBoard writer; ``purge_step`` drops events a resumed run will write again."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path), purge_step=purge_step)
        return self._writer

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"{step}"

    def latest_checkpoint(self) -> Path | None:
        found = list_checkpoints(self.path)
        return found[-1] if found else None

    def append_eval(self, record: dict[str, Any]) -> Path:
        """Add one evaluation to ``eval.json`` (a list under ``evaluations``, oldest first, each with
        its checkpoint, K, episodes, seeds and time); earlier records are kept."""
        return append_eval(self.path / "eval.json", record)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@contextmanager
def stop_on_ctrl_c(request_stop: Callable[..., None]) -> Iterator[None]:
    """While inside, Ctrl-C calls ``request_stop`` (the loop stops at its next boundary and saves)
    instead of raising mid-step; a second Ctrl-C is the loop's to escalate. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def append_eval(path: Path, record: dict[str, Any]) -> Path:
    """See :meth:`RunFolder.append_eval`; a file in the older one-record layout becomes the first record."""
    records: list[Any] = []
    if path.is_file():
        try:
            old = read_json(path)
        except FlowrlError:
            old = None
        if isinstance(old, dict) and isinstance(old.get("evaluations"), list):
            records = old["evaluations"]
        elif isinstance(old, dict):
            records = [old]
        else:  # unreadable: keep it beside, never lose it, and say so
            aside = path.with_suffix(".unreadable.json")
            path.rename(aside)
            print(f"warning: {path} was not an evaluation record; kept as {aside}, starting a new one",
                  file=sys.stderr)
    records.append({**record, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_json(path, {"evaluations": records})
    return path


def format_eval_table(rows: list[dict[str, Any]], title: str = "") -> str:
    """A plain-text table of evaluation results, one row per K."""
    has_success = any("success_rate" in r for r in rows)
    head = f"{'K':>3}  {'episodes':>8}  {'return mean':>11}  {'return std':>10}  {'length':>7}"
    head += "  success" if has_success else ""
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['k']:>3}  {r['episodes']:>8}  {r['return_mean']:>11.1f}  {r['return_std']:>10.1f}"
                f"  {r['length_mean']:>7.1f}")
        if has_success:
            line += f"  {100 * r.get('success_rate', float('nan')):6.1f}%"
        lines.append(line)
    return "\n".join(lines)

