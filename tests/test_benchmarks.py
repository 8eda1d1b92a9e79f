"""The benchmarks' reports: merging seeds run as separate processes, a PPO row run on its own, a seed
whose final evaluation was cut by a time limit, and manipulation rows imported from a GPU pipeline's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
reinflow_locomotion = pytest.importorskip("reinflow_locomotion")
reinflow_ablation = pytest.importorskip("reinflow_ablation")
import common  # noqa: E402
from common import merge_results  # noqa: E402
from flowrl.errors import FlowrlError  # noqa: E402


def _curve(points: list[tuple[int, float]], per_iteration: int = 81_920) -> list[dict]:
    return [{"iteration": steps // per_iteration, "env_steps": steps, "wall_clock_s": steps / 1e5,
             "return_mean": ret, "return_std": 1.0} for steps, ret in points]


def _seed(seed: int, final: float | None, curve: list[dict]) -> dict:
    rec = {"seed": seed, "pretrained": 2000.0, "curve": curve, "iteration_s": [0.9, 1.0, 1.1]}
    if final is not None:
        rec.update(finetuned=final, finetuned_std=5.0, env_steps=curve[-1]["env_steps"], wall_clock_s=120.0,
                   steps_per_iteration=81_920, backend="MujocoWarpEnv", sim_threads=0)
    return rec


def _write(tmp: Path, name: str, seeds: list[dict], ppo: dict | None = None, sb3: dict | None = None) -> str:
    rec = {"task": "walker2d", "head": "reflow", "device": "cpu", "cores": 2, "seeds": seeds}
    if ppo:
        rec["ppo"] = ppo
    if sb3:
        rec["sb3"] = sb3
    path = tmp / name
    path.write_text(json.dumps(rec))
    return str(path)


def test_a_results_file_names_its_study_folder_commit_and_machine(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from common import provenance, write_result

    monkeypatch.setenv("FLOWRL_RESULTS", str(tmp_path))
    monkeypatch.delenv("FLOWRL_COMMIT", raising=False)
    path = write_result("thing", {"value": 1.5}, "t", "a_study")
    assert path == tmp_path / "a_study" / "thing_t.json"
    rec = json.loads(path.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    assert rec["value"] == 1.5 and rec["provenance"] == provenance()
    assert rec["provenance"]["commit"].split("+")[0] == head and rec["provenance"]["cores"] >= 1
    monkeypatch.setenv("FLOWRL_COMMIT", "abc1234")  # a copy without its history names its commit
    provenance.cache_clear()  # read once per process
    try:
        assert provenance()["commit"] == "abc1234"
    finally:
        provenance.cache_clear()


def test_cut_seed_takes_its_last_curve_point() -> None:
    cut = _seed(2, None, _curve([(0, 1800.0), (5_000_000, 4000.0), (10_076_160, 4756.0)]))
    done = reinflow_locomotion.completed(cut)
    assert done["final_cut"] and done["finetuned"] == 4756.0 and done["env_steps"] == 10_076_160
    assert done["steps_per_iteration"] == 81_920
    finished = _seed(0, 4800.0, _curve([(0, 2000.0), (10_076_160, 4790.0)]))
    assert reinflow_locomotion.completed(finished) is finished


@pytest.fixture(autouse=True)
def _results_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWRL_RESULTS", str(tmp_path / "results"))  # the plots must not land in the repo


def _dense(start: float, final: float, low: float | None = None) -> list[dict]:
    """A curve evaluated every 4 iterations (0.33M env steps) to 10.08M: start, an optional low point at
    0.66M, then a straight rise to ``final``."""
    steps = list(range(0, 10_076_161, 4 * 81_920)) + [10_076_160]
    returns = list(np.linspace(start, final, len(steps)))
    if low is not None:
        returns[2] = low
    return _curve(list(zip(steps, returns)))


def test_report_merges_seeds_and_a_ppo_only_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    full = _dense(2000.0, 4700.0)
    files = [_write(tmp_path, "s0.json", [{**_seed(0, 4800.0, full), "eval_episodes": 20}]),
             _write(tmp_path, "s1.json", [{**_seed(1, 4700.0, full), "eval_episodes": 20}]),
             _write(tmp_path, "s2.json", [{**_seed(2, None, full), "eval_episodes": 20}]),
             _write(tmp_path, "ppo.json", [], ppo={"return": 2500.0, "env_steps": 10_000_000, "wall_clock_s": 900,
                                                   "machine": "2 CPU cores"})]
    sac_row = {"seed": 0, "return": 900.0, "env_steps": 100_000, "target_env_steps": 1_000_000, "wall_clock_s": 60.0,
               "backend": "cpu", "num_envs": 8, "utd": 1.0, "machine": "H200"}
    files.append(_write(tmp_path, "sac0.json", [], sb3={"sac": [sac_row]}))
    files.append(_write(tmp_path, "sac1.json", [], sb3={"sac": [{**sac_row, "seed": 1, "return": 1100.0}]}))
    merged = merge_results(files, also=("ppo",), extend=("sb3",))
    assert [s["seed"] for s in merged["walker2d"]["seeds"]] == [0, 1, 2]
    assert [r["seed"] for r in merged["walker2d"]["sb3"]["sac"]] == [0, 1]
    assert reinflow_locomotion.report(merged) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("walker2d ") and line.split()[1].isdigit()]
    # seed, start, lowest, fraction, where, published, reached at, final (the cut seed's last point, starred)
    assert [r[1:9] for r in rows] == [["0", "2000", "2000", "1.00", "0.00M", "4109", "8.19M", "4800"],
                                      ["1", "2000", "2000", "1.00", "0.00M", "4109", "8.19M", "4700"],
                                      ["2", "2000", "2000", "1.00", "0.00M", "4109", "8.19M", "4700*"]]
    assert "[PASS] walker2d: every run's lowest evaluation >= 90% of its start (lowest 1.00 over 3 runs)" in out
    assert "[PASS] walker2d: mean final 4733 >= ReinFlow's published 4109" in out
    assert "[PASS] walker2d: mean final 4733 >= SB3 PPO from scratch 2500" in out
    baselines = out[out.index("Stable-Baselines3 from scratch"):].splitlines()
    assert any(line.split()[:6] == ["walker2d", "ppo", "2500", "+-", "0", "10000000"] for line in baselines)
    assert any(line.split()[:6] == ["walker2d", "sac", "1000", "+-", "100", "100000"] for line in baselines)


def test_report_fails_a_dip_a_sparse_curve_and_missed_finals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dip = {**_seed(0, 4000.0, _dense(2000.0, 4000.0, low=1500.0)), "eval_episodes": 20}
    merged = merge_results([_write(tmp_path, f"s{i}.json", [{**dip, "seed": i}]) for i in range(3)])
    assert reinflow_locomotion.report(merged) == 1
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("walker2d ") and line.split()[1].isdigit()]
    assert [r[3:6] for r in rows] == [["1500", "0.75", "0.66M"]] * 3
    assert "[FAIL] walker2d: every run's lowest evaluation >= 90% of its start (lowest 0.75 over 3 runs)" in out
    assert "[FAIL] walker2d: mean final 4000 >= ReinFlow's published 4109" in out
    assert "[FAIL] walker2d: no SB3 PPO at 10M env steps to compare with" in out
    sparse = {**_seed(0, 4800.0, _curve([(0, 2000.0), (10_076_160, 4800.0)])), "eval_episodes": 20}
    few = {**_seed(1, 4800.0, _dense(2000.0, 4800.0)), "eval_episodes": 10}
    for seeds in ([sparse], [few]):
        assert reinflow_locomotion.report(merge_results([_write(tmp_path, "one.json", seeds)])) == 1
        out = capsys.readouterr().out
        assert "[FAIL] walker2d: every run's lowest evaluation >= 90% of its start (lowest 1.00 over 1 runs; " \
               "curves need >= 20 episodes every <= 0.4M env steps; 3 seeds needed)" in out


def test_cut_manipulation_seed_carries_its_last_success_rate() -> None:
    curve = [{**p, "success_rate": rate} for p, rate in zip(_curve([(0, 1.0), (16_000, 0.9)], 1600), (1.0, 0.65))]
    done = reinflow_locomotion.completed({"seed": 1, "pretrained": 1.0, "pretrained_success": 0.88, "curve": curve})
    assert done["final_cut"] and done["finetuned_success"] == 0.65 and done["env_steps"] == 16_000


def test_budget_leaves_time_for_the_final_evaluations() -> None:
    from flowrl.errors import FlowrlError

    # 10 min budget, 100 s spent before fine-tuning, a 40 s pretrained evaluation: 600 - 100 - 100 - 60 s
    assert reinflow_locomotion.fine_tuning_minutes(10, 100.0, 40.0) == pytest.approx(340 / 60)
    with pytest.raises(FlowrlError, match="--budget-minutes 3: no time left to fine-tune"):
        reinflow_locomotion.fine_tuning_minutes(3, 100.0, 40.0)


def _ablation_run(variant: str, seed: int, points: list[tuple[int, float]]) -> dict:
    return {"task": "hopper", "variant": variant, "seed": seed, "device": "NVIDIA H200", "curve": _curve(points),
            "wall_clock_s": 100.0}


def test_missing_demonstrations_are_made_once_before_the_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Humanoid's preset names demonstrations the repository does not ship: the study makes them with the
    known command (here a small one), skips them once they exist, and names an unknown missing file."""
    repo = tmp_path / "repo"
    (repo / "configs" / "humanoid").mkdir(parents=True)
    (repo / "configs" / "humanoid" / "pretrain_reflow.yaml").write_text(
        (reinflow_locomotion.REPO / "configs" / "humanoid" / "pretrain_reflow.yaml").read_text())
    (repo / "data").mkdir()
    (repo / "data" / "experts").symlink_to(reinflow_locomotion.REPO / "data" / "experts", target_is_directory=True)
    command = [a if a != "100" else "2" for a in reinflow_locomotion.MADE_DEMONSTRATIONS["data/humanoid-medium.hdf5"]]
    monkeypatch.setattr(reinflow_locomotion, "REPO", repo)
    monkeypatch.setattr(common, "REPO", repo)  # where in_repo resolves the presets' data paths
    monkeypatch.setattr(reinflow_locomotion, "MADE_DEMONSTRATIONS", {"data/humanoid-medium.hdf5": command})
    reinflow_locomotion.make_demonstrations(["humanoid"], "reflow")
    made = repo / "data" / "humanoid-medium.hdf5"
    assert made.is_file()
    assert "made data/humanoid-medium.hdf5" in capsys.readouterr().out
    stamp = made.stat().st_mtime_ns
    reinflow_locomotion.make_demonstrations(["humanoid"], "reflow")
    assert made.stat().st_mtime_ns == stamp
    monkeypatch.setattr(reinflow_locomotion, "MADE_DEMONSTRATIONS", {})
    made.unlink()
    with pytest.raises(FlowrlError, match="humanoid-medium.hdf5 are missing"):
        reinflow_locomotion.make_demonstrations(["humanoid"], "reflow")


