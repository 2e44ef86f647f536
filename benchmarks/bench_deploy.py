"""Deploy benchmark: per-chunk latency of the exported bundle on ONNX Runtime (CPU), and the policy
server's round-trip overhead over loopback.

    python benchmarks/bench_deploy.py [--iters 200] [--threads 0] [--sizes tiny base]

Policy: action dim 7, state dim 16, horizon 16, one 64x64 camera, hash language, DDIM with K = 10
(every step stochastic), batch 1 (one robot). "chunk" = one ``predict_chunk`` call (language lookup
+ the whole unrolled K-step graph). "server overhead" = median ``PolicyClient.act`` round trip minus
median local ``ControlSession.act`` on the same runtime, both re-planning every step (ensemble mode).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vla_rl.deploy import PolicyRuntime
from vla_rl.deploy.server import PolicyClient, start_server_thread
from vla_rl.export import export_bundle
from vla_rl.policy import DIT_SIZES, NoiseConfig, PolicyConfig, VLAPolicy


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def make_policy(size: str) -> VLAPolicy:
    cfg = PolicyConfig(action_dim=7, state_dim=16, horizon=16, exec_steps=8, cameras=["front"], image_size=[64, 64],
                       language_encoder="hash", dit=DIT_SIZES[size], noise=NoiseConfig(kind="ddim", sample_steps=10))
    torch.manual_seed(0)
    policy = VLAPolicy(cfg).eval()
    with torch.no_grad():
        for p in policy.head.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy


def obs(rng):
    return {"state": rng.standard_normal(16).astype(np.float32), "rgb": rng.integers(0, 256, (1, 3, 64, 64), dtype=np.uint8),
            "instruction": "pick up the red cube and put it in the bin", "timestamp": time.time()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            policy = make_policy(size)
            t0 = time.perf_counter()
            bundle = export_bundle(policy, Path(tmp) / size, hold="last")  # synthetic policy: no task
            export_s = time.perf_counter() - t0
            onnx_mb = (bundle / "policy.onnx").stat().st_size / 2**20
            rt = PolicyRuntime.load(bundle, threads=args.threads or None)
            iters = args.iters if size != "base" else max(20, args.iters // 4)
            for _ in range(5):  # warm-up
                o = obs(rng)
                rt.predict_chunk(o["state"][None], [o["instruction"]], o["rgb"][None], rng=rng)
            chunk = []
            for _ in range(iters):
                o = obs(rng)
                t = time.perf_counter()
                rt.predict_chunk(o["state"][None], [o["instruction"]], o["rgb"][None], rng=rng)
                chunk.append(time.perf_counter() - t)
            local_session = rt.session(mode="ensemble")
            local = []
            for _ in range(iters):
                o = obs(rng)
                t = time.perf_counter()
                local_session.act(o)
                local.append(time.perf_counter() - t)
            srv = start_server_thread(rt)
            remote = []
            with PolicyClient(srv.url, session={"mode": "ensemble"}) as client:
                for _ in range(5):
                    client.act(obs(rng))
                for _ in range(iters):
                    o = obs(rng)
                    t = time.perf_counter()
                    client.act(o)
                    remote.append(time.perf_counter() - t)
            srv.stop()
            overhead = statistics.median(remote) - statistics.median(local)
            rows.append((size, f"{policy.cfg.dit.d_model} x {policy.cfg.dit.n_layers}", onnx_mb, export_s, iters,
                         pct(chunk, 50), pct(chunk, 99), pct(local, 50), pct(remote, 50), pct(remote, 99),
                         overhead * 1e3))
    print(f"ONNX Runtime CPU, batch 1, K=10, horizon 16, 1 camera 64x64; intra-op threads: {args.threads or 'default'}")
    print("| head | d_model x layers | policy.onnx MB | export s | iters | chunk p50 ms | chunk p99 ms | local act p50 ms "
          "| server act p50 ms | server act p99 ms | server overhead ms (p50 diff) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f} | {r[8]:.2f} "
              f"| {r[9]:.2f} | {r[10]:.2f} |")


if __name__ == "__main__":
    main()
