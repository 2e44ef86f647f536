"""MuJoCo CPU backend throughput: env steps/s (one step = one 10 Hz control step = 25 physics steps)
for N = 1, 16, 64, state only and with one 128x128 camera, next to a bare ``mj_step`` loop over the
same model in the same run (overhead ratio), and the time per rendered frame. Median of repeats.

    python benchmarks/bench_envs.py [--task lift] [--steps 20] [--repeats 3]
    python benchmarks/bench_envs.py --task place --workers 1 2   # multi-process envs (make_env(workers=W))
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: headless rendering

import mujoco  # noqa: E402
import torch  # noqa: E402

from vla_rl.envs import make_env


def _median_rate(fn, steps: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(steps)
        rates.append(steps / (time.perf_counter() - t))
    return statistics.median(rates)


def bench_env(task, n, cameras, steps, repeats, workers=1):
    env = make_env(task, n, cameras=cameras, image_size=(128, 128), seed=0, max_episode_steps=10**6, workers=workers)
    env.reset(seed=0)
    gen = torch.Generator().manual_seed(0)

    def run(k):
        for _ in range(k):
            env.step(torch.rand(n, env.spec.action_dim, generator=gen) * 0.2 - 0.1)

    run(2)  # warm-up (renderer creation)
    rate = _median_rate(run, steps, repeats) * n
    env.close()
    return rate, env


def bench_bare(env, n, steps, repeats):
    model = env.base_model
    datas = [mujoco.MjData(model) for _ in range(n)]
    for d in datas:
        mujoco.mj_forward(model, d)

    def run(k):
        for _ in range(k):
            for d in datas:
                mujoco.mj_step(model, d, nstep=env.substeps)

    return _median_rate(run, steps, repeats) * n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="lift")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="*", default=[],
                   help="compare these worker-process counts instead (N = 32, 64; state and camera)")
    args = p.parse_args()
    if args.workers:
        return compare_workers(args)
    print(f"task={args.task}  torch threads={torch.get_num_threads()}  mujoco {mujoco.__version__}")
    print(f"{'N':>4} {'obs':>10} {'env steps/s':>12} {'bare mj_step steps/s':>21} {'overhead':>9} {'ms/frame':>9}")
    for n in (1, 16, 64):
        state_rate, env = bench_env(args.task, n, (), args.steps, args.repeats)
        bare = bench_bare(env, n, args.steps, args.repeats)
        print(f"{n:>4} {'state':>10} {state_rate:>12.0f} {bare:>21.0f} {bare / state_rate:>8.2f}x {'-':>9}")
        cam_rate, _ = bench_env(args.task, n, ("front",), max(args.steps // 4, 3), args.repeats)
        frame_ms = 1000.0 * (1.0 / cam_rate - 1.0 / state_rate)
        print(f"{n:>4} {'128px cam':>10} {cam_rate:>12.0f} {bare:>21.0f} {bare / cam_rate:>8.2f}x {frame_ms:>9.2f}")


def compare_workers(args):
    print(f"task={args.task}  cpu cores={os.cpu_count()}  mujoco {mujoco.__version__}")
    print(f"{'N':>4} {'obs':>10} {'workers':>8} {'env steps/s':>12} {'vs 1 worker':>12}")
    for n in (32, 64):
        for cams, label, steps in (((), "state", args.steps), (("front",), "128px cam", max(args.steps // 4, 3))):
            base = None
            for w in args.workers:
                rate, _ = bench_env(args.task, n, cams, steps, args.repeats, workers=w)
                base = base or rate
                print(f"{n:>4} {label:>10} {w:>8} {rate:>12.0f} {rate / base:>11.2f}x", flush=True)


if __name__ == "__main__":
    main()
