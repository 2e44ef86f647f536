"""End-to-end speed of the DPPO loop on `place` (state + language) per action head, side by side in one
process (heads interleaved, so machine load hits them alike): per-phase seconds of an iteration (collect =
env + chain sampling + critic; update = PPO epochs) and env steps/s. Not a test.

    python benchmarks/bench_loop.py --heads dit mlp256 mlp512 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vla_rl.algos import DPPOConfig
from vla_rl.envs import make_env
from vla_rl.policy import PolicyConfig, VLAPolicy
from vla_rl.runner import Runner, RunnerConfig, TrainConfig

HEADS = {"dit": {"head": "dit"}, "mlp256": {"head": "mlp", "mlp_head": {"hidden": 256}},
         "mlp512": {"head": "mlp", "mlp_head": {"hidden": 512}}}


def make_runner(head: str, num_envs: int, decisions: int, horizon: int) -> Runner:
    env = make_env("place", num_envs, seed=0)
    cfg = PolicyConfig(action_dim=env.spec.action_dim, state_dim=env.spec.state_dim,
                       privileged_dim=env.spec.privileged_dim, horizon=horizon, exec_steps=4, language_encoder="hash")
    for k, v in HEADS[head].items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                setattr(getattr(cfg, k), kk, vv)
        else:
            setattr(cfg, k, v)
    cfg.noise.stochastic_steps = 5
    policy = VLAPolicy(cfg)
    tc = TrainConfig(algo="dppo", dppo=DPPOConfig(n_critic_warmup_itr=0, target_kl=0.0),
                     runner=RunnerConfig(iterations=10**6, num_envs=num_envs, steps_per_iter=decisions, eval_every=0,
                                         checkpoint_every=0, resume=False, progress=False, log_dir=f"runs/bench_loop/{head}"))
    return Runner(tc, policy=policy, env=env)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="+", default=list(HEADS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=2, help="timed iterations per head per round (after 1 warm-up)")
    p.add_argument("--num-envs", type=int, default=32)
    p.add_argument("--decisions", type=int, default=10)
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    runners = {h: make_runner(h, a.num_envs, a.decisions, a.horizon) for h in a.heads}
    times = {h: {"collect": [], "update": []} for h in a.heads}
    for r in runners.values():  # warm-up
        r.algo.update(r.collect()[0])
    for _ in range(a.rounds):
        for h, r in runners.items():
            for _ in range(a.iters):
                t0 = time.perf_counter()
                buf, _ = r.collect()
                t1 = time.perf_counter()
                r.algo.update(buf)
                times[h]["collect"].append(t1 - t0)
                times[h]["update"].append(time.perf_counter() - t1)
    steps = a.num_envs * a.decisions * 4
    base = None
    print(f"| head | params (head) | collect s/iter | update s/iter | env steps/s | vs {a.heads[0]} |")
    print("|---|---|---|---|---|---|")
    for h, r in runners.items():
        c, u = statistics.median(times[h]["collect"]), statistics.median(times[h]["update"])
        sps = steps / (c + u)
        base = base or sps
        n = sum(p.numel() for p in r.policy.head.parameters())
        print(f"| {h} | {n / 1e3:.0f}k | {c:.2f} | {u:.2f} | {sps:.0f} | {sps / base:.2f}x |")


if __name__ == "__main__":
    main()
