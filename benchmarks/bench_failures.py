"""Failure modes of a policy on `place`: how each of N held-out episodes ended. Not a test.

    python benchmarks/bench_failures.py runs/bench_learning/bc [--deterministic] [--episodes 128]

Classes (first that applies): success; grasped the other object and never the target; never grasped the
target; grasped it and brought it within 6 cm of the goal container without success; grasped it but did
not reach the container. "Grasped" is the `vla_rl.rewards.grasped` predicate (object between the
fingers, fingers closed on it), checked after every executed chunk.
"""

from __future__ import annotations

import argparse
import collections

import torch

from vla_rl.envs import make_env
from vla_rl.policy import VLAPolicy
from vla_rl.rewards import grasped
from vla_rl.envs.tasks import OBJ_WIDTH


@torch.no_grad()
def failure_modes(policy, episodes: int, deterministic: bool, seed: int = 100, num_envs: int = 32) -> dict:
    env = make_env("place", num_envs, seed=seed)
    obs = env.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    n, rows = env.num_envs, torch.arange(env.num_envs)
    grasp_target = torch.zeros(n, dtype=torch.bool)
    grasp_other = torch.zeros(n, dtype=torch.bool)
    closest = torch.full((n,), float("inf"))  # closest xy distance of the target to the goal container
    quota = torch.full((n,), episodes // n)
    quota[: episodes % n] += 1
    done = torch.zeros(n, dtype=torch.long)
    counts = collections.Counter()
    while (done < quota).any():
        actions = policy.sample(obs, deterministic=deterministic, generator=gen).actions[:, : policy.cfg.exec_steps]
        target, goal = env.episode.target.clone(), env.episode.goal.clone()  # before auto-reset replaces them
        obs, _, term, trunc, info = env.step(actions)
        s = env.task_state()  # after the reset of ended envs: only the still-running envs' state is theirs
        ended = term | trunc
        running = ~ended
        tpos, opos = s.obj_pos[rows, target], s.obj_pos[rows, 1 - target]
        grasp_target |= grasped(tpos, s.tcp[:, 0], s.gap[:, 0], OBJ_WIDTH) & running
        grasp_other |= grasped(opos, s.tcp[:, 0], s.gap[:, 0], OBJ_WIDTH) & running
        dist = (tpos[:, :2] - s.container_pos[rows, goal][:, :2]).norm(dim=-1)
        closest = torch.where(running, torch.minimum(closest, dist), closest)
        for i in ended.nonzero().flatten().tolist():
            if done[i] < quota[i]:
                done[i] += 1
                if info["success"][i]:
                    counts["success"] += 1
                elif grasp_other[i] and not grasp_target[i]:
                    counts["wrong object"] += 1
                elif not grasp_target[i]:
                    counts["never grasped the target"] += 1
                elif closest[i] < 0.06:
                    counts["at the container, no success"] += 1
                else:
                    counts["grasped, container not reached"] += 1
            grasp_target[i] = grasp_other[i] = False
            closest[i] = float("inf")
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items())} | {"episodes": total}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("policy")
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--episodes", type=int, default=128)
    ap.add_argument("--std-floor", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--init-scale", type=float, default=None, help="std of the initial noise (default: the policy's)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    noise = {"stochastic_steps": 5, "std_floor": a.std_floor}
    if a.init_scale is not None:
        noise["init_scale"] = a.init_scale
    policy = VLAPolicy.from_pretrained(a.policy, noise=noise)
    res = failure_modes(policy, a.episodes, a.deterministic, seed=a.seed)
    print(a.policy, "deterministic" if a.deterministic else f"sampled (floor {a.std_floor})",
          ", ".join(f"{k}: {v:.3f}" if k != "episodes" else f"{k}: {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
