"""Adapters between Gymnasium and the batched env seam, both ways.

* :class:`GymnasiumBatchedEnv`: N copies of any Gymnasium env (from a factory) as a ``BatchedEnv``;
  success is read from ``info[success_key]``; a Box observation becomes ``state`` (a Dict one is
  mapped key by key with ``obs_map``).
* :class:`TaskGymEnv`: one built-in task as a single Gymnasium env (numpy, Dict observation space with
  ``state`` / ``privileged`` / ``rgb``), terminated on success with ``info["is_success"]``; registered
  as ``vla_rl/Lift-v0``, ``vla_rl/Place-v0``, ``vla_rl/Handover-v0`` for SB3 / TorchRL users.
"""

from __future__ import annotations

from typing import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch

from .base import BatchedEnv, EnvError, EnvSpec, Obs


SUCCESS_KEYS = ("is_success", "success")  # looked for in a step's info when success_key is not given


class GymnasiumBatchedEnv(BatchedEnv):
    """``num_envs`` copies of a Gymnasium env (``env_fn()`` or a registered id) as a :class:`BatchedEnv`.

    * ``success_key``: the ``info`` key of the env's success flag; ``None`` looks for ``is_success`` then
      ``success``. When no success flag has appeared in any step's ``info`` by the time
      ``success_check_episodes`` episodes have ended (default: ``num_envs``; 0 turns the check off), the
      adapter raises instead of silently counting every episode as a failure.
    * a success ends the episode (terminated, reward 1); the env's own ``terminated`` without success is a
      failure; its own ``truncated`` (a ``TimeLimit``) and ``max_episode_steps`` (default: the env's
      registered limit, else 200) are truncations.
    * ``instruction``: one string, a list with one per env, or a callable ``reset_info -> str`` called at
      every reset (multi-task suites name the task in their reset info).
    * ``obs_map``: observation key -> key of the env's Dict observation (``None``: the whole observation);
      default ``{"state": None}`` for a Box observation, every key of a Dict one.
    * ``control_hz`` and ``action_hold`` (``"zero"`` / ``"last"`` / a number, one or one per action dim:
      what holding still means, for export) go into the spec.
    * :meth:`reset_group` resets blocks of envs with one seed each (group-relative advantages); it checks
      that the env is seedable (equal seeds give equal first observations).

    For sub-process stepping use :func:`make_gym_env` (``workers=W``).
    """

    def __init__(
        self,
        env_fn: Callable[[], gym.Env] | str | gym.envs.registration.EnvSpec,
        num_envs: int,
        success_key: str | None = None,
        obs_map: dict[str, str | None] | None = None,
        instruction: str | Sequence[str] | Callable[[dict], str] = "",
        max_episode_steps: int | None = None,
        device="cpu",
        seed: int | None = None,
        control_hz: float = 10.0,
        action_hold: Sequence = (),
        success_check_episodes: int | None = None,
        env_kwargs: dict | None = None,
    ):
        if isinstance(env_fn, (str, gym.envs.registration.EnvSpec)):
            env_id, kwargs = env_fn, dict(env_kwargs or {})
            env_fn = lambda: _gym_make(env_id, kwargs)  # noqa: E731
        elif env_kwargs:
            raise EnvError("env_kwargs are for a Gymnasium id; pass them to your env_fn instead")
        if num_envs < 1:
            raise EnvError(f"num_envs must be >= 1, got {num_envs}")
        self.envs = [env_fn() for _ in range(num_envs)]
        first_env = self.envs[0]
        space = first_env.observation_space
        if obs_map:
            self.obs_map = dict(obs_map)
        elif isinstance(space, gym.spaces.Dict):
            self.obs_map = {k: k for k in space.spaces}
        else:
            self.obs_map = {"state": None}
        if "state" not in self.obs_map:
            raise EnvError(f"obs_map needs a 'state' entry (the policy's proprioception); got {self.obs_map}")
        act_space = first_env.action_space
        if not isinstance(act_space, gym.spaces.Box):
            raise EnvError(f"only Box action spaces are supported, got {act_space}")
        self.success_key = success_key
        self.success_check_episodes = num_envs if success_check_episodes is None else int(success_check_episodes)
        self._instruction = instruction
        if not callable(instruction):
            if isinstance(instruction, str):
                self._instr = [instruction] * num_envs
            else:
                self._instr = [str(x) for x in instruction]
                if len(self._instr) != num_envs:
                    raise EnvError(f"instruction: a list needs one per env (num_envs={num_envs}), got {len(self._instr)}")
        else:
            self._instr = [""] * num_envs
        own_limit = getattr(getattr(first_env, "spec", None), "max_episode_steps", None)
        max_episode_steps = max_episode_steps or own_limit or 200
        self._last = [None] * num_envs
        self._succ = np.zeros(num_envs, bool)
        self._fail = np.zeros(num_envs, bool)
        self._trunc = np.zeros(num_envs, bool)
        self._started = np.zeros(num_envs, bool)
        self._signal_seen = False
        self._episodes_ended = 0
        self._info_keys: set[str] = set()
        self._abandoning = False
        first, info = first_env.reset(seed=seed)
        state_dim = int(np.prod(np.shape(self._map(first)["state"])))
        dim = int(np.prod(act_space.shape))
        hold = tuple(action_hold)
        if len(hold) == 1:
            hold = hold * dim
        if hold and len(hold) != dim:
            raise EnvError(f"action_hold needs one rule or {dim} (one per action dim), got {len(hold)}")
        if not (isinstance(control_hz, (int, float)) and control_hz > 0):
            raise EnvError(f"control_hz must be > 0, got {control_hz!r}")
        instructions = (self._instruction_of(info),) if callable(instruction) else tuple(dict.fromkeys(self._instr))
        spec = EnvSpec(action_dim=dim, state_dim=state_dim, max_episode_steps=int(max_episode_steps),
                       control_hz=float(control_hz), action_low=tuple(act_space.low.ravel().tolist()),
                       action_high=tuple(act_space.high.ravel().tolist()), action_hold=hold,
                       instructions=instructions)
        if "privileged" in self.obs_map:
            spec.privileged_dim = int(np.prod(np.shape(self._map(first)["privileged"])))
        super().__init__(spec, num_envs, device)
        self.rng = np.random.default_rng(seed)

    def _instruction_of(self, reset_info) -> str:
        text = self._instruction(dict(reset_info or {}))
        if not isinstance(text, str):
            raise EnvError(f"instruction: the callable must return a str, got {type(text).__name__}")
        return text

    def _map(self, obs) -> dict:
        try:
            return {k: (obs if src is None else obs[src]) for k, src in self.obs_map.items()}
        except (KeyError, TypeError, IndexError) as e:
            raise EnvError(f"obs_map {self.obs_map} does not fit the env's observation: missing {e}") from None

    def seed(self, seed: int) -> None:
        super().seed(seed)
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> Obs:
        self._abandoning = True  # the episodes in progress are cut short, not ended
        try:
            return super().reset(seed)
        finally:
            self._abandoning = False

    def _reset_one(self, i: int, seed: int):
        if self._started[i] and not self._abandoning:
            self._episodes_ended += 1
            self._check_success_signal()
        self._started[i] = True
        obs, info = self.envs[i].reset(seed=seed)
        self._last[i] = self._map(obs)
        self._succ[i] = self._fail[i] = self._trunc[i] = False
        if callable(self._instruction):
            self._instr[i] = self._instruction_of(info)
        return obs

    def _reset_envs(self, env_ids):
        for i in env_ids.tolist():
            self._reset_one(i, int(self.rng.integers(2**31)))

    def reset_group(self, group_size: int, seed: int | None = None) -> Obs:
        """Reset every env so that each block of ``group_size`` envs starts from the same seed (group-relative
        advantages); raises when the env is not seedable (one seed, different first observations)."""
        if group_size < 1 or self.num_envs % group_size:
            raise EnvError(f"group_size must divide num_envs={self.num_envs}, got {group_size}")
        if seed is not None:
            self.seed(seed)
        seeds = self.rng.integers(2**31, size=self.num_envs // group_size)
        self._abandoning = True
        try:
            raw = [self._reset_one(i, int(seeds[i // group_size])) for i in range(self.num_envs)]
        finally:
            self._abandoning = False
        for i in range(self.num_envs):
            lead = i - i % group_size
            if not _same(raw[i], raw[lead]):
                raise EnvError(f"reset_group: env {i} and env {lead} were reset with the same seed but start "
                               "differently: the wrapped env is not seedable (reset(seed=...) must fix its start); "
                               "use runner.group_size=0")
        self.episode_step.zero_()
        self.episode_return.zero_()
        return self._observe()

    def _success_of(self, info: dict) -> bool | None:
        if len(self._info_keys) < 256:
            self._info_keys.update(str(k) for k in info)
        keys = (self.success_key,) if self.success_key is not None else SUCCESS_KEYS
        for key in keys:
            if key in info:
                self._signal_seen = True
                return bool(np.asarray(info[key]).any())
        return None

    def _check_success_signal(self):
        n = self.success_check_episodes
        if self._signal_seen or n <= 0 or self._episodes_ended < n:
            return
        looked = f"success_key={self.success_key!r}" if self.success_key is not None else \
            f"success_key=None (looked for {list(SUCCESS_KEYS)})"
        raise EnvError(
            f"no success signal: {self._episodes_ended} episodes ended and the wrapped env never reported "
            f"{looked} in its step info (info keys seen: {sorted(self._info_keys)}); without it every episode "
            "counts as a failure. Set success_key to the env's success flag (env config: gym.success_key=<key>; "
            "GymnasiumBatchedEnv(success_key=...)), or success_check_episodes=0 if success is rare but reported")

    def _control_step(self, action):
        a = action.detach().cpu().numpy()
        for i, env in enumerate(self.envs):
            if self._succ[i] or self._fail[i] or self._trunc[i]:
                continue  # ended inside a chunk: the base class ignores it until it is reset
            obs, _, term, trunc, info = env.step(a[i].reshape(env.action_space.shape))
            self._last[i] = self._map(obs)
            self._succ[i] = bool(self._success_of(info))
            self._fail[i] = bool(term) and not self._succ[i]
            self._trunc[i] = bool(trunc) and not term and not self._succ[i]

    def _success(self):
        return torch.from_numpy(self._succ.copy()).to(self.device)

    def _failed(self):
        return torch.from_numpy(self._fail.copy()).to(self.device)

    def _truncated(self):
        return torch.from_numpy(self._trunc.copy()).to(self.device)

    def _observe(self) -> Obs:
        out = {}
        for k in self.obs_map:
            arr = np.stack([np.asarray(o[k]) for o in self._last])
            t = torch.from_numpy(arr).to(self.device)
            out[k] = t if k == "rgb" else t.float().reshape(self.num_envs, -1)
        out["instruction"] = list(self._instr)
        return out

    def close(self):
        for env in self.envs:
            env.close()


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return np.array_equal(np.asarray(a), np.asarray(b))


def _gym_make(env_id: str, kwargs: dict) -> gym.Env:
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        name = env_id if isinstance(env_id, str) else env_id.id
        raise EnvError(f"gym:{name}: {e}; a gym:<id> env must be registered with gymnasium.register "
                       "(or given as gym:<module>:<id>, which imports the module first)") from e


def _build_shard(num_envs: int, env=None, seed=None, **kwargs):
    return GymnasiumBatchedEnv(env, num_envs, seed=seed, **kwargs)


def make_gym_env(env: str | Callable[[], gym.Env], num_envs: int, workers: int = 1, device="cpu", seed=None,
                 instruction="", **kwargs):
    """A Gymnasium env (a registered id or an ``env_fn``) as a batched env; ``workers > 1`` steps
    ``num_envs / workers`` copies in each of ``workers`` processes (``env_fn`` and a callable instruction must
    then be picklable: module-level functions or classes, and an id registered on import of its module)."""
    if workers < 1:
        raise EnvError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        return GymnasiumBatchedEnv(env, num_envs, device=device, seed=seed, instruction=instruction, **kwargs)
    import functools

    from .subproc import SubprocEnv

    if isinstance(env, str):  # registered in this process maybe only: the workers get the id's EnvSpec
        try:
            env = gym.spec(env)
        except gym.error.Error as e:
            raise EnvError(f"gym:{env}: {e}; a gym:<id> env must be registered with gymnasium.register "
                           "(or given as gym:<module>:<id>, which imports the module first)") from e
    per_shard = None
    if not isinstance(instruction, str) and not callable(instruction):
        instruction = list(instruction)
        if len(instruction) != num_envs:
            raise EnvError(f"instruction: a list needs one per env (num_envs={num_envs}), got {len(instruction)}")
        base, extra = divmod(num_envs, workers)
        sizes = [base + (i < extra) for i in range(workers)]
        starts = np.cumsum([0] + sizes)
        per_shard = [{"instruction": instruction[starts[i]:starts[i + 1]]} for i in range(workers)]
    else:
        kwargs["instruction"] = instruction
    return SubprocEnv(functools.partial(_build_shard, env=env, **kwargs), num_envs, workers, device=device,
                      seed=seed, per_shard=per_shard)


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
