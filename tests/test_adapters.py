"""Our env through the gymnasium VectorEnv and Stable-Baselines3 VecEnv adapters."""

from __future__ import annotations

import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from flowrl.envs import make
from flowrl.envs.adapters import GymnasiumVectorEnv, sb3_vec_env


def test_gymnasium_vector_env_same_step_autoreset() -> None:
    venv = GymnasiumVectorEnv(make("Hopper", 3, backend="cpu", seed=0), autoreset_mode=AutoresetMode.SAME_STEP)
    assert venv.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    obs, _ = venv.reset(seed=0)
    assert obs.shape == (3, 11) and venv.action_space.shape == (3, 3)
    for _ in range(200):
        obs, reward, term, trunc, info = venv.step(np.tile([1.0, -1.0, 1.0], (3, 1)).astype(np.float32))
        if term.any():
            i = int(np.flatnonzero(term)[0])
            assert info["_final_obs"][i] and info["final_obs"][i].shape == (11,)
            assert not np.array_equal(info["final_obs"][i], obs[i])
            assert all(info["final_obs"][j] is None for j in range(3) if not (term | trunc)[j])
            break
    else:
        raise AssertionError("no termination seen")


def test_sb3_ppo_trains_on_our_vec_env() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor
    from stable_baselines3.common.logger import Logger

    venv = sb3_vec_env(make("PointReach", 16, seed=0))
    from stable_baselines3.common.evaluation import evaluate_policy

    model = PPO("MlpPolicy", VecMonitor(venv), n_steps=64, batch_size=256, learning_rate=3e-3, seed=0, device="cpu")
    before, _ = evaluate_policy(model, VecMonitor(venv), n_eval_episodes=16, deterministic=True)
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes an empty folder in /tmp
    model.learn(total_timesteps=16 * 64 * 12)
    after, _ = evaluate_policy(model, VecMonitor(venv), n_eval_episodes=16, deterministic=True)
    assert after > before + 3.0, (before, after)


def test_sb3_infos_carry_terminal_observation() -> None:
    venv = sb3_vec_env(make("Hopper", 2, backend="cpu", seed=1))
    venv.reset()
    for _ in range(300):
        obs, reward, done, infos = venv.step(np.tile([1.0, -1.0, 1.0], (2, 1)).astype(np.float32))
        if done.any():
            i = int(np.flatnonzero(done)[0])
            assert infos[i]["terminal_observation"].shape == (11,) and infos[i]["TimeLimit.truncated"] is False
            assert obs.dtype == np.float32 and abs(float(obs[i][0]) - 1.25) < 0.01
            return
    raise AssertionError("no episode ended")


def test_adapter_actions_reach_the_simulator() -> None:
    env = make("Hopper", 1, backend="cpu", seed=2)
    venv = sb3_vec_env(env)
    venv.reset()
    venv.step(np.array([[0.5, -0.25, 0.125]], dtype=np.float32))
    assert torch.equal(env.ctrl[0], torch.tensor([0.5, -0.25, 0.125], dtype=torch.float64))
