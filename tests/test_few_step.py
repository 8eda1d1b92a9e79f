"""benchmarks/few_step.py: which preset each head and method takes, its table and targets, and (slow) a
whole trial run on Hopper with tiny budgets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import few_step  # noqa: E402


def test_presets_of_heads_without_their_own_take_the_reflow_preset() -> None:
    path, extra = few_step.preset("square", "pretrain", "shortcut")
    assert path.name == "pretrain_reflow.yaml" and extra == ["policy.head=shortcut"]
    path, extra = few_step.preset("square", "pretrain", "meanflow")
    assert path.name == "pretrain_meanflow.yaml" and extra == []
    path, extra = few_step.preset("square", "finetune", "meanflow", "_warp")
    assert path.name == "finetune_reflow_warp.yaml" and extra == ["train.k=1"]
    path, extra = few_step.preset("hopper", "finetune", "meanflow")
    assert path.name == "finetune_meanflow.yaml" and extra == []


def _row(head: str, method: str, k: int, value: float) -> dict:
    return {"head": head, "method": method, "k": k, "return_mean": value, "success_rate": value / 100}


def test_table_means_over_seeds_and_targets_per_stage() -> None:
    seeds = [{"seed": s, "rows": [_row("reflow", "bc", 4, 90.0 + s), _row("reflow", "bc", 1, 60.0),
                                  _row("meanflow", "bc", 1, 89.5 + s), _row("meanflow", "reinflow", 1, 97.5),
                                  _row("reflow", "reinflow", 4, 99.0)]} for s in (0, 2)]
    lines, checks = few_step.table({"task": "square", "seeds": seeds})
    assert any(line.startswith("meanflow  bc") and "90.5 +- 1.0" in line for line in lines)
    assert [ok for _, ok in checks] == [True, False]  # 90.5 vs 91.0 passes; 97.5 vs 99 misses by 1.5 points
    _, checks = few_step.table({"task": "hopper", "seeds": seeds})
    assert [ok for _, ok in checks] == [True, True]  # returns: within 2%


@pytest.mark.slow
def test_trial_run_on_hopper(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLOWRL_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(sys, "argv", [
        "few_step.py", "--task", "hopper", "--heads", "reflow", "meanflow", "--pretrain-steps", "4",
        "--distill-steps", "2", "--finetune-env-steps", "32", "--finetune-overrides", "train.num_envs=4",
        "train.rollout_steps=2", "train.minibatch_size=8", "train.backend=cpu", "--episodes", "1",
        "--device", "cpu", "--latency-iters", "20", "--runs", str(tmp_path / "runs"), "--tag", "t"])
    few_step.main()
    record = json.loads((tmp_path / "results" / "few_step" / "few_step_hopper_t.json").read_text())
    methods = {(r["head"], r["method"]) for r in record["seeds"][0]["rows"]}
    assert methods == {("reflow", m) for m in few_step.METHODS} | {("meanflow", "bc"), ("meanflow", "reinflow")}
    assert sorted(record["seeds"][0]["latency"]) == ["1", "2", "4"]
