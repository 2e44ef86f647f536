"""End-to-end speed of the DPPO loop on `place` (state + language) per setup, side by side in one process
(setups interleaved, so machine load hits them alike): per-phase seconds of an iteration (collect = env +
chain sampling + critic; update = PPO epochs) and env steps/s. Not a test.

    python benchmarks/bench_loop.py --setups issue13 dit mlp256 mlp512 preset gauss_h1 --rounds 3 --threads 1

A setup fixes the policy (head, chunk, denoising process) and the update's shape (decisions per iteration,
minibatches, what is trained). ``issue13`` is the loop issue 13 measured (tiny DiT, H = 8 executing 4, DDIM
K = 10 with K' = 5, 32 envs x 10 decisions, 4 minibatches, the whole network trained); ``preset`` is stop 15's
BC recipe (MLP 512 head, trunk, chunks of 4, flow K' = 5) fine-tuned as the 50-demo RL benchmarks run it (32
decisions, 8 minibatches, head only); ``preset_bf16_k1*`` fine-tune only the last transition, and
``preset_bf16_k1_64x2`` fixes its own envs and env workers (ENVS); ``h1_k1*`` are today's preset (one action
per decision, no trunk, K' = 1). Every setup runs all of its update epochs (5; ``*_e2``: 2) with the target
KL off, so the work per iteration is fixed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from vla_rl.algos import DPPOConfig
from vla_rl.envs import make_env
from vla_rl.policy import PolicyConfig, VLAPolicy
from vla_rl.runner import Runner, RunnerConfig, TrainConfig

from bench_physics import former_physics  # benchmarks/, beside this script

# Setups that run on the physics of issue 13's time (4 ms x 25 implicitfast steps per control step; today
# 10 ms x 10 Euler, envs/tasks/scene.py), so that the side-by-side compares against the loop as it was.
FORMER_PHYSICS = {"issue13", "preset_former"}


# name -> (policy overrides, decisions per env per iteration, DPPO overrides)
SETUPS = {
    "issue13": ({"head": "dit", "horizon": 8}, 10, {"train_encoders": True}),
    "dit": ({"head": "dit", "horizon": 8}, 10, {}),
    "mlp256": ({"head": "mlp", "mlp_head": {"hidden": 256}, "horizon": 8}, 10, {}),
    "mlp512": ({"head": "mlp", "mlp_head": {"hidden": 512}, "horizon": 8}, 10, {}),
    "preset": ({"head": "mlp", "mlp_head": {"hidden": 512}, "horizon": 4, "noise": {"kind": "flow"}}, 32,
               {"num_minibatches": 8}),
    "gauss_h1": ({"head": "mlp", "mlp_head": {"hidden": 512}, "horizon": 1, "exec_steps": 1,
                  "noise": {"kind": "gaussian", "sample_steps": 1}}, 128, {"num_minibatches": 8}),
}
SETUPS["preset_former"] = SETUPS["preset"]  # on the former physics (FORMER_PHYSICS)
SETUPS["preset_bf16"] = ({**SETUPS["preset"][0], "head_dtype": "bfloat16"}, *SETUPS["preset"][1:])
# DPPO fine-tuning only the last transition (K' = 1): an update over one transition per decision, not five.
SETUPS["preset_bf16_k1"] = ({**SETUPS["preset_bf16"][0], "noise": {"kind": "flow", "stochastic_steps": 1}},
                            *SETUPS["preset"][1:])
# The same update (4,096 env steps in 8 minibatches) collected by 64 envs x 16 decisions in 2 env worker
# processes: larger chain-sampling batches, and the two halves' physics at once, one per core.
SETUPS["preset_bf16_k1_64x2"] = (SETUPS["preset_bf16_k1"][0], 16, SETUPS["preset"][2])
# Today's preset (configs/train/place_dppo.yaml, the demo): one action per decision, no trunk, K' = 1, the head's
# dtype as the demo picks it ("auto": bfloat16 only where the CPU has native bfloat16, else float32; forced
# bfloat16 on a CPU without it runs several times slower); 4,096 env steps per update as 32 envs x 128
# decisions, or 64 envs x 64 in 2 env worker processes.
SETUPS["h1_k1"] = ({"head": "mlp", "mlp_head": {"hidden": 512}, "horizon": 1, "exec_steps": 1, "fusion_layers": 0,
                    "head_dtype": "auto", "noise": {"kind": "flow", "stochastic_steps": 1}}, 128,
                   {"num_minibatches": 8})
SETUPS["h1_k1_64x2"] = (SETUPS["h1_k1"][0], 64, SETUPS["h1_k1"][2])
# The same with 5 flow steps per chain instead of 10 (the flow is trained on continuous time, so the number of
# steps is a sampling choice; on `place` BC succeeds as often with 5, BENCHMARKS.md).
SETUPS["h1_k5"] = ({**SETUPS["h1_k1"][0], "noise": {"kind": "flow", "stochastic_steps": 1, "sample_steps": 5}},
                   *SETUPS["h1_k1"][1:])
SETUPS["h1_k5_64x2"] = (SETUPS["h1_k5"][0], 64, SETUPS["h1_k5"][2])
# The same update as 128 envs x 32 decisions or 256 x 16: chain sampling in larger batches (a bfloat16 head's
# matmuls are overhead-bound at batch 32-64), episodes cut and bootstrapped more often.
SETUPS["h1_k5_128x2"] = (SETUPS["h1_k5"][0], 32, SETUPS["h1_k5"][2])
SETUPS["h1_k5_256x2"] = (SETUPS["h1_k5"][0], 16, SETUPS["h1_k5"][2])
# The demo's loop with a 256-wide head (~4x fewer head FLOPs): on a CPU without bfloat16 the head's float32
# matmuls are most of the loop (BENCHMARKS.md, stop 18).
SETUPS["h1_k5_64x2_w256"] = ({**SETUPS["h1_k5"][0], "mlp_head": {"hidden": 256}}, 64, SETUPS["h1_k5"][2])
# The same with 2 update epochs instead of 5 (the update is compute-bound: its matmuls are most of it).
SETUPS["h1_k5_64x2_w256_e2"] = (SETUPS["h1_k5_64x2_w256"][0], 64, {**SETUPS["h1_k5"][2], "update_epochs": 2})
# setup -> (num envs, env worker processes) where a setup fixes them; the others take --num-envs / --workers
ENVS = {"preset_bf16_k1_64x2": (64, 2), "h1_k1_64x2": (64, 2), "h1_k5_64x2": (64, 2), "h1_k5_128x2": (128, 2),
        "h1_k5_256x2": (256, 2), "h1_k5_64x2_w256": (64, 2), "h1_k5_64x2_w256_e2": (64, 2)}


def apply(obj, overrides: dict) -> None:
    for k, v in overrides.items():
        if isinstance(v, dict):
            apply(getattr(obj, k), v)
        else:
            setattr(obj, k, v)


def make_runner(setup: str, num_envs: int, workers: int = 1) -> tuple[Runner, int]:
    policy_over, decisions, dppo_over = SETUPS[setup]
    with former_physics() if setup in FORMER_PHYSICS else contextlib.nullcontext():
        env = make_env("place", num_envs, seed=0, workers=workers)
    cfg = PolicyConfig(action_dim=env.spec.action_dim, state_dim=env.spec.state_dim,
                       privileged_dim=env.spec.privileged_dim, exec_steps=4, language_encoder="hash")
    cfg.noise.stochastic_steps = 5
    apply(cfg, policy_over)
    if cfg.noise.kind == "gaussian":
        cfg.noise.stochastic_steps = 0
    dppo = DPPOConfig(n_critic_warmup_itr=0, target_kl=0.0, kl_revert=0.0)
    apply(dppo, dppo_over)
    tc = TrainConfig(algo="dppo", dppo=dppo,
                     runner=RunnerConfig(iterations=10**6, num_envs=num_envs, steps_per_iter=decisions, eval_every=0,
                                         checkpoint_every=0, resume=False, progress=False,
                                         log_dir=f"runs/bench_loop/{setup}"))
    return Runner(tc, policy=VLAPolicy(cfg), env=env), num_envs * decisions * cfg.exec_steps


def time_env_steps(runner: Runner) -> list[float]:
    """Wrap ``runner.env.step`` so the seconds the collect waits on the env accumulate in the returned cell."""
    spent, step = [0.0], runner.env.step

    def timed_step(action):
        t0 = time.perf_counter()
        out = step(action)
        spent[0] += time.perf_counter() - t0
        return out

    runner.env.step = timed_step
    return spent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", default=["issue13", "preset"], choices=list(SETUPS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=2, help="timed iterations per setup per round (after 1 warm-up)")
    p.add_argument("--num-envs", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="env worker processes (make_env(workers=W))")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    runners = {s: make_runner(s, *ENVS.get(s, (a.num_envs, a.workers))) for s in a.setups}
    times = {s: {"collect": [], "update": [], "env": []} for s in a.setups}
    env_seconds = {s: time_env_steps(r) for s, (r, _) in runners.items()}
    for r, _ in runners.values():  # warm-up
        r.algo.update(r.collect()[0])
    for _ in range(a.rounds):
        for s, (r, _) in runners.items():
            for _ in range(a.iters):
                env_seconds[s][0] = 0.0
                t0 = time.perf_counter()
                buf, _ = r.collect()
                t1 = time.perf_counter()
                r.algo.update(buf)
                times[s]["collect"].append(t1 - t0)
                times[s]["update"].append(time.perf_counter() - t1)
                times[s]["env"].append(env_seconds[s][0])
            print(f"  {s}: collect {times[s]['collect'][-1]:.2f} s, update {times[s]['update'][-1]:.2f} s", flush=True)
    base = None
    # "env.step s": the part of the collect spent waiting on env.step (physics, IPC); the rest is the policy's.
    print(f"| setup | head params | env steps/iter | collect s/iter | of which env.step s | update s/iter | env steps/s "
          f"| vs {a.setups[0]} |")
    print("|---|---|---|---|---|---|---|---|")
    for s, (r, steps) in runners.items():
        c, u, e = (statistics.median(times[s][k]) for k in ("collect", "update", "env"))
        sps = steps / (c + u)
        base = base or sps
        n = sum(p.numel() for p in r.policy.head.parameters())
        print(f"| {s} | {n / 1e3:.0f}k | {steps} | {c:.2f} | {e:.2f} | {u:.2f} | {sps:.0f} | {sps / base:.2f}x |")


if __name__ == "__main__":
    main()
