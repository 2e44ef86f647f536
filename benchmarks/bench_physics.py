"""The physics step of the built-in tasks: expert success and env cost, today's step against the former one.
Not a test.

    python benchmarks/bench_physics.py [--episodes 64]

Today's scenes (envs/tasks/scene.py) step 10 ms with the Euler integrator, 10 steps per 10 Hz control step;
until stop 15 they stepped 4 ms with implicitfast, 25 per control step. A cheaper step is only a speed-up if
the task still means the same: the scripted experts must keep their success at every action-noise level and
randomization preset. Each row runs the expert on the same seeded episodes under both steps.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import asdict
from pathlib import Path

import torch
from vla_rl.config import load_config
from vla_rl.envs import EnvConfig, make_env
from vla_rl.envs.experts import evaluate_expert
from vla_rl.envs.randomization import RandomizationConfig
from vla_rl.envs.tasks import scene


@contextlib.contextmanager
def former_physics():
    """Build scenes with the step used until stop 15 (an env keeps the model it compiled)."""
    saved = scene.TIMESTEP, scene.INTEGRATOR
    scene.TIMESTEP, scene.INTEGRATOR = 0.004, "implicitfast"
    try:
        yield
    finally:
        scene.TIMESTEP, scene.INTEGRATOR = saved


# The dynamics of configs/randomization/train.yaml and heldout.yaml (the held-out visual factors do not
# touch a state-based expert).
_PRESETS = Path(__file__).parents[1] / "configs/randomization"
RANDOMIZATION = {"none": None} | {
    split: {"split": split, "dynamics": asdict(load_config(EnvConfig, [_PRESETS / f"{split}.yaml"]).randomization.dynamics)}
    for split in ("train", "heldout")}
CASES = [(0.0, "none"), (0.1, "none"), (0.2, "none"), (0.1, "train"), (0.1, "heldout")]


def env_steps_per_s(task: str, num_envs: int = 32, steps: int = 100) -> float:
    env = make_env(task, num_envs, seed=0)
    env.reset(seed=0)
    action = torch.zeros(num_envs, env.spec.action_dim)
    t = time.perf_counter()
    for _ in range(steps):
        env.step(action)
    rate = num_envs * steps / (time.perf_counter() - t)
    env.close()
    return rate


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--tasks", nargs="+", default=["lift", "place", "handover"])
    a = p.parse_args()
    torch.set_num_threads(1)
    cols = " | ".join(f"noise {n}, {r}" for n, r in CASES)
    print(f"| task | physics | {cols} | env steps/s (32 envs, 1 process) |")
    print("|---|---|" + "---|" * (len(CASES) + 1))
    for task in a.tasks:
        for name, ctx in (("4 ms x 25 implicitfast (former)", former_physics), ("10 ms x 10 Euler", contextlib.nullcontext)):
            with ctx():
                rates = [evaluate_expert(task, num_episodes=a.episodes, num_envs=32, noise=n, seed=7,
                                         randomization=RandomizationConfig.from_dict(RANDOMIZATION[r]) if RANDOMIZATION[r] else None)
                         for n, r in CASES]
                speed = env_steps_per_s(task)
            print(f"| {task} | {name} | " + " | ".join(f"{x:.2f}" for x in rates) + f" | {speed:.0f} |", flush=True)
    for name, ctx in (("former", former_physics), ("today", contextlib.nullcontext)):
        with ctx():
            print(f"place with the arm, {name} physics: expert {evaluate_expert('place', num_episodes=32, num_envs=32, seed=0, arm=True):.2f}")


if __name__ == "__main__":
    main()
