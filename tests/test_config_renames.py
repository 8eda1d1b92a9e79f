"""One name per meaning: K is `k` (policy.k, eval.k, train.k, --k), `steps` a gradient-step budget,
`env_steps` an env-step one. The old names (policy.num_steps, eval.steps, ReinFlow's and MLE's
train.num_steps; eval's and expert's --steps) are still read, each with one warning naming the new
name; checkpoints and exports written under the old names still load."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from flowrl.checkpoint import load_policy, save_checkpoint
from flowrl.cli import _parser, _renamed_flags, main
from flowrl.config import PolicyConfig, RenamedWarning, load_stage_config
from flowrl.errors import FlowrlError
from flowrl.policy import FlowPolicy


def _load(stage: str, presets: list, overrides: list[str]) -> tuple[object, list[str]]:
    """The config and the messages of every RenamedWarning its loading raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_stage_config(stage, presets, overrides, for_run=False)
    return cfg, [str(w.message) for w in caught if issubclass(w.category, RenamedWarning)]


@pytest.fixture()
def old_pretrain_preset(tmp_path: Path, hopper_dataset: Path) -> Path:
    path = tmp_path / "old.yaml"
    path.write_text(f"task: Hopper\ndata:\n  path: {hopper_dataset}\npolicy:\n  num_steps: 2\neval:\n  steps: [1, 3]\n")
    return path


def test_old_keys_read_as_new_with_one_warning_each(old_pretrain_preset: Path) -> None:
    cfg, notes = _load("pretrain", [old_pretrain_preset], [])
    assert cfg.policy.k == 2 and cfg.eval.k == [1, 3]
    assert notes == ["config: policy.num_steps is now policy.k", "config: eval.steps is now eval.k"]
    # the same old key in the preset and again in an override: still one warning, the override wins
    cfg, notes = _load("pretrain", [old_pretrain_preset], ["policy.num_steps=8"])
    assert cfg.policy.k == 8 and notes.count("config: policy.num_steps is now policy.k") == 1


@pytest.mark.parametrize("algo", ["reinflow", "mle"])
def test_train_num_steps_is_k_of_reinflow_and_mle(algo: str) -> None:
    cfg, notes = _load("finetune", [], [f"algo={algo}", "train.num_steps=3", "eval.steps=[3]"])
    assert cfg.train.k == 3 and cfg.eval.k == [3] and not hasattr(cfg.train, "num_steps")
    assert sorted(notes) == ["config: eval.steps is now eval.k", "config: train.num_steps is now train.k"]


def test_new_keys_load_without_warnings(hopper_dataset: Path) -> None:
    cfg, notes = _load("pretrain", [], ["task=Hopper", f"data.path={hopper_dataset}", "policy.k=2", "eval.k=[2]"])
    assert (cfg.policy.k, cfg.eval.k, notes) == (2, [2], [])
    cfg, notes = _load("finetune", [], ["algo=mle", "train.k=4", "train.steps=10"])
    assert (cfg.train.k, cfg.train.steps, notes) == (4, 10, [])
    cfg, notes = _load("finetune", [], ["train.k=2", "train.env_steps=100"])
    assert (cfg.train.k, cfg.train.env_steps, notes) == (2, 100, [])


def test_old_and_new_name_together_is_an_error(old_pretrain_preset: Path) -> None:
    with pytest.raises(FlowrlError, match="config: policy.num_steps: is the old name of policy.k, which is also "
                                          "given; keep only policy.k"):
        _load("pretrain", [old_pretrain_preset], ["policy.k=3", "policy.num_steps=3"])


def test_behaviour_cloning_has_no_train_k(hopper_dataset: Path) -> None:
    """train.num_steps was never a key of BC: it stays an unknown key, named as written."""
    with pytest.raises(FlowrlError, match="train.num_steps.*not in 'BCConfig'"):
        _load("pretrain", [], ["task=Hopper", f"data.path={hopper_dataset}", "train.num_steps=2"])