def test_ablation_scores_the_collapse_the_time_to_the_reference_and_the_final_return() -> None:
    summary = reinflow_ablation.curve_summary("hopper", _curve([(0, 1600.0), (655_360, 800.0), (4_915_200, 3210.0),
                                                                (10_076_160, 3300.0)]))
    assert summary["min_fraction"] == 0.5 and summary["min_at"] == 655_360
    assert summary["reached_at"] == 4_915_200 and summary["final"] == 3300.0 and summary["start"] == 1600.0
    never = reinflow_ablation.curve_summary("hopper", _curve([(0, 1600.0), (81_920, 3100.0)]))
    assert never["reached_at"] is None and never["min_fraction"] == 1.0


def test_ablation_report_checks_only_the_final_variant_with_three_full_seeds(capsys: pytest.CaptureFixture) -> None:
    good = [(0, 1600.0), (1_638_400, 1500.0), (4_915_200, 3250.0), (10_076_160, 3450.0)]
    collapsing = [(0, 1600.0), (655_360, 700.0), (7_000_000, 3200.0), (10_076_160, 3300.0)]
    runs = [_ablation_run("flow_sde", s, good) for s in range(3)] + [_ablation_run("base", s, collapsing)
                                                                    for s in range(3)]
    assert reinflow_ablation.report(runs, "flow_sde") == 0
    out = capsys.readouterr().out
    assert "[PASS] hopper flow_sde: lowest evaluation >= 90% of the start (worst 0.94)" in out
    assert "[PASS] hopper flow_sde: 3200 within 5M env steps (4.9M,4.9M,4.9M)" in out
    assert reinflow_ablation.report(runs, "base") == 1
    out = capsys.readouterr().out
    assert "[FAIL] hopper base: lowest evaluation >= 90% of the start (worst 0.44)" in out
    assert "[FAIL] hopper base: final >= 3400 (3300)" in out
    assert reinflow_ablation.report(runs[:2], "flow_sde") == 0  # two seeds: reported, not checked
    assert "[PASS]" not in capsys.readouterr().out


