"""Adapter from an Isaac Lab 3.0 RL env (``ManagerBasedRLEnv`` / ``DirectRLEnv``) to :class:`BatchedEnv`.

Isaac Lab envs are already batched torch envs with *same-step autoreset*: ``env.step(action[N, A])``
returns ``(obs, reward[N], terminated[N], truncated[N], extras)`` where ``obs`` is a dict of
observation groups (``"policy"``, often ``"critic"``), envs that ended were reset inside the step and
``obs`` is their first observation of the new episode; with ``env.cfg.compute_final_obs = True`` the
pre-reset observation is in ``extras["final_obs"]`` (same group layout).

Because the reset happens inside Isaac Lab's step, this class overrides :meth:`step` / :meth:`reset`
instead of the base hooks, but keeps the base's observable contract:

* ``state`` / ``privileged`` come from configurable observation groups (``"policy"``) or single terms
  (``"policy/joint_pos"`` when the group is not concatenated); ``rgb`` from named camera sensors
  (``scene[name].data.output["rgb"]``, ``(N, H, W, C)`` -> ``uint8 [N, cams, 3, H, W]``);
  ``instruction`` from a string, a list of N strings, or a callable ``fn(env) -> list[str]``.
* success from ``success=`` : a termination-term name (``"success"`` ->
  ``env.termination_manager.get_term("success")``, whose buffer keeps the value computed before the
  reset), ``"extras:<key>"`` (``extras[key]``, bool ``[N]``), or a callable
  ``fn(env, obs_groups) -> bool[N]``. The callable is given, per env, the pre-reset observation for
  envs that Isaac Lab reset this step (``extras["final_obs"]``, so set ``compute_final_obs``) and the
  current observation otherwise; it may also read ``env`` state, which is post-reset for those envs.
* reward: outcome-only by default (1 on the step that succeeds, else 0); ``reward="env"`` sums
  Isaac Lab's own reward instead (ablations only).
* an episode ends on success (terminated), on Isaac Lab's ``terminated`` without success (a
  failure, terminated) or on Isaac Lab's ``truncated`` (time limit, truncated). When success is
  declared by the adapter but Isaac Lab did not reset that env, the adapter resets it itself through
  ``env._reset_idx(env_ids)`` (the same method Isaac Lab's own step calls).
* action chunks ``[N, T, A]`` run open-loop. An env whose episode ended at step ``t < T`` has
  *already been reset* (by Isaac Lab, or by the adapter), and Isaac Lab can only step all envs
  together, so for the remaining ``T - t - 1`` steps it keeps receiving its last executed action
  (the "hold" action) **in its new episode**: the new episode therefore starts up to ``T - 1``
  control steps in, driven by that held action, and whatever happens in those steps (reward,
  success, another reset) is discarded. The observation returned is the new episode's current one;
  ``info["final_obs"]`` is the last observation of the finished episode. Isaac Lab's own episode
  counter (``episode_length_buf``) includes the held steps; ours (``info["episode_length"]``) does
  not.
* ``info["final_obs"]``: mapped from ``extras["final_obs"]`` for envs that Isaac Lab reset
  (camera images there are the sensors' buffers read after the step, Isaac Lab keeps no pre-reset
  copy), from the observation just before the adapter's own reset otherwise.

``isaaclab`` is imported lazily (only in :func:`make_isaaclab_env` and :func:`event_terms_from_randomization`),
so this module imports without Isaac Lab installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import BatchedEnv, EnvError, EnvSpec, Obs, _merge_obs

SuccessSource = str | Callable[[Any, dict], torch.Tensor]


def _unwrap(env):
    return getattr(env, "unwrapped", env)


class IsaacLabEnv(BatchedEnv):
    """Wrap an Isaac Lab RL env (or its ``gym.make`` wrapper) as a :class:`BatchedEnv`.

    Args:
        env: the Isaac Lab env (``ManagerBasedRLEnv`` / ``DirectRLEnv``, possibly gym-wrapped).
        state: observation group or ``"group/term"`` mapped to ``obs["state"]``.
        privileged: group or ``"group/term"`` for ``obs["privileged"]`` (e.g. ``"critic"``), or None.
        cameras: names of camera sensors in ``env.scene`` mapped to ``obs["rgb"]``.
        instruction: a string, a list of ``num_envs`` strings, or ``fn(env) -> list[str]``.
        success: termination-term name, ``"extras:<key>"``, or ``fn(env, obs_groups) -> bool[N]``.
        reward: ``"outcome"`` (default) or ``"env"`` (Isaac Lab's own reward, summed over the chunk).
        control_hz: overrides ``1 / env.step_dt`` in the spec.
    """

    def __init__(
        self,
        env,
        *,
        state: str = "policy",
        privileged: str | None = None,
        cameras: tuple[str, ...] | list[str] = (),
        instruction: str | list[str] | Callable[[Any], list[str]] = "",
        success: SuccessSource = "success",
        reward: str = "outcome",
        control_hz: float | None = None,
    ):
        if reward not in ("outcome", "env"):
            raise EnvError(f"reward must be 'outcome' or 'env', got {reward!r}")
        self.env = env
        self.unwrapped = u = _unwrap(env)
        self._state_key = state
        self._priv_key = privileged
        self._cameras = tuple(cameras)
        self._instruction = instruction
        self._success_src = success
        self._reward_mode = reward
        num_envs = int(u.num_envs)
        device = torch.device(str(u.device))
        self._validate_success()

        # First observation: Isaac Lab envs must be reset once before stepping.
        groups, _ = env.reset()
        self._groups = groups
        obs = self._map(groups)
        act_space = getattr(u, "single_action_space", None)
        if act_space is not None and getattr(act_space, "shape", None):
            action_dim = int(act_space.shape[-1])
        else:
            action_dim = int(u.action_space.shape[-1])
        low = high = ()
        if act_space is not None and hasattr(act_space, "low"):
            low = tuple(float(x) for x in torch.as_tensor(act_space.low).flatten())
            high = tuple(float(x) for x in torch.as_tensor(act_space.high).flatten())
        rgb = obs.get("rgb")
        spec = EnvSpec(
            action_dim=action_dim,
            state_dim=int(obs["state"].shape[-1]),
            privileged_dim=int(obs["privileged"].shape[-1]) if "privileged" in obs else 0,
            cameras=self._cameras,
            image_size=(int(rgb.shape[-2]), int(rgb.shape[-1])) if rgb is not None else (0, 0),
            control_hz=float(control_hz) if control_hz else 1.0 / float(getattr(u, "step_dt", 0.1)),
            max_episode_steps=int(getattr(u, "max_episode_length", 10**9)),
            action_low=low,
            action_high=high,
            instructions=tuple(sorted(set(obs["instruction"]))),
        )
        super().__init__(spec, num_envs, device)
        self._obs = obs

    # ------------------------------------------------------------------ mapping
    def _validate_success(self):
        src = self._success_src
        if callable(src) or (isinstance(src, str) and src.startswith("extras:")):
            return
        if not isinstance(src, str):
            raise EnvError(f"success must be a term name, 'extras:<key>' or a callable, got {src!r}")
        tm = getattr(self.unwrapped, "termination_manager", None)
        if tm is None:
            raise EnvError(
                f"success={src!r} names a termination term but the env has no termination_manager "
                "(a DirectRLEnv): use success='extras:<key>' or a callable"
            )
        names = list(getattr(tm, "active_terms", []))
        if src not in names:
            raise EnvError(f"success term {src!r} is not a termination term of the env; terms: {names}")

    def _select(self, groups: dict, key: str, what: str) -> torch.Tensor:
        group, _, term = key.partition("/")
        if group not in groups:
            raise EnvError(f"{what}: observation group {group!r} not found; groups: {sorted(groups)}")
        g = groups[group]
        if term:
            if not isinstance(g, dict) or term not in g:
                have = sorted(g) if isinstance(g, dict) else "(group is concatenated)"
                raise EnvError(f"{what}: term {term!r} not found in observation group {group!r}; terms: {have}")
            g = g[term]
        if isinstance(g, dict):  # non-concatenated group: flatten and concatenate its terms in order
            g = torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=-1)
        return g.reshape(g.shape[0], -1).float()

    def _rgb(self) -> torch.Tensor:
        scene = self.unwrapped.scene
        imgs = []
        for name in self._cameras:
            try:
                sensor = scene[name]
            except KeyError:
                sensor = None
            if sensor is None:
                raise EnvError(f"camera sensor {name!r} not found in the env's scene")
            out = sensor.data.output
            if "rgb" not in out:
                raise EnvError(f"camera {name!r} has no 'rgb' output (data_types must include 'rgb'); has {list(out)}")
            img = out["rgb"][..., :3]  # (N, H, W, 3); rgba -> rgb
            if img.dtype != torch.uint8:
                img = (img.float().clamp(0, 1) * 255).round().to(torch.uint8) if img.is_floating_point() else img.to(torch.uint8)
            imgs.append(img.permute(0, 3, 1, 2))
        return torch.stack(imgs, dim=1)

    def _instructions(self) -> list[str]:
        ins = self._instruction
        n = int(self.unwrapped.num_envs)
        if callable(ins):
            ins = list(ins(self.unwrapped))
        elif isinstance(ins, str):
            ins = [ins] * n
        else:
            ins = list(ins)
        if len(ins) != n:
            raise EnvError(f"instruction must give {n} strings, got {len(ins)}")
        return ins

    def _map(self, groups: dict, rgb: torch.Tensor | None = None) -> Obs:
        dev = torch.device(str(self.unwrapped.device))
        obs: Obs = {"state": self._select(groups, self._state_key, "state").to(dev)}
        if self._priv_key is not None:
            obs["privileged"] = self._select(groups, self._priv_key, "privileged").to(dev)
        if self._cameras:
            obs["rgb"] = (rgb if rgb is not None else self._rgb()).to(dev)
        obs["instruction"] = self._instructions()
        return obs

    def _success_now(self, groups: dict, extras: dict) -> torch.Tensor:
        src = self._success_src
        if callable(src):
            s = src(self.unwrapped, groups)
        elif src.startswith("extras:"):
            key = src[len("extras:"):]
            if key not in extras:
                raise EnvError(f"success key {key!r} not in the env's extras; keys: {sorted(extras)}")
            s = extras[key]
        else:
            s = self.unwrapped.termination_manager.get_term(src)
        s = torch.as_tensor(s, device=self.device)
        if s.shape != (self.num_envs,):
            raise EnvError(f"success must be a bool tensor of shape [{self.num_envs}], got {tuple(s.shape)}")
        return s.bool()

    # ------------------------------------------------------------------ BatchedEnv hooks (unused: step/reset overridden)
    def _reset_envs(self, env_ids: torch.Tensor) -> None:
        """Reset envs by the same method Isaac Lab's step uses, then refresh the observation groups."""
        u = self.unwrapped
        u._reset_idx(env_ids)
        scene = getattr(u, "scene", None)
        if scene is not None and hasattr(scene, "write_data_to_sim"):
            scene.write_data_to_sim()
        sim = getattr(u, "sim", None)
        if sim is not None and hasattr(sim, "forward"):
            sim.forward()
        if hasattr(u, "observation_manager"):
            self._groups = u.observation_manager.compute()
        elif hasattr(u, "_compute_observations"):  # DirectRLEnv (3.0): _get_observations + noise
            self._groups = u._compute_observations()
        elif hasattr(u, "_get_observations"):
            self._groups = u._get_observations()

    def _control_step(self, action):  # pragma: no cover - step is overridden
        raise NotImplementedError

    def _success(self):  # pragma: no cover
        raise NotImplementedError

    def _observe(self) -> Obs:
        return self._map(self._groups)

    def seed(self, seed: int) -> None:
        super().seed(seed)
        if hasattr(self.unwrapped, "seed"):
            self.unwrapped.seed(int(seed))

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------ public API
    def reset(self, seed: int | None = None) -> Obs:
        if seed is not None:
            self.seed(seed)
        groups, _ = self.env.reset(seed=seed) if seed is not None else self.env.reset()
        self._groups = groups
        self.episode_step.zero_()
        self.episode_return.zero_()
        return self._observe()

    def step(self, action: torch.Tensor):
        chunk = self._check_action(action)
        n, horizon = chunk.shape[0], chunk.shape[1]
        dev = self.device
        reward = torch.zeros(n, dtype=torch.float32, device=dev)
        ended = torch.zeros(n, dtype=torch.bool, device=dev)
        terminated = torch.zeros_like(ended)
        truncated = torch.zeros_like(ended)
        success = torch.zeros_like(ended)
        final_obs: Obs | None = None
        executed = torch.zeros(n, dtype=torch.long, device=dev)
        hold = chunk[:, 0]
        extras: dict = {}
        for t in range(horizon):
            running = ~ended
            hold = torch.where(running[:, None], chunk[:, t], hold)
            groups, env_rew, env_term, env_trunc, extras = self.env.step(hold)
            env_term = torch.as_tensor(env_term, device=dev).bool()
            env_trunc = torch.as_tensor(env_trunc, device=dev).bool()
            isaac_reset = env_term | env_trunc
            pre = extras.get("final_obs") if isinstance(extras, dict) else None
            if isaac_reset.any() and pre is None:
                pre_groups = groups  # no compute_final_obs: the best we have is the post-reset obs
            elif isaac_reset.any():
                pre_groups = _merge_groups(groups, pre, isaac_reset)
            else:
                pre_groups = groups
            self._groups = groups
            self.episode_step += running.long()
            executed += running.long()
            succ_now = self._success_now(pre_groups, extras) & running
            if self._reward_mode == "outcome":
                step_reward = succ_now.float()
            else:
                step_reward = torch.as_tensor(env_rew, device=dev).float().reshape(n)
            reward += torch.where(running, step_reward, torch.zeros_like(step_reward))
            trunc_now = running & ~succ_now & env_trunc & ~env_term
            fail_now = running & ~succ_now & env_term
            newly = succ_now | trunc_now | fail_now
            if newly.any():
                rgb = self._rgb() if self._cameras else None
                final_obs = _merge_obs(final_obs, self._map(pre_groups, rgb), newly)
                # Success that Isaac Lab did not reset on: reset those envs ourselves.
                own = newly & ~isaac_reset
                if own.any():
                    self._reset_envs(own.nonzero(as_tuple=False).squeeze(-1))
            terminated |= succ_now | fail_now
            truncated |= trunc_now
            success |= succ_now
            ended |= newly
            if bool(ended.all()):
                break
        # Isaac Lab reset its ended envs itself (and the loop above reset the ones it did not end).
        info = self._end_step(reward, ended, success, torch.zeros_like(ended), executed, final_obs, reset_ended=False)
        info["isaaclab_extras"] = extras
        return self._observe(), reward, terminated, truncated, info


def _merge_groups(post: dict, pre: dict, mask: torch.Tensor) -> dict:
    """Per env: ``pre`` (final obs) where ``mask`` else ``post``; nested term dicts handled."""
    out = {}
    for k, v in post.items():
        if k not in pre:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = _merge_groups(v, pre[k], mask)
        else:
            m = mask.view(-1, *([1] * (v.dim() - 1)))
            out[k] = torch.where(m, pre[k].to(v.device), v)
    return out


# ---------------------------------------------------------------------- construction helpers
def make_isaaclab_env(
    task: str, num_envs: int, device: str = "cpu", cfg_overrides: Callable | None = None,
    overrides: tuple[str, ...] = (), **adapter_kwargs,
):
    """``gym.make`` an Isaac Lab task kit-less and wrap it. ``overrides`` are Isaac Lab's preset/Hydra
    overrides (e.g. ``("presets=newton_mjwarp",)``); ``cfg_overrides(env_cfg)`` may edit the cfg.

    Sets ``compute_final_obs = True`` so success callables and ``final_obs`` see pre-reset observations.
    """
    import gymnasium as gym
    try:
        import isaaclab_tasks  # noqa: F401  (registers the Isaac-* ids)
        from isaaclab_tasks.utils import parse_env_cfg
    except ImportError as e:
        raise EnvError(f"make_isaaclab_env({task!r}) needs Isaac Lab (isaaclab and isaaclab_tasks), which is not "
                       f"importable here ({e}); install it in this environment (README: Isaac Lab) or wrap an "
                       "env you built yourself with IsaacLabEnv(env)") from e

    env_cfg = parse_env_cfg(task, device=device, num_envs=num_envs, overrides=tuple(overrides))
    env_cfg.compute_final_obs = True
    if cfg_overrides is not None:
        cfg_overrides(env_cfg)
    env = gym.make(task, cfg=env_cfg)
    return IsaacLabEnv(env, **adapter_kwargs)


def event_terms_from_randomization(
    dyn,
    asset: str = "robot",
    body_names: str | list[str] = ".*",
    joint_names: str | list[str] = ".*",
    base_static_friction: float = 1.0,
    base_dynamic_friction: float = 1.0,
    mode: str = "reset",
    num_buckets: int = 64,
) -> dict:
    """Map our declarative dynamics ranges (``DynamicsConfig`` or dict with ``friction``, ``mass``,
    ``damping``, ``armature``, ``actuator_gain`` as ``(low, high)`` scales) to Isaac Lab
    ``EventTermCfg`` entries over ``isaaclab.envs.mdp.events`` terms. Ranges equal to ``(1, 1)``
    are skipped. Returns ``{name: EventTermCfg}``; assign them as attributes of ``env_cfg.events``.

    Friction: Isaac Lab's material term takes absolute friction ranges, so our scale range is
    multiplied by ``base_static_friction`` / ``base_dynamic_friction``. Note: in Isaac Lab the
    material term is meant for ``mode="startup"`` on PhysX (material buckets); ``mode`` applies to
    every term here.
    """
    from isaaclab.envs.mdp import events
    from isaaclab.managers import EventTermCfg, SceneEntityCfg

    get = (lambda k: dyn.get(k, (1.0, 1.0))) if isinstance(dyn, dict) else (lambda k: getattr(dyn, k, (1.0, 1.0)))
    on = lambda r: tuple(r) != (1.0, 1.0)  # noqa: E731
    terms = {}
    fr = get("friction")
    if on(fr):
        terms["randomize_friction"] = EventTermCfg(
            func=events.randomize_rigid_body_material,
            mode=mode,
            params={
                "asset_cfg": SceneEntityCfg(asset, body_names=body_names),
                "static_friction_range": (fr[0] * base_static_friction, fr[1] * base_static_friction),
                "dynamic_friction_range": (fr[0] * base_dynamic_friction, fr[1] * base_dynamic_friction),
                "restitution_range": (0.0, 0.0),
                "num_buckets": num_buckets,
            },
        )
    m = get("mass")
    if on(m):
        terms["randomize_mass"] = EventTermCfg(
            func=events.randomize_rigid_body_mass,
            mode=mode,
            params={
                "asset_cfg": SceneEntityCfg(asset, body_names=body_names),
                "mass_distribution_params": tuple(m),
                "operation": "scale",
            },
        )
    g, d = get("actuator_gain"), get("damping")
    if on(g):
        terms["randomize_actuator_gains"] = EventTermCfg(
            func=events.randomize_actuator_gains,
            mode=mode,
            params={
                "asset_cfg": SceneEntityCfg(asset, joint_names=joint_names),
                "stiffness_distribution_params": tuple(g),
                "damping_distribution_params": tuple(d) if on(d) else None,
                "operation": "scale",
            },
        )
    a = get("armature")
    if on(a) or (on(d) and not on(g)):
        params = {"asset_cfg": SceneEntityCfg(asset, joint_names=joint_names), "operation": "scale"}
        if on(a):
            params["armature_distribution_params"] = tuple(a)
        if on(d) and not on(g):  # joint damping without gain randomization -> actuator damping alone
            terms["randomize_actuator_damping"] = EventTermCfg(
                func=events.randomize_actuator_gains,
                mode=mode,
                params={"asset_cfg": SceneEntityCfg(asset, joint_names=joint_names),
                        "damping_distribution_params": tuple(d), "operation": "scale"},
            )
        if on(a):
            terms["randomize_joint_parameters"] = EventTermCfg(func=events.randomize_joint_parameters, mode=mode, params=params)
    return terms
