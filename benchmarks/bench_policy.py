"""Policy benchmark: parameter counts of the named sizes, and chain-sampling throughput on CPU.

    python benchmarks/bench_policy.py [--repeats 5] [--batch 64] [--params-only]

Throughput = action chunks sampled per second (batch of observations, full chain of K steps, all K
stochastic, state + language observation, tiny head), median over repeats; K = 10 and K = 100.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vla_rl.policy import DIT_SIZES, NoiseConfig, PolicyConfig, VLAPolicy
from vla_rl.policy.dit import DiTActionHead


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--params-only", action="store_true", help="parameter counts only (no timing)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| size | d_model x layers | action-head params | full policy params (1 camera, hash language) |")
    print("|---|---|---|---|")
    for name, dit in DIT_SIZES.items():
        with torch.device("meta"):
            head = DiTActionHead(dit, action_dim=7, horizon=16)
            cfg = PolicyConfig(action_dim=7, state_dim=16, horizon=16, cameras=["front"], language_encoder="hash", dit=dit)
            full = VLAPolicy(cfg)
        print(f"| {name} | {dit.d_model} x {dit.n_layers} | {count(head) / 1e6:.2f} M | {count(full) / 1e6:.2f} M |")
    if args.params_only:
        return

    print(f"\nchain sampling, tiny head, batch {args.batch}, torch threads {torch.get_num_threads()}")
    print("| K | kind | chunks/s (median) | min | max |")
    print("|---|---|---|---|---|")
    for kind in ("ddim", "flow"):
        for k in (10, 100):
            cfg = PolicyConfig(action_dim=7, state_dim=16, horizon=16, language_encoder="hash", dit=DIT_SIZES["tiny"],
                               noise=NoiseConfig(kind=kind, sample_steps=k, train_steps=max(100, k)))
            policy = VLAPolicy(cfg).eval()
            obs = {"state": torch.randn(args.batch, 16), "instruction": ["pick up the red cube"] * args.batch}
            rates = []
            with torch.inference_mode():
                policy.sample(obs)  # warm-up
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    policy.sample(obs)
                    rates.append(args.batch / (time.perf_counter() - t))
            print(f"| {k} | {kind} | {statistics.median(rates):.0f} | {min(rates):.0f} | {max(rates):.0f} |")


if __name__ == "__main__":
    main()