def test_ablation_report_ranks_the_diagnostics_that_predict_the_collapse(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """Evaluations paired with the diagnostics of the iteration before them: a drift that grows exactly as the
    return falls correlates -1 with the return's fraction of the start; a flat noise level gives no number."""
    steps = 81_920
    runs = []
    for seed, fractions in enumerate(([0.9, 0.6, 0.4, 0.7], [0.95, 0.8, 0.5, 0.85])):
        curve = [(0, 1000.0)] + [((4 * (i + 1)) * steps, 1000.0 * f) for i, f in enumerate(fractions)]
        run = _ablation_run("base", seed, curve)
        run["diagnostics"] = [{"iteration": it, "env_steps": (it + 1) * steps, "train/action_drift": None,
                               "train/noise_std": 0.2} for it in range(16)]
        for i, f in enumerate(fractions):  # the row of the iteration that ends where the evaluation is
            run["diagnostics"][4 * (i + 1) - 1]["train/action_drift"] = 1.0 - f + 0.01 * seed
        runs.append(run)
    predictors = {key: (rho, n) for key, rho, n in reinflow_ablation.dip_predictors(runs)}
    assert predictors["train/action_drift"][0] == pytest.approx(-1.0) and predictors["train/action_drift"][1] == 8
    assert np.isnan(predictors["train/noise_std"][0])
    reinflow_ablation.report(runs, "", str(tmp_path))
    out = capsys.readouterr().out
    assert "what predicts the collapse (2 runs)" in out and (tmp_path / "reinflow_diagnostics_hopper.png").stat().st_size


def test_ablation_report_tells_rollout_layouts_apart_and_shows_the_actors_first_updates(
        capsys: pytest.CaptureFixture) -> None:
    """One variant in two layouts is two rows; a run's first updating iterations are summarised by the critic's
    explained variance when the actor starts, their mean KL and the drift after them."""
    steps = 81_920
    runs = []
    for layout, ev in ((["train.num_envs=2048", "train.rollout_steps=10"], -15.0), ([], 0.4)):
        run = _ablation_run("base", 11, [(0, 1000.0), (4 * steps, 500.0 if ev < 0 else 1000.0)])
        run["overrides"] = ["train.sim_threads=2", *layout]
        run["diagnostics"] = [{"iteration": it, "env_steps": (it + 1) * steps, "train/critic_warmup": float(it < 2),
                               "train/explained_variance": ev + it, "train/approx_kl": None if it < 2 else 1e-4 * it,
                               "train/action_drift": 0.0 if it < 2 else 0.01 * it} for it in range(6)]
        runs.append(run)
    assert [reinflow_ablation.layout(r) for r in runs] == ["2048x10", "preset"]
    assert reinflow_ablation.layout({"overrides": ["train.rollout_steps=10", "train.rollout_steps=40"]}) == "presetx40"
    first = reinflow_ablation.first_updates(runs[0])
    assert first == {"ev_at_start": -13.0, "kl": pytest.approx(3e-4), "drift": pytest.approx(0.04)}
    reinflow_ablation.report(runs, "")
    out = capsys.readouterr().out
    assert "base 2048x10" in out and "base preset" in out
    assert "EV  -13.00  KL 3.0e-04  drift 0.040  min/start 0.50" in out



def test_ablation_report_keeps_runs_of_one_variant_with_other_settings_apart(capsys: pytest.CaptureFixture) -> None:
    """Runs of one variant and seed with other training settings are rows of their own, not seeds of one row;
    how a run ran (budget, threads, backend) and the variant's own overrides do not split rows."""
    steps = 81_920
    runs = []
    for extra in ([], ["train.actor_lr=1e-3"], ["train.max_minutes=12", "threads=1"]):
        run = _ablation_run("last_step", 12, [(0, 1000.0), (4 * steps, 900.0)])
        run["overrides"] = ["train.exploration=last_step", *extra]
        runs.append(run)
    assert [reinflow_ablation.row_label(r) for r in runs] == [
        "last_step preset", "last_step preset actor_lr=1e-3", "last_step preset"]
    reinflow_ablation.report(runs, "")
    out = capsys.readouterr().out.splitlines()
    labels = ("last_step preset actor_lr=1e-3", "last_step preset")  # longest first: one label per line
    seeds = {}
    for line in out:
        label = next((x for x in labels if line.startswith(x + " ")), None)
        if label:
            seeds[label] = line[len(label):].split()[0]
    assert seeds == {"last_step preset actor_lr=1e-3": "1", "last_step preset": "2"}

def _manipulation_run(folder: Path, run: str, seed: int, start: float, final: float, robosuite: dict[str, float],
                      best_step: int = 0) -> None:
    """The files a GPU pipeline brings back for one fine-tuning run (see --import-runs)."""
    step = 409_600
    (folder / f"{run}_config.yaml").write_text(f"seed: {seed}\ntrain:\n  eval_episodes: 128\n  max_minutes: 3\n")
    (folder / f"{run}_eval.json").write_text(json.dumps({"evaluations": [{"step": step, "results": [
        {"k": 4, "episodes": 256, "success_rate": final, "length_mean": 180.0}]}]}))
    (folder / f"{run}_loop.json").write_text(json.dumps({
        "iteration": 4, "wall_clock": 95.7, "best_step": best_step, "eval_history": [
            {"iteration": 0, "env_steps": 0, "success_rate": start},
            {"iteration": 4, "env_steps": step, "success_rate": final}]}))
    for checkpoint, rate in robosuite.items():
        name = (f"robosuite_eval_{run.replace('ft_', 'bc_', 1)}.json" if checkpoint == "cloned" else
                f"robosuite_eval_{run}_{step if checkpoint == 'last' else checkpoint}.json")
        (folder / name).write_text(json.dumps(
            {"results": [{"k": 4, "episodes": 100, "success_rate": rate, "length_mean": 185.0}]}))


def test_import_runs_makes_rows_from_a_pipelines_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reinflow_manipulation = pytest.importorskip("reinflow_manipulation")
    runs = tmp_path / "pipeline"
    runs.mkdir()
    (runs / "gpu.txt").write_text("NVIDIA H200, 143771 MiB\n")
    _manipulation_run(runs, "ft_square0_pixels", 0, 0.95, 0.977, {"last": 0.93})
    _manipulation_run(runs, "ft_square1_pixels", 1, 0.98, 0.961, {"last": 0.91, "best": 0.94})
    _manipulation_run(runs, "ft_square2_pixels", 2, 0.98, 0.988, {"last": 0.90, "best": 0.97}, best_step=307_200)
    _manipulation_run(runs, "ft_can0", 0, 1.0, 1.0, {"last": 0.99, "cloned": 0.97})
    assert reinflow_manipulation.import_runs([str(runs)], "t", "abc1234") == 1  # Can: one seed, 99% < 100%
    out = capsys.readouterr().out
    assert "[PASS] square fine-tuned success in robosuite >= 90% over 3 seeds (91.3%, 3 seed(s))" in out
    assert "[FAIL] can fine-tuned success in robosuite >= 100% over 3 seeds (99.0%, 1 seed(s))" in out
    assert "- -> 93%, 94% -> 91%, - -> 90%" in out  # best = the starting policy only for seed 1
    assert "in robosuite: -, -, 97%" in out  # seed 2's best was a later iteration
    rec = json.loads((tmp_path / "results" / "pixels" / "reinflow_manip_square_t_pixels.json").read_text())
    assert rec["pixels"] and rec["device"] == "NVIDIA H200" and [s["seed"] for s in rec["seeds"]] == [0, 1, 2]
    assert rec["provenance"]["commit"] == "abc1234" and rec["provenance"]["gpu"] == "NVIDIA H200"
    assert rec["provenance"]["imported"]["cores"] >= 1  # where the import ran, beside where the runs did
    first = rec["seeds"][0]
    assert (first["pretrained_success"], first["finetuned_success"], first["finetuned_success_robosuite"]) == (
        0.95, 0.977, 0.93)
    assert (first["env_steps"], first["iterations"], first["pretrained_episodes"], first["max_minutes"]) == (
        409_600, 4, 128, 3)
    can = json.loads((tmp_path / "results" / "manipulation" / "reinflow_manip_can_t.json").read_text())
    assert can["pixels"] is False
    assert can["seeds"][0]["pretrained_success_robosuite"] == 0.97  # the cloned checkpoint's own evaluation


def test_import_runs_refuses_files_it_cannot_trust(tmp_path: Path) -> None:
    reinflow_manipulation = pytest.importorskip("reinflow_manipulation")
    from flowrl.errors import FlowrlError

    with pytest.raises(FlowrlError, match="needs --tag"):
        reinflow_manipulation.import_runs([str(tmp_path)], "")
    with pytest.raises(FlowrlError, match="no ft_<task><seed>"):
        reinflow_manipulation.import_runs([str(tmp_path)], "t")
    _manipulation_run(tmp_path, "ft_can1", 2, 0.3, 0.9, {})
    with pytest.raises(FlowrlError, match="ft_can1_config.yaml: seed 2, but the file name says 1"):
        reinflow_manipulation.import_runs([str(tmp_path)], "t")
    _manipulation_run(tmp_path, "ft_can1", 1, 0.3, 0.9, {})
    loop = json.loads((tmp_path / "ft_can1_loop.json").read_text())
    (tmp_path / "ft_can1_loop.json").write_text(json.dumps({**loop, "eval_history": loop["eval_history"][1:]}))
    with pytest.raises(FlowrlError, match="no evaluation of the starting policy"):
        reinflow_manipulation.import_runs([str(tmp_path)], "t")
    (tmp_path / "ft_can1_eval.json").write_text(json.dumps({"evaluations": []}))
    with pytest.raises(FlowrlError, match="ft_can1_.*not the files of a fine-tuning run"):
        reinflow_manipulation.import_runs([str(tmp_path)], "t")


def test_mle_report_combines_the_parts_of_a_seed_run_separately(capsys: pytest.CaptureFixture) -> None:
    mle_finetune = pytest.importorskip("mle_finetune")

    def point(score: float) -> dict:
        return {"score": score, "held_out_mse": 0.01}

    def part(seed: int, pretrained: float, **methods: dict) -> dict:
        return {"seed": seed, "pretrained": {"1": point(pretrained), "2": point(pretrained)}, **methods}

    parts = [part(s, 0.5, ft={"1": point(0.6 + s / 100), "2": point(0.7)}) for s in range(3)]
    parts += [part(s, 0.9, resft={"1": point(0.1)}) for s in range(3)]  # later parts keep the first pretrained
    parts += [part(s, 0.5, resft={"2": point(0.2)}) for s in range(3)]
    seeds = mle_finetune.combine_seeds(parts)
    assert [s["seed"] for s in seeds] == [0, 1, 2]
    assert all(sorted(s["resft"]) == ["1", "2"] and sorted(s["ft"]) == ["1", "2"] for s in seeds)
    assert all(s["pretrained"]["1"]["score"] == 0.5 for s in seeds)
    code = mle_finetune.report({"hopper": {"task": "hopper", "seeds": parts}})
    out = capsys.readouterr().out
    assert "3 seed(s)" in out and code == 0  # FT at K=1 (+0.11 ± 0.008) and K=2 (+0.2 ± 0) beat the spread


def test_sb3_report_groups_rows_by_setting_and_compares_reinflow_at_equal_steps(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sb3 = pytest.importorskip("sb3_baselines")

    def row(seed: int, ret: float, steps: int, envs: int, **extra) -> dict:
        return {"seed": seed, "return": ret, "return_std": 1.0, "env_steps": steps, "wall_clock_s": 100.0,
                "backend": "cpu", "device": "cpu", "num_envs": envs, "n_steps": 64, **extra}

    legacy = {"task": "hopper", "head": "reflow", "seeds": [],  # reinflow_locomotion.py --ppo-only's record
              "ppo": {"return": 2000.0, "env_steps": 10_000_000, "wall_clock_s": 300.0, "machine": "2 CPU cores"}}
    old = {"task": "hopper", "machine": "2 CPU cores", "command": "sb3_baselines.py --tasks hopper",
           "rows": {"ppo": [row(1, 3000.0, 10_002_432, 64)]}}
    for r in old["rows"]["ppo"]:
        del r["n_steps"]  # recorded only since; the command's default applies
    new = {"task": "hopper", "machine": "NVIDIA H200",
           "rows": {"ppo": [row(2, 2800.0, 10_002_432, 64, target_env_steps=10_000_000),
                            row(0, 2900.0, 30_015_488, 1024, target_env_steps=30_000_000)],
                    "sac": [{**row(0, 1500.0, 120_000, 8, target_env_steps=300_000, stopped_by_time_limit=True),
                             "utd": 1.0}]}}
    del new["rows"]["sac"][0]["n_steps"]
    reinflow = [{"seed": s, "finetuned": f, "env_steps": n}
                for s, f, n in [(0, 3100.0, 10_076_160), (1, 3300.0, 10_076_160), (0, 3400.0, 30_064_640)]]
    reinflow.append({"seed": 2})  # a seed cut before its final evaluation
    (sb3.results_dir("locomotion") / "reinflow_hopper_t.json").write_text(json.dumps({"task": "hopper",
                                                                                      "seeds": reinflow}))
    paths = []
    for i, rec in enumerate([legacy, old, new]):
        paths.append(str(tmp_path / f"sb3_hopper_{i}.json"))
        Path(paths[-1]).write_text(json.dumps(rec))
    merged = sb3.merge(paths)
    assert [r["seed"] for r in merged["hopper"]["rows"]["ppo"]] == [0, 1, 2, 0]
    (tmp_path / "bad.json").write_text(json.dumps({"task": "hopper", "seeds": []}))
    with pytest.raises(FlowrlError, match="bad.json: not a baselines record"):
        sb3.merge([*paths, str(tmp_path / "bad.json")])
    assert sb3.report(merged) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("hopper")]
    assert len(lines) == 3  # 10M at 64x64 (3 seeds over three records), 30M at 1024x64, SAC
    assert lines[0][2:5] == ["2600", "+-", "432"] and lines[0][6:9] == ["64x64", "cpu", "3"]
    assert lines[0][9] == "3200"
    assert " ".join(lines[0][12:]) == "100-300s 2 CPU cores, NVIDIA H200"
    assert lines[1][6] == "1024x64" and lines[1][9] == "3400"  # ReinFlow at each line's own budget
    assert lines[2][1] == "sac" and lines[2][5] == "120000" and lines[2][-2:] == ["(time", "limit)"]


def test_sb3_run_stops_at_its_time_limit_and_still_evaluates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    sb3 = pytest.importorskip("sb3_baselines")
    pytest.importorskip("stable_baselines3")
    monkeypatch.setenv("FLOWRL_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["sb3_baselines.py", "--tasks", "hopper", "--algos", "ppo", "--seeds", "3",
                                      "--backend", "cpu", "--device", "cpu", "--ppo-num-envs", "4",
                                      "--ppo-n-steps", "16", "--episodes", "2", "--threads", "1",
                                      "--max-minutes", "0.05"])
    assert sb3.main() == 0
    (path,) = (tmp_path / "baselines").glob("sb3_hopper*.json")
    (row,) = json.loads(path.read_text())["rows"]["ppo"]
    assert row["stopped_by_time_limit"] and 0 < row["env_steps"] < row["target_env_steps"] == 30_000_000
    assert row["seed"] == 3 and row["wall_clock_s"] < 30 and row["machine"]
    assert "(time limit)" in capsys.readouterr().out
    with pytest.raises(FlowrlError, match="no option"):
        sb3.settings(ppo_stepz=1)
    with pytest.raises(FlowrlError, match="must be positive"):
        sb3.settings(episodes=0)


