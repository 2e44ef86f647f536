"""Collect scripted-expert demonstrations from the batched env into a demo file (``vla_rl.data``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

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
    cameras: tuple[str, ...] = (),
    image_size: tuple[int, int] = (128, 128),
    keep_failed: bool = False,
    randomization=None,
    max_steps: int | None = None,
    **env_kwargs,
) -> dict:
    """Run the expert in ``num_envs`` parallel envs until ``num_episodes`` episodes are written.

    Each step records the observation the action was taken from (``state``, ``privileged``,
    ``rgb`` when cameras are on). Returns ``{"path", "written", "attempted", "success_rate"}``.
    """
    env = make_env(task, num_envs, cameras=tuple(cameras), image_size=tuple(image_size),
                   randomization=randomization, seed=seed, **env_kwargs)
    act = make_expert(env, noise=noise, seed=seed)
    obs = env.reset(seed=seed)
    keys = [k for k in ("state", "privileged", "rgb") if k in obs]
    buffers = [_empty(keys) for _ in range(num_envs)]
    written = attempted = successes = 0
    max_steps = max_steps or 50 * num_episodes * env.spec.max_episode_steps
    with EpisodeWriter(out_path) as writer, tqdm(total=num_episodes, desc=f"collect {task}") as bar:
        for _ in range(max_steps):
            if written >= num_episodes:
                break
            action = act()
            instructions = list(obs["instruction"])
            for i in range(num_envs):
                for k in keys:
                    buffers[i][k].append(obs[k][i].cpu().numpy())
                buffers[i]["action"].append(action[i].cpu().numpy())
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
