"""Collect scripted-expert demonstrations from the batched env into a demo file (``vla_rl.data``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vla_rl.config import check_value, ge, gt
from vla_rl.data import EpisodeWriter
from vla_rl.envs import make_env
from vla_rl.envs.experts import make_expert


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
    **env_kwargs,
) -> dict:
    """Run the expert in ``num_envs`` parallel envs until ``num_episodes`` episodes are written.

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
    env = make_env(task, num_envs, cameras=tuple(cameras), image_size=tuple(image_size),
                   randomization=randomization, seed=seed, **env_kwargs)
    act = make_expert(env)
    gen = torch.Generator().manual_seed(seed)
    obs = env.reset(seed=seed)
    keys = [k for k in ("state", "privileged", "rgb") if k in obs]
    buffers = [_empty(keys) for _ in range(num_envs)]
    written = attempted = successes = 0
    max_steps = max_steps or 50 * num_episodes * env.spec.max_episode_steps
    with EpisodeWriter(out_path) as writer, tqdm(total=num_episodes, desc=f"collect {task}") as bar:
        for _ in range(max_steps):
            if written >= num_episodes:
                break
            expert_action = act()
            action = expert_action
            if noise > 0:
                action = (action + noise * torch.randn(action.shape, generator=gen).to(action.device)).clamp(-1, 1)
            recorded = expert_action if label == "expert" else action
            instructions = list(obs["instruction"])
            for i in range(num_envs):
                for k in keys:
                    buffers[i][k].append(obs[k][i].cpu().numpy())
                buffers[i]["action"].append(recorded[i].cpu().numpy())
            obs, _, term, trunc, info = env.step(action)
            for i in (term | trunc).nonzero().flatten().tolist():
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
    env.close()
    return {"path": str(path), "written": written, "attempted": attempted,
            "success_rate": successes / max(attempted, 1)}


def _empty(keys):
    return {k: [] for k in (*keys, "action")}
