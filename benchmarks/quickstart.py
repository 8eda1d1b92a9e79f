"""The README's main command as a user runs it: its wall clock and its final table, on this machine.

    python benchmarks/quickstart.py [--tag dev2core]

Runs ``flowrl pretrain configs/quickstart.yaml`` in a fresh process (start-up, data loading, training, the
periodic evaluations and the final table all counted) and writes benchmarks/results/quickstart/
quickstart[_<tag>].json: the wall clock, the final table's rows, the checkpoint they are of, and where it was
measured. Exits non-zero when the command fails or takes more than ``--max-minutes``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: F401 - the provenance names the GPU the command's `device=auto` takes

from common import FLOWRL_CLI, REPO, report_checks, results_dir, run_main, with_provenance, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", default="", help="suffix of the results file (the machine, say)")
    ap.add_argument("--max-minutes", type=float, default=20.0, help="the wall clock the check allows")
    ap.add_argument("overrides", nargs="*", help="key=value overrides passed to the command (a dry run's budget; "
                    "its record is named ..._overridden, beside the main command's own)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quickstart"
        command = ["flowrl", "pretrain", "configs/quickstart.yaml", "--out", "runs/quickstart", *args.overrides]
        ran = [*FLOWRL_CLI, *command[1:3], "--out", str(out), "--quiet", *args.overrides]
        start = time.time()
        proc = subprocess.run(ran, cwd=REPO, capture_output=True, text=True)
        wall_s = time.time() - start
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        final = json.loads((out / "eval.json").read_text())["evaluations"][-1]
    table = proc.stdout.strip()
    record = {"command": " ".join(command), "ran": " ".join(ran[1:]).replace(str(out), "<temporary folder>"),
              "wall_clock_s": round(wall_s, 1),
              "wall_clock_min": round(wall_s / 60, 1), "final_evaluation": final, "table": table.splitlines()}
    name = "quickstart" + (f"_{args.tag}" if args.tag else "") + ("_overridden" if args.overrides else "")
    path = write_json(results_dir("quickstart") / f"{name}.json", with_provenance(record))
    print(table)
    print(f"\n{' '.join(command)}: {wall_s / 60:.1f} min wall clock; written to {path}")
    return report_checks([(f"the main command finished in {wall_s / 60:.1f} min (<= {args.max_minutes:g})",
                           wall_s <= 60 * args.max_minutes)])


if __name__ == "__main__":
    sys.exit(run_main(main))
