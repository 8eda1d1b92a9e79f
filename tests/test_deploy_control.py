"""The deploy control loop: deadline misses counted with a deliberately slow policy, the
last action held on a miss, stale actions of late chunks dropped, asynchronous inference, and
``flowrl deploy-sim`` end to end on PointReach."""

from __future__ import annotations

import time

import numpy as np
import pytest

from flowrl.cli import main
from flowrl.deploy.control import ControlLoop, SimulatedRobot, latency_summary, run_simulated
from flowrl.deploy.runtime import DeployedPolicy
from flowrl.errors import FlowrlError

META = {"obs_dim": 3, "act_dim": 1, "horizon": 4, "act_steps": 3, "obs_history": 1, "k": 1,
        "action_low": [-10.0], "action_high": [10.0], "task": None}


def counting_policy(delay: float) -> DeployedPolicy:
    """A policy whose n-th chunk is (n + 0.0, n + 0.1, n + 0.2, n + 0.3), after ``delay`` seconds."""
    calls = []

    def backend(obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        time.sleep(delay)
        calls.append(len(calls))
        n = float(len(calls))
        return (n + 0.1 * np.arange(4, dtype=np.float32)).reshape(1, 4, 1)

    return DeployedPolicy(backend, META, "fake")


class RecordingRobot:
    def __init__(self) -> None:
        self.sent: list[float] = []

    def read_observation(self) -> np.ndarray:
        return np.zeros(3, np.float32)

    def send_action(self, action: np.ndarray) -> None:
        self.sent.append(float(action[0]))


def test_a_slow_policy_misses_deadlines_holds_the_last_action_and_drops_stale_ones() -> None:
    robot = RecordingRobot()
    loop = ControlLoop(counting_policy(delay=0.03), robot, rate_hz=50)  # period 20 ms, deadline 16 ms
    stats = loop.run(ticks=12)
    loop.close()
    assert stats.ticks == 12 and len(robot.sent) == 12
    inferences = len(stats.inference_s)
    assert stats.misses >= inferences >= 3  # every chunk is late
    assert min(stats.inference_s) >= 0.03
    # the first tick has nothing yet: the safe action (the middle of the bounds) is held
    assert robot.sent[0] == 0.0
    sent = np.array(robot.sent)
    fresh = sent != np.concatenate([[np.nan], sent[:-1]])
    held = int((~fresh).sum()) + 1  # + the first tick's safe action
    assert held == stats.misses
    # a late chunk's first action was meant for the tick that missed: it is dropped, never executed (chunk c
    # holds c.0, c.1, ...; how many later actions a chunk also loses depends on how late it came)
    assert stats.dropped_actions >= inferences - 1
    first_actions = np.isclose(sent % 1, 0.0) & (sent > 0)
    assert not first_actions.any() and np.isclose(sent % 1, 0.1).any(), sent


def test_a_fast_policy_misses_nothing_and_executes_chunks_in_order() -> None:
    robot = RecordingRobot()
    loop = ControlLoop(counting_policy(delay=0.0), robot, rate_hz=50)
    stats = loop.run(ticks=9)
    loop.close()
    assert stats.misses == 0 and stats.dropped_actions == 0
    np.testing.assert_allclose(robot.sent, [1.0, 1.1, 1.2, 2.0, 2.1, 2.2, 3.0, 3.1, 3.2], atol=1e-6)


def test_async_inference_computes_the_next_chunk_while_the_current_one_executes() -> None:
    robot = RecordingRobot()
    loop = ControlLoop(counting_policy(delay=0.03), robot, rate_hz=50, async_inference=True, queue_threshold=1.0)
    stats = loop.run(ticks=15)
    loop.close()
    # after the first chunk, requests overlap execution: far fewer misses than chunks
    assert len(stats.inference_s) >= 3
    assert stats.misses < len(stats.inference_s)
    assert all(a <= b + 1e-6 for a, b in zip(robot.sent[1:], robot.sent[2:]))  # newer chunks, never older


def test_latency_summary() -> None:
    s = latency_summary([0.001] * 99 + [0.01])
    assert s["count"] == 100 and s["p50_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(10.0)
    assert np.isnan(latency_summary([])["p50_ms"])


def test_simulated_robot_episodes_and_bad_settings() -> None:
    policy = counting_policy(0.0)
    with pytest.raises(FlowrlError, match="task PointReach has observations of 4"):
        run_simulated(policy, "PointReach", 100)
    for kwargs, pattern in (({"rate_hz": 0}, "rate must be > 0"), ({"rate_hz": 10, "deadline": 2}, "deadline"),
                            ({"rate_hz": 10, "queue_threshold": -1}, "threshold")):
        with pytest.raises(FlowrlError, match=pattern):
            ControlLoop(policy, RecordingRobot(), **kwargs)
    robot = SimulatedRobot("PointReach", seed=1)
    for _ in range(30):
        robot.send_action(np.zeros(2, np.float32))
    assert robot.episode_ended and len(robot.episodes) == 1 and robot.episodes[0]["length"] == 30
    robot.close()


def test_cli_deploy_sim(tmp_path, capsys) -> None:
    from tests.test_deploy import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", "reflow", obs_history=1)
    assert main(["deploy-sim", str(ckpt), "--rate", "200", "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "deploy-sim: PointReach at 200 Hz, eager, K=4, sync" in out and "deadline misses" in out
    assert "p99 ms" in out and out.count("episode ") == 2 and "length 30" in out
    assert main(["deploy-sim", str(ckpt), "--rate", "100", "--task", "Hopper"]) == 2
    assert "task Hopper has observations of 11" in capsys.readouterr().err
