"""Gymnasium adapters: built-in tasks as Gymnasium envs, and Gymnasium envs as a BatchedEnv."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import vla_rl.envs  # noqa: F401  (registers vla_rl/*-v0)
from vla_rl.envs import EnvError
from vla_rl.envs.gym_adapter import GymnasiumBatchedEnv


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("env_id", ["vla_rl/Lift-v0", "vla_rl/Handover-v0"])
def test_registered_envs_pass_checker(env_id):
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and isinstance(info["instruction"], str)
    env.close()


def test_registered_env_with_camera_and_success():
    from vla_rl.envs.experts import Expert

    env = gym.make("vla_rl/Lift-v0", cameras=("front",), image_size=(16, 16), state_includes_objects=True)
    obs, _ = env.reset(seed=0)
    assert obs["rgb"].shape == (1, 3, 16, 16) and obs["rgb"].dtype == np.uint8
    inner = env.unwrapped.env
    expert = Expert(inner.task)
    for _ in range(60):
        obs, r, term, trunc, info = env.step(expert(inner.task_state(), inner.episode)[0].numpy())
        if term or trunc:
            break
    assert term and info["is_success"] and r == 1.0
    assert obs["privileged"].reshape(3, 3)[:, 2].max() > 0.1  # the terminal obs, not the reset one


class Reach(gym.Env):
    """Tiny 1-D env: success when x > 1; fails (terminates) when x < -1."""

    observation_space = gym.spaces.Box(-10, 10, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0.0
        return np.array([self.x], np.float32), {}

    def step(self, a):
        self.x += 0.5 * float(a[0])
        return np.array([self.x], np.float32), 0.0, abs(self.x) > 1, False, {"success": self.x > 1}


def test_gymnasium_batched_env():
    env = GymnasiumBatchedEnv(Reach, 3, success_key="success", max_episode_steps=10, instruction="reach")
    obs = env.reset(seed=0)
    assert obs["state"].shape == (3, 1) and obs["instruction"] == ["reach"] * 3
    act = torch.tensor([[1.0], [-1.0], [0.0]])
    obs, reward, term, trunc, info = env.step(act[:, None].expand(3, 4, 1))
    assert info["success"].tolist() == [True, False, False]
    assert term.tolist() == [True, True, False] and reward.tolist() == [1.0, 0.0, 0.0]
    assert info["final_obs"]["state"][0, 0] > 1 and obs["state"][0, 0] == 0  # auto-reset
    assert info["episode_length"].tolist() == [3, 3, 0]
    with pytest.raises(EnvError):
        env.step(torch.zeros(3, 2))
