"""How much of a policy's outcome on `place` is decided by its own sampling noise. Not a test.

    python benchmarks/bench_spread.py runs/bench_learning/bc [--deterministic] [--init-scale 1.0]

G rollouts start from each of S identical starts (``reset_group``: same scene, instruction and
randomization draw; the physics is deterministic), and the script counts per start how many succeed.
A start is "contested" when some rollouts succeed and others fail: there the outcome is decided by the
sampler's noise (the initial noise x_K and, unless --deterministic, the stochastic transitions), not by
the scene. --init-scale sets the std of x_K (``NoiseConfig.init_scale``; 0 = every chunk starts at the mode).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
from math import comb

import torch

from vla_rl.envs import make_env
from vla_rl.policy import VLAPolicy


@torch.no_grad()
def successes_per_start(policy, group: int, rounds: int, deterministic: bool, num_envs: int = 64,
                        seed: int = 1000) -> list[int]:
    """Successes out of ``group`` for each of rounds * num_envs / group starts (first episode of each env)."""
    env = make_env("place", num_envs, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    counts = []
    for r in range(rounds):
        obs = env.reset_group(group, seed=seed + r)
        success = torch.zeros(num_envs, dtype=torch.bool)
        done = torch.zeros(num_envs, dtype=torch.bool)
        while not done.all():
            chunk = policy.sample(obs, deterministic=deterministic, generator=gen).actions
            obs, _, term, trunc, info = env.step(chunk[:, : policy.cfg.exec_steps])
            ended = (term | trunc) & ~done
            success |= ended & info["success"]
            done |= ended
        counts += success.view(-1, group).sum(1).tolist()
    env.close()
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("policy")
    ap.add_argument("--group", type=int, default=8, help="rollouts per start")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of 64 envs (64 / group starts each)")
    ap.add_argument("--deterministic", action="store_true", help="deterministic transitions (x_K still drawn)")
    ap.add_argument("--init-scale", type=float, default=1.0)
    ap.add_argument("--std-floor", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--former-physics", action="store_true", help="the physics step used until stop 15 (bench_physics.py)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    policy = VLAPolicy.from_pretrained(a.policy, noise={"stochastic_steps": 5, "std_floor": a.std_floor,
                                                        "init_scale": a.init_scale})
    from bench_physics import former_physics  # benchmarks/, beside this script

    with former_physics() if a.former_physics else contextlib.nullcontext():
        counts = successes_per_start(policy, a.group, a.rounds, a.deterministic)
    n, hist = len(counts), collections.Counter(counts)
    print(f"{a.policy} (deterministic={a.deterministic}, init_scale={a.init_scale}, std_floor={a.std_floor}): "
          f"{n} starts x {a.group} rollouts, success {sum(counts) / (n * a.group):.3f}")
    print("starts by successes:", {k: hist[k] for k in range(a.group + 1)})
    print(f"never {hist[0] / n:.2f}, always {hist[a.group] / n:.2f}, contested {1 - (hist[0] + hist[a.group]) / n:.2f}")
    # The ceiling of a noise picker that tries g draws per start: the chance that g of the G rollouts (drawn
    # without replacement) hold a success, averaged over starts.
    best = {g: sum(1 - comb(a.group - c, g) / comb(a.group, g) for c in counts) / n
            for g in (1, 2, 4, 8, 16, 32, 64) if g <= a.group}
    print("solved by at least one of g draws:", ", ".join(f"g={g}: {v:.2f}" for g, v in best.items()))


if __name__ == "__main__":
    main()