def test_reinflow_benchmark_runs_its_sb3_baselines_and_reports_them(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("stable_baselines3")
    monkeypatch.setattr(sys, "argv", ["reinflow_locomotion.py", "--tasks", "hopper", "--seeds", "4",
                                      "--baselines", "ppo", "--baselines-only", "--env-steps", "256",
                                      "--episodes", "2", "--device", "cpu", "--sim-threads", "1"])
    assert reinflow_locomotion.main() == 0
    (row,) = json.loads((Path(os.environ["FLOWRL_RESULTS"]) / "locomotion" / "reinflow_hopper.json").read_text()
                        )["sb3"]["ppo"]
    assert row["seed"] == 4 and row["target_env_steps"] == 256 and row["env_steps"] == 64 * 64  # one rollout
    assert row["backend"] == "cpu" and row["machine"]
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["hopper", "ppo"] for line in out[out.index("Stable-Baselines3"):].splitlines())
    monkeypatch.setattr(sys, "argv", ["reinflow_locomotion.py", "--tasks", "lift", "--baselines", "sac"])
    with pytest.raises(FlowrlError, match=r"no SB3 baseline for \['lift'\]"):
        reinflow_locomotion.main()


def test_bc_benchmark_runs_and_writes_its_one_step_record(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    bc_locomotion = pytest.importorskip("bc_locomotion")
    monkeypatch.setattr(sys, "argv", ["bc_locomotion.py", "--task", "hopper", "--steps", "10", "--episodes", "1",
                                      "--device", "cpu", "--out", str(tmp_path / "runs"), "--tag", "t"])
    bc_locomotion.main()  # its targets are not met after 10 steps; the record is written either way
    rec = json.loads((Path(os.environ["FLOWRL_RESULTS"]) / "one_step" / "bc_hopper_t.json").read_text())
    assert sorted(rec["results"]) == ["reflow", "shortcut"] and rec["steps"] == 10 and rec["provenance"]["commit"]
    runs = [run for head in rec["results"].values() for run in head]
    assert len(runs) == 2 and all(sorted(run["returns"], key=int) == ["1", "2", "4", "8"] for run in runs)
    assert "shortcut K=1 within 10% of K=4" in capsys.readouterr().out


def test_reinflow_benchmark_records_the_first_iterations_diagnostics(tmp_path: Path) -> None:
    """--diagnostics N: the first N iterations' action drift, explained variance, sign flips, noise and KL."""
    import reinflow_locomotion

    from flowrl.agents.bc import BehaviorCloning
    from flowrl.agents.reinflow import ReinFlow
    from flowrl.agents.scripted import write_demonstrations
    from flowrl.config import load_stage_config
    from flowrl.training import Trainer

    write_demonstrations(str(tmp_path / "demos.hdf5"), episodes=16, seed=0)
    bc = Trainer(BehaviorCloning(load_stage_config("pretrain", None, [
        "task=PointReach", f"data.path={tmp_path / 'demos.hdf5'}", "device=cpu", "policy.hidden_dim=16",
        "policy.depth=1", "policy.horizon=2", "policy.act_steps=2", "train.steps=20", "train.eval_every=0"])),
        tmp_path / "bc", progress=False)
    bc.fit()
    agent = ReinFlow(load_stage_config("finetune", None, [
        f"init={bc.run.checkpoint_dir(20)}", "device=cpu", "train.num_envs=16", "train.rollout_steps=4",
        "train.minibatch_size=32", "train.critic_warmup_iterations=1", "train.env_steps=640"]))
    record: dict = {}
    reinflow_locomotion.record_diagnostics(agent, record, 3)
    for i in range(5):
        agent.train_iteration(i)
    rows = record["diagnostics"]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[2]["env_steps"] == 3 * 128
    assert rows[0]["train/action_drift"] == 0.0 and rows[0]["train/critic_warmup"] == 1.0
    assert rows[2]["train/action_drift"] > 0 and 0 <= rows[2]["train/advantage_sign_flips"] <= 1
    agent.close()


def test_a_jobs_study_runs_each_task_and_seed_with_the_same_options_and_reports_failures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    argv = ["--tasks", "hopper", "ant", "--seeds", "11", "12", "--jobs", "4", "--tag", "gpu", "--eval-every", "4",
            "--eval-episodes", "20", "--pretrained", "runs/bc/{task}-s{seed}", "--pretrain-set", "policy.k=2",
            "--budget-minutes", "8", "train.backend=warp", "train.num_envs=512"]
    args = reinflow_locomotion.parser().parse_intermixed_args(argv)
    child = reinflow_locomotion.child_command(args, "ant", 12, "gpu_s12")
    again = reinflow_locomotion.parser().parse_intermixed_args(child[2:])
    assert (again.tasks, again.seeds, again.tag, again.jobs, again.shared_by) == (["ant"], [12], "gpu_s12", 1, 4)
    same = ("head", "episodes", "eval_every", "eval_episodes", "device", "runs", "sim_threads", "diagnostics",
            "budget_minutes", "env_steps", "pretrain_steps", "pretrained", "pretrain_set", "overrides")
    assert all(getattr(again, k) == getattr(args, k) for k in same)

    def fake(args, task, seed, tag):  # a run that writes its record, and one that crashes
        if task == "ant":
            return [sys.executable, "-c", "raise SystemExit(3)"]
        record = {"task": task, "head": "reflow", "device": "cpu", "cores": 2,
                  "seeds": [{**_seed(seed, 3300.0, _dense(1600.0, 3300.0)), "eval_episodes": 20}]}
        out = Path(os.environ["FLOWRL_RESULTS"]) / "locomotion" / f"reinflow_{task}_{tag}.json"
        return [sys.executable, "-c", f"import json, pathlib; pathlib.Path({str(out)!r}).write_text({json.dumps(json.dumps(record))})"]

    monkeypatch.setattr(reinflow_locomotion, "child_command", fake)
    assert reinflow_locomotion.run_parallel(args) == 2
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines() if line.startswith("hopper ") and line.split()[1].isdigit()]
    assert [r[1] for r in rows] == ["11", "12"]
    assert "error: ant seed 11 (exit 3" in captured.err and "error: ant seed 12 (exit 3" in captured.err


