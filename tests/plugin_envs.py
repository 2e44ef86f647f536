"""Tiny Gymnasium envs and factories for tests/test_env_plugins.py, importable as ``plugin_envs:<name>`` (env
specs and experts given by import path, as a user's package would be)."""

import gymnasium as gym
import numpy as np

from vla_rl.envs import GymnasiumBatchedEnv


class Line(gym.Env):
    """1-D reach: x starts near 0, success (info["success"]) when x > 1; its own 5-step limit when registered."""

    observation_space = gym.spaces.Box(-10, 10, (2,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def __init__(self, speed: float = 0.5):
        self.speed = speed

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-0.1, 0.1))
        self.word = ("left", "right")[int(self.np_random.integers(2))]
        return np.array([self.x, 0.0], np.float32), {"task": f"go {self.word}"}

    def step(self, a):
        self.x += self.speed * float(np.clip(a[0], -1, 1))
        success = self.x > 1
        return np.array([self.x, 0.0], np.float32), float(success), success, False, {"success": success}


class Unseeded(Line):
    """Ignores the reset seed: not usable for reset_group."""

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=None)
        obs[1] = np.random.default_rng().uniform()
        return obs, info


gym.register("PluginTest/Line-v0", entry_point=Line, max_episode_steps=5)


def make_line(num_envs, device="cpu", seed=None, speed=0.5):
    """A ``module:factory`` env: returns a BatchedEnv."""
    return GymnasiumBatchedEnv(lambda: Line(speed), num_envs, device=device, seed=seed, max_episode_steps=8,
                               instruction="go right")


def make_not_an_env(num_envs):
    return "not an env"


def instruction_of(info):
    return info["task"]


def push_right(env):
    """A ``module:factory`` expert: factory(env) -> callable obs -> action (a deterministic function of state)."""
    return lambda obs: (1.0 - obs["state"][:, :1]).clamp(0.2, 1.0)
