"""What every benchmark script shares: where results go, the PASS/FAIL lines and exit code, merging the
JSON files of seeds run as separate processes, and reading a run's learning curve."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def results_dir() -> Path:
    """benchmarks/results, or $FLOWRL_RESULTS (the GPU machine writes under its $OUT)."""
    out = Path(os.environ.get("FLOWRL_RESULTS", REPO / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    return out


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


def write_result(name: str, record: dict, tag: str = "") -> Path:
    """``<results>/<name>[_<tag>].json``."""
    path = results_dir() / f"{name}{'_' + tag if tag else ''}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def run_main(main: Callable[[], int]) -> int:
    """A benchmark's exit code; flowrl's own errors (a missing checkpoint, a bad override) as one line."""
    from flowrl.errors import FlowrlError

    try:
        return main()
    except FlowrlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