def test_transport_parity_groups_paired_outcomes_by_robosuites_hammer(capsys: pytest.CaptureFixture) -> None:
    parity = pytest.importorskip("manipulation_parity")
    from flowrl.envs import resolve_task

    task = resolve_task("robosuite/TwoArmTransport")
    heads = [task.robosuite_head_halfsize(1000 + i) for i in range(40)]
    ours = "".join("1" if h < 0.016 else "0" for h in heads)  # ours succeeds exactly on robosuite's small heads
    rows = parity.by_head_size("TwoArmTransport", 1000, ours, "1" * 40)
    assert sum(r["episodes"] for r in rows) == 40
    small = [r for r in rows if r["head_from"] == 0.015]
    assert small and small[0]["cpu"] == 1.0 and all(r["cpu"] == 0.0 for r in rows if r["head_from"] > 0.015)
    assert all(r["robosuite"] == 1.0 for r in rows)
    assert "by the episode's hammer head half-size" in capsys.readouterr().out


def test_evaluation_check_finds_the_cpu_backend_deterministic_and_flags_a_row_apart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint's episodes on 1 thread and on every core agree bit for bit (exit 0, every episode in the
    results file); a row whose mean lies many standard errors away, or a CPU row that differs, is a FAIL."""
    evaluation_check = pytest.importorskip("evaluation_check")
    from flowrl.checkpoint import save_checkpoint
    from flowrl.config import PolicyConfig
    from flowrl.policy import FlowPolicy

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck", FlowPolicy(PolicyConfig(hidden_dim=16, depth=1), 11, 3), {"task": "Hopper"})
    monkeypatch.setenv("FLOWRL_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(sys, "argv", ["evaluation_check.py", str(tmp_path / "ck"), "--episodes", "3", "--k", "1"])
    assert evaluation_check.main() == 0
    record = json.loads((tmp_path / "results" / "evaluation" / "evaluation_check.json").read_text())
    rows = record["rows"]
    assert [r["threads"] for r in rows[:2]] == [1, 0] and len(rows[0]["episode_returns"]) == 3
    assert rows[0]["episode_returns"] == rows[1]["episode_returns"]
    apart = {**rows[1], "policy_device": "cuda", "return_mean": rows[0]["return_mean"] + 1e6}
    changed = {**rows[1], "episode_returns": [x + 1.0 for x in rows[1]["episode_returns"]]}
    verdicts = [ok for _, ok in evaluation_check.checks([rows[0], changed, apart])]
    assert verdicts == [False, False]
