"""Collect expert demonstrations from the batched env into a demo file (``vla_rl.data``).

The env is any env spec (a built-in or registered name, ``gym:<id>``, ``module:factory``) or an
:class:`~vla_rl.envs.EnvConfig`; the expert is the built-in tasks' scripted one, or any callable
``obs -> action`` (``[N, A]``, torch or numpy) given as such or as ``"module:factory"`` (``factory(env)``
or ``factory()`` returns it). An expert with a ``reset(env_ids)`` method is told which envs started a new
episode. :func:`per_env_expert` turns a single-env policy (``state -> action``, numpy; e.g. a suite's
scripted policy) into a batched one.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from vla_rl.config import check_value, ge, gt
from vla_rl.data import EpisodeWriter
from vla_rl.envs import EnvConfig, EnvError, make_env, make_env_from_config


def per_env_expert(policy: Callable, key: str = "state") -> Callable:
    """A batched expert from a single-env one: ``policy(obs[key][i] as numpy) -> action`` for each env i."""

    def act(obs):
        x = obs[key].detach().cpu().numpy()
        return np.stack([np.asarray(policy(x[i]), dtype=np.float32).reshape(-1) for i in range(len(x))])

    return act


def load_expert(expert, env) -> Callable:
    """The expert callable ``obs -> action`` for ``env``: ``None`` (the built-in tasks' scripted expert),
    a callable, or a ``"module:factory"`` import path whose factory is called with the env (or nothing)."""
    if expert is None:
        if not hasattr(env, "task_state"):
            raise EnvError("this env has no built-in expert (only the built-in tasks do): give one as "
                           "--expert module:factory (factory(env) -> callable obs -> action [num_envs, action_dim])")
        from vla_rl.envs.experts import make_expert

        builtin = make_expert(env)
        return lambda _obs: builtin()
    if isinstance(expert, str):
        from vla_rl.envs.registry import _IMPORT_PATH, _load

        if not _IMPORT_PATH.match(expert):
            raise EnvError(f"expert {expert!r} is not a 'module:factory' import path "
                           "(factory(env) -> callable obs -> action)")
        factory = _load(expert, f"expert {expert!r}")
        try:
            positional = [p for p in inspect.signature(factory).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        except (TypeError, ValueError):
            positional = [None]
        built = factory(env) if positional else factory()
        if not callable(built):
            raise EnvError(f"expert {expert!r}: its factory returned {type(built).__name__}, not a callable obs -> action")
        return built
    if callable(expert):
        return expert
    raise EnvError(f"expert must be None, a callable obs -> action or a 'module:factory' string, got {expert!r}")


def _as_action(action, env) -> torch.Tensor:
    action = torch.as_tensor(np.asarray(action) if not isinstance(action, torch.Tensor) else action,
                             dtype=torch.float32)
    want = (env.num_envs, env.spec.action_dim)
    if tuple(action.shape) != want:
        raise EnvError(f"the expert returned an action of shape {tuple(action.shape)}, expected [num_envs, action_dim] "
                       f"= {list(want)}")
    return action.to(env.device)


def collect_demos(
    task: str,
    num_episodes: int,
    out_path: str | Path,
    num_envs: int = 16,
    noise: float = 0.0,
    seed: int = 0,
    label: str = "expert",
    cameras: tuple[str, ...] = (),
    image_size: tuple[int, int] = (128, 128),
    keep_failed: bool = False,
    randomization=None,
    max_steps: int | None = None,
    expert=None,
    **env_kwargs,
) -> dict:
    """Run the expert in ``num_envs`` parallel envs until ``num_episodes`` episodes are written.

    ``task``: an env spec or an :class:`~vla_rl.envs.EnvConfig` (its ``num_envs`` and ``seed`` are replaced
    by the arguments); ``expert``: see the module docstring (``None``: the built-in task's scripted expert).

    Each step records the observation the action was taken from (``state``, ``privileged``,
    ``rgb`` when cameras are on). ``noise`` (std, normalized action units) perturbs the executed action
    so the demos visit states off the expert's path; ``label="expert"`` records the expert's noise-free
    action there (DART, Laskey et al. 2017: the labels teach recovery instead of the noise), ``"executed"``
    the perturbed action that was sent. Returns ``{"path", "written", "attempted", "success_rate"}``.
    """
    if label not in ("expert", "executed"):
        raise ValueError(f"label must be 'expert' or 'executed', got {label!r}")
    # checked before the env and the output file exist: a bad value writes nothing
    check_value("num_episodes (--episodes)", num_episodes, gt(0))
    check_value("num_envs (--num-envs)", num_envs, gt(0))
    check_value("noise (--noise)", noise, ge(0))
    if isinstance(task, EnvConfig):
        env = make_env_from_config(dataclasses.replace(task, num_envs=num_envs, seed=seed))
        task = task.task
    else:
        env = make_env(task, num_envs, cameras=tuple(cameras), image_size=tuple(image_size),
                       randomization=randomization, seed=seed, **env_kwargs)
    try:
        return _collect(env, task, load_expert(expert, env), num_episodes, out_path, noise, seed, label, keep_failed,
                        max_steps)
    finally:
        env.close()


def _collect(env, task, act, num_episodes, out_path, noise, seed, label, keep_failed, max_steps) -> dict:
    num_envs = env.num_envs
    reset = getattr(act, "reset", None)
    gen = torch.Generator().manual_seed(seed)
    # noisy actions stay inside the action space (the built-in tasks': [-1, 1])
    spec = env.spec
    low = torch.tensor(spec.action_low or (-1.0,) * spec.action_dim, dtype=torch.float32, device=env.device)
    high = torch.tensor(spec.action_high or (1.0,) * spec.action_dim, dtype=torch.float32, device=env.device)
    obs = env.reset(seed=seed)
    keys = [k for k in ("state", "privileged", "rgb") if k in obs]
    buffers = [_empty(keys) for _ in range(num_envs)]
    written = attempted = successes = 0
    max_steps = max_steps or 50 * num_episodes * env.spec.max_episode_steps
    with EpisodeWriter(out_path) as writer, tqdm(total=num_episodes, desc=f"collect {task}") as bar:
        for _ in range(max_steps):
            if written >= num_episodes:
                break
            expert_action = _as_action(act(obs), env)
            action = expert_action
            if noise > 0:
                action = torch.minimum(torch.maximum(
                    action + noise * torch.randn(action.shape, generator=gen).to(action.device), low), high)
            recorded = expert_action if label == "expert" else action
            instructions = list(obs["instruction"])
            for i in range(num_envs):
                for k in keys:
                    buffers[i][k].append(obs[k][i].cpu().numpy())
                buffers[i]["action"].append(recorded[i].cpu().numpy())
            obs, _, term, trunc, info = env.step(action)
            ended = (term | trunc).nonzero().flatten().tolist()
            if ended and callable(reset):
                reset(ended)
            for i in ended:
                ok = bool(info["success"][i])
                attempted += 1
                successes += ok
                if (ok or keep_failed) and written < num_episodes:
                    ep = buffers[i]
                    writer.add_episode({k: np.stack(ep[k]) for k in keys}, np.stack(ep["action"]),
                                       instructions[i], ok)
                    written += 1
                    bar.update(1)
                buffers[i] = _empty(keys)
        path = writer.path
    return {"path": str(path), "written": written, "attempted": attempted,
            "success_rate": successes / max(attempted, 1)}


def _empty(keys):
    return {k: [] for k in (*keys, "action")}
