"""What every benchmark script shares: where results go (one folder per study), what a results file says of
where it was measured, the PASS/FAIL lines and exit code, merging the JSON files of seeds run as separate
processes, and reading a run's learning curve."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]

FLOWRL_CLI = [sys.executable, "-P", "-m", "flowrl"]
"""The installed ``flowrl`` command in a subprocess. ``-P``: never the repository's own ``flowrl/`` folder from the
working directory, which is not the package (the install maps ``agents/`` and ``envs/`` into it)."""


def results_dir(study: str = "") -> Path:
    """``benchmarks/results/<study>`` (a study's current record: docs/results.md cites its files), or
    ``$FLOWRL_RESULTS/<study>`` (a GPU machine writes under its own output folder)."""
    out = Path(os.environ.get("FLOWRL_RESULTS", REPO / "benchmarks" / "results"))
    out = out / study if study else out
    out.mkdir(parents=True, exist_ok=True)
    return out


def in_repo(path: str | Path) -> Path:
    """A preset's path (``data.path``: relative to the repository, as the presets write it) from any working
    directory."""
    return Path(path) if Path(path).is_absolute() else REPO / path


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """Where a measurement was made: the git commit of this checkout (``+uncommitted`` when tracked files
    differ from it, ``unknown`` outside a git checkout), the host's processor and core count, and its GPU.

    ``FLOWRL_COMMIT`` names the commit instead, for a copy of a checkout made without its git history (or
    with a stale one), as remote machines often get."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout

    commit = os.environ.get("FLOWRL_COMMIT", "").strip()
    if not commit:
        try:
            commit = git("rev-parse", "HEAD").strip()
            if git("status", "--porcelain", "--untracked-files=no").strip():
                commit += "+uncommitted"
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    gpu = None
    if "torch" in sys.modules:  # every benchmark imports torch; this module alone does not need it
        torch = sys.modules["torch"]
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"commit": commit, "cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu}


def with_provenance(record: dict) -> dict:
    """``record`` with its ``"provenance"``, as every results file carries it: :func:`provenance`, unless the
    record brings its own (rows imported from runs made elsewhere)."""
    return record if "provenance" in record else {**record, "provenance": provenance()}


def write_json(path: Path, record: dict) -> Path:
    """Write ``record`` with its provenance as indented JSON to ``path``."""
    path.write_text(json.dumps(with_provenance(record), indent=2) + "\n")
    return path


def report_checks(checks: list[tuple[str, bool]], require_some: bool = False) -> int:
    """Print one PASS/FAIL line per target; the exit code: 0 when all passed (and, with
    ``require_some``, there was at least one to pass)."""
    print()
    for text, ok in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {text}")
    passed = all(ok for _, ok in checks) and (bool(checks) or not require_some)
    return 0 if passed else 1


def merge_results(paths: list[str], also: tuple[str, ...] = (), extend: tuple[str, ...] = ()) -> dict[str, dict]:
    """Per-task records from results files of parallel runs: their seeds concatenated, the top-level
    keys named in ``also`` taken from whichever file has them, and the lists of the dicts named in
    ``extend`` (rows per algorithm) concatenated."""
    merged: dict[str, dict] = {}
    for path in paths:
        rec = json.loads(Path(path).read_text())
        if rec["task"] in merged:
            into = merged[rec["task"]]
            into["seeds"] += rec["seeds"]
            into.update({k: v for k, v in rec.items() if k in also})
            for key in extend:
                for name, rows in rec.get(key, {}).items():
                    into.setdefault(key, {}).setdefault(name, []).extend(rows)
        else:
            merged[rec["task"]] = rec
    return merged


def first_reaching(history: list[dict], target: float) -> dict | None:
    """The first evaluation of a learning curve (the Trainer's ``eval_history``) whose mean return reaches
    ``target``."""
    return next((point for point in history if point.get("return_mean", float("-inf")) >= target), None)


def write_result(name: str, record: dict, tag: str = "", study: str = "") -> Path:
    """``<results>/<study>/<name>[_<tag>].json``, with the record's provenance."""
    return write_json(results_dir(study) / f"{name}{'_' + tag if tag else ''}.json", record)


def run_main(main: Callable[[], int]) -> int:
    """A benchmark's exit code; flowrl's own errors (a missing checkpoint, a bad override) as one line."""
    from flowrl.errors import FlowrlError

    try:
        return main()
    except FlowrlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