def test_cli_prints_one_note_per_old_key(capsys, old_pretrain_preset: Path) -> None:
    code = main(["config", "show", str(old_pretrain_preset), "policy.num_steps=4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.splitlines() == ["flowrl: note: config: policy.num_steps is now policy.k",
                                "flowrl: note: config: eval.steps is now eval.k"]
    assert "  k: 4\n" in out and "num_steps" not in out


@pytest.mark.parametrize("argv,dest,value,note", [
    (["eval", "run", "--steps", "1", "2"], "k", [1, 2], "eval: --steps is now --k"),
    (["expert", "Hopper", "--steps", "5000"], "env_steps", 5000, "expert: --steps is now --env-steps"),
])
def test_old_flags_read_as_new_with_one_warning(argv: list[str], dest: str, value, note: str) -> None:
    args = _parser().parse_args(argv)
    with pytest.warns(RenamedWarning) as caught:
        _renamed_flags(args)
    assert [str(w.message) for w in caught] == [note] and getattr(args, dest) == value and args.steps is None


def test_cli_old_flag_note_then_its_error(capsys, tmp_path: Path) -> None:
    code = main(["eval", str(tmp_path / "missing"), "--steps", "1"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err == ["flowrl: note: eval: --steps is now --k",
                                 f"flowrl: error: checkpoint not found: {tmp_path / 'missing'}"]


def test_checkpoint_of_an_older_flowrl_loads(tmp_path: Path) -> None:
    """config.json written before the rename ("num_steps" in its policy and run config) loads, silently."""
    folder = save_checkpoint(tmp_path / "ck", FlowPolicy(PolicyConfig(k=3, hidden_dim=8, depth=1), 11, 3),
                             {"task": "Hopper", "run_config": {"policy": {"k": 3}, "eval": {"k": [1, 3]}}})
    config = json.loads((folder / "config.json").read_text())
    config["policy"]["num_steps"] = config["policy"].pop("k")
    config["run_config"] = {"policy": {"num_steps": 3}, "eval": {"steps": [1, 3]}}
    (folder / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a record is not something the user wrote: no warning
        policy, loaded = load_policy(folder)
    assert policy.cfg.k == 3 and loaded["task"] == "Hopper"
    from flowrl.describe import describe_checkpoint

    assert describe_checkpoint(folder)["policy"]["k"] == 3


def test_checkpoint_with_both_names_is_one_line(tmp_path: Path) -> None:
    policy = FlowPolicy(PolicyConfig(hidden_dim=8, depth=1), 11, 3)
    folder = save_checkpoint(tmp_path / "ck", policy, {"task": "Hopper"})
    config = json.loads((folder / "config.json").read_text())
    config["policy"]["num_steps"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FlowrlError, match=r"config.json: config: policy.num_steps: is the old name of policy.k"):
        load_policy(folder)


def test_export_description_of_an_older_flowrl_reads(tmp_path: Path) -> None:
    from flowrl.deploy.meta import META_FORMAT, read_metadata

    meta = {"format": "flowrl.export/1", "obs_dim": 3, "act_dim": 1, "num_steps": 2, "horizon": 4, "act_steps": 2,
            "obs_history": 1}
    (tmp_path / "old.onnx.json").write_text(json.dumps(meta))
    assert read_metadata(tmp_path / "old.onnx")["k"] == 2
    (tmp_path / "new.onnx.json").write_text(json.dumps({**meta, "format": META_FORMAT}))
    with pytest.raises(FlowrlError, match="'k' must be a positive integer, got None"):
        read_metadata(tmp_path / "new.onnx")  # the current format has no num_steps


def test_resume_of_a_run_written_under_the_old_names(tmp_path: Path, hopper_dataset: Path) -> None:
    """--resume compares the config with the run's config.yaml: the old names there are the new ones."""
    import yaml

    from flowrl.config import to_dict
    from flowrl.run import RunFolder

    cfg, _ = _load("pretrain", [], ["task=Hopper", f"data.path={hopper_dataset}", "policy.k=2"])
    written = to_dict(cfg)
    written["policy"]["num_steps"] = written["policy"].pop("k")
    written["eval"]["steps"] = written["eval"].pop("k")
    del written["train"]["cuda_graph"], written["train"]["tf32"]  # options newer than the run: their defaults
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(written))
    assert RunFolder(tmp_path).start(cfg, resume=True) is False  # same config, nothing to resume from yet
    cfg.train.tf32 = False  # a newer option set otherwise than its default differs from what the run had
    with pytest.raises(FlowrlError, match=r"config key 'train.tf32' differs"):
        RunFolder(tmp_path).start(cfg, resume=True)
    cfg.train.tf32 = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(written))
    written["policy"]["num_steps"] = 8
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(written))
    with pytest.raises(FlowrlError, match=r"config key 'policy.k' differs from the run's config.yaml \(8 there, 2 now"):
        RunFolder(tmp_path).start(cfg, resume=True)


def test_a_flag_and_its_old_name_together_are_one_error(capsys: pytest.CaptureFixture[str]) -> None:
    from flowrl.cli import main

    assert main(["eval", "/nonexistent-run", "--k", "4", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flowrl: error: eval: --k and its old name --steps given together; keep --k"]


def _renamed(call) -> tuple[object, list[warnings.WarningMessage]]:
    """What ``call()`` returns and the RenamedWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [w for w in caught if issubclass(w.category, RenamedWarning)]


def test_predict_reads_num_steps_as_k_with_one_warning() -> None:
    """K is ``k`` in the Python API too; ``num_steps=`` still works for a while, warned about at the
    caller's line."""
    import torch

    policy = FlowPolicy(PolicyConfig(hidden_dim=16, depth=1, horizon=2, act_steps=1, k=8), obs_dim=3, act_dim=2)
    obs, noise = torch.randn(4, 3), torch.randn(4, 2, 2)
    new, caught = _renamed(lambda: policy.predict(obs, k=2, noise=noise))
    assert caught == []
    old, caught = _renamed(lambda: policy.predict(obs, num_steps=2, noise=noise))
    assert torch.equal(old, new) and not torch.equal(old, policy.predict(obs, noise=noise))  # K = 2, not 8
    assert [str(w.message) for w in caught] == ["FlowPolicy.predict: num_steps is now k"]
    assert caught[0].filename == __file__
    with pytest.raises(FlowrlError, match="FlowPolicy.predict: num_steps is the old name of k; give only k"):
        policy.predict(obs, k=2, num_steps=2)
    sampled, caught = _renamed(lambda: policy.sample(obs.unsqueeze(1), num_steps=2, noise=noise))
    assert torch.equal(sampled, policy.sample(obs.unsqueeze(1), 2, noise))
    assert [str(w.message) for w in caught] == ["FlowPolicy.sample: num_steps is now k"]


def test_every_entry_point_taking_k_refuses_both_names(tmp_path: Path) -> None:
    """Each public function that takes K names both keywords when given both, before doing any work."""
    from flowrl.deploy import load
    from flowrl.deploy.export import export
    from flowrl.evaluation import Evaluator, evaluate
    from flowrl.training import Trainer
    from flowrl.video import episode_video, record_video

    calls = {
        "Evaluator.__call__": lambda: Evaluator("Hopper")(None, k=2, num_steps=2),
        "evaluate": lambda: evaluate(None, "Hopper", k=2, num_steps=2),
        "Trainer.evaluate": lambda: Trainer.evaluate(None, k=2, episodes=1, num_steps=2),
        "flowrl.deploy.load": lambda: load(tmp_path / "missing.onnx", k=2, num_steps=2),
        "export": lambda: export(tmp_path / "missing", tmp_path / "x.onnx", k=2, num_steps=2),
        "episode_video": lambda: episode_video("Hopper", None, k=2, num_steps=2),
        "record_video": lambda: record_video(None, "Hopper", k=2, path=tmp_path / "x.mp4", num_steps=2),
    }
    for where, call in calls.items():
        with pytest.raises(FlowrlError, match=f"^{where}: num_steps is the old name of k; give only k$"):
            call()
    with pytest.raises(TypeError, match="evaluate\\(\\) missing required argument: 'k'"):
        evaluate(None, "Hopper")


def test_deploy_load_warns_at_the_callers_line(tmp_path: Path) -> None:
    """flowrl.deploy.load hands its keywords on; the warning still points at the code that passed num_steps."""
    from flowrl.deploy import load

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FlowrlError, match="policy not found"):
            load(tmp_path / "missing.onnx", num_steps=3)
    renamed = [w for w in caught if issubclass(w.category, RenamedWarning)]
    assert [str(w.message) for w in renamed] == ["flowrl.deploy.load: num_steps is now k"]
    assert renamed[0].filename == __file__
