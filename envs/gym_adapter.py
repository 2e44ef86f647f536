"""Adapters between Gymnasium and the batched env seam, both ways.

* :class:`GymnasiumBatchedEnv`: N copies of any Gymnasium env (from a factory) as a ``BatchedEnv``;
  success is read from ``info[success_key]``; a Box observation becomes ``state`` (a Dict one is
  mapped key by key with ``obs_map``).
* :class:`TaskGymEnv`: one built-in task as a single Gymnasium env (numpy, Dict observation space with
  ``state`` / ``privileged`` / ``rgb``), terminated on success with ``info["is_success"]``; registered
  as ``vla_rl/Lift-v0``, ``vla_rl/Place-v0``, ``vla_rl/Handover-v0`` for SB3 / TorchRL users.
"""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np
import torch

from .base import BatchedEnv, EnvError, EnvSpec, Obs


class GymnasiumBatchedEnv(BatchedEnv):
    def __init__(
        self,
        env_fn: Callable[[], gym.Env],
        num_envs: int,
        success_key: str = "is_success",
        obs_map: dict[str, str] | None = None,
        instruction: str = "",
        max_episode_steps: int = 200,
        device="cpu",
        seed: int | None = None,
    ):
        self.envs = [env_fn() for _ in range(num_envs)]
        space = self.envs[0].observation_space
        self.obs_map = obs_map or ({"state": None} if isinstance(space, gym.spaces.Box) else {k: k for k in space.spaces})
        act_space = self.envs[0].action_space
        if not isinstance(act_space, gym.spaces.Box):
            raise EnvError(f"only Box action spaces are supported, got {act_space}")
        self.success_key = success_key
        self.instruction = instruction
        self._last = [None] * num_envs
        self._succ = np.zeros(num_envs, bool)
        self._fail = np.zeros(num_envs, bool)
        first, _ = self.envs[0].reset(seed=seed)
        state_dim = int(np.prod(np.shape(self._map(first)["state"])))
        spec = EnvSpec(action_dim=int(np.prod(act_space.shape)), state_dim=state_dim,
                       max_episode_steps=max_episode_steps, action_low=tuple(act_space.low.ravel().tolist()),
                       action_high=tuple(act_space.high.ravel().tolist()), instructions=(instruction,))
        super().__init__(spec, num_envs, device)
        self.rng = np.random.default_rng(seed)

    def _map(self, obs) -> dict:
        return {k: (obs if src is None else obs[src]) for k, src in self.obs_map.items()}

    def seed(self, seed: int) -> None:
        super().seed(seed)
        self.rng = np.random.default_rng(seed)

    def _reset_envs(self, env_ids):
        for i in env_ids.tolist():
            obs, _ = self.envs[i].reset(seed=int(self.rng.integers(2**31)))
            self._last[i] = self._map(obs)
            self._succ[i] = self._fail[i] = False

    def _control_step(self, action):
        a = action.detach().cpu().numpy()
        for i, env in enumerate(self.envs):
            if self._succ[i] or self._fail[i]:
                continue  # ended inside a chunk: the base class ignores it until it is reset
            obs, _, term, trunc, info = env.step(a[i].reshape(env.action_space.shape))
            self._last[i] = self._map(obs)
            self._succ[i] = bool(info.get(self.success_key, False))
            self._fail[i] = bool(term or trunc) and not self._succ[i]

    def _success(self):
        return torch.from_numpy(self._succ.copy()).to(self.device)

    def _failed(self):
        return torch.from_numpy(self._fail.copy()).to(self.device)

    def _observe(self) -> Obs:
        out = {}
        for k in self.obs_map:
            arr = np.stack([np.asarray(o[k]) for o in self._last])
            t = torch.from_numpy(arr).to(self.device)
            out[k] = t if k == "rgb" else t.float().reshape(self.num_envs, -1)
        out["instruction"] = [self.instruction] * self.num_envs
        return out

    def close(self):
        for env in self.envs:
            env.close()


class TaskGymEnv(gym.Env):
    """A built-in task as a single-env Gymnasium env (numpy in and out)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str = "lift", render_mode: str | None = None, **env_kwargs):
        from . import make_env

        self.env = make_env(task, 1, **env_kwargs)
        spec = self.env.spec
        spaces = {
            "state": gym.spaces.Box(-np.inf, np.inf, (spec.state_dim,), np.float32),
            "privileged": gym.spaces.Box(-np.inf, np.inf, (spec.privileged_dim,), np.float32),
        }
        if spec.cameras:
            h, w = spec.image_size
            spaces["rgb"] = gym.spaces.Box(0, 255, (len(spec.cameras), 3, h, w), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (spec.action_dim,), np.float32)
        self.render_mode = render_mode
        self.instruction = ""

    def _np(self, obs) -> dict:
        self.instruction = obs["instruction"][0]
        return {k: obs[k][0].cpu().numpy() for k in self.observation_space.spaces}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        obs = self.env.reset(seed=seed)
        return self._np(obs), {"instruction": self.instruction}

    def step(self, action):
        obs, reward, term, trunc, info = self.env.step(torch.as_tensor(np.asarray(action, np.float32))[None])
        # The batched env auto-resets; a single Gymnasium env must return the episode's last observation.
        if "final_obs" in info:
            obs = info["final_obs"]
        success = bool(info["success"][0])
        return (self._np(obs), float(reward[0]), bool(term[0]), bool(trunc[0]),
                {"is_success": success, "instruction": self.instruction})

    def render(self):
        if self.render_mode == "rgb_array":
            cams = self.env.cameras or ("front",)
            saved, self.env.cameras = self.env.cameras, cams
            img = self.env.render()[0, 0].permute(1, 2, 0).numpy()
            self.env.cameras = saved
            return img
        return None

    def close(self):
        self.env.close()


GYM_IDS = {"lift": "vla_rl/Lift-v0", "place": "vla_rl/Place-v0", "handover": "vla_rl/Handover-v0"}


def register_gym_envs() -> None:
    for task, env_id in GYM_IDS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="vla_rl.envs.gym_adapter:TaskGymEnv", kwargs={"task": task})
