"""Does the exported bundle succeed as often as the torch policy it came from? (issue 5)

    python benchmarks/bench_export_sim.py --policy runs/demo/pretrained --task place --episodes 200

Exports the policy, then evaluates (a) the torch policy through ``vla_rl.evaluate.evaluate`` and (b) the
bundle through the torch-free runtime in the loop (``evaluate_bundle``: per-env ControlSession with the
action queue and safety filter), on the same task and env seeds. The two use different noise streams,
so they agree only within sampling noise: compare the 95% intervals.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from vla_rl.deploy import PolicyRuntime
from vla_rl.envs import make_env
from vla_rl.evaluate import evaluate, evaluate_bundle
from vla_rl.export import export_bundle
from vla_rl.policy import VLAPolicy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--task", default="place")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--num-envs", type=int, default=25)
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args()
    policy = VLAPolicy.from_pretrained(args.policy)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(args.policy, f"{tmp}/bundle", env=args.task)
        t = time.time()
        with torch.no_grad():
            torch_result = evaluate(policy, make_env(args.task, args.num_envs), args.episodes, seed=args.seed)
        rows.append(("torch policy", torch_result, time.time() - t))
        t = time.time()
        bundle_result = evaluate_bundle(PolicyRuntime.load(bundle), make_env(args.task, args.num_envs), args.episodes,
                                        seed=args.seed)
        rows.append(("exported bundle (onnxruntime, safety filter)", bundle_result, time.time() - t))
    print(f"| policy | episodes | success | 95% CI | mean length | eval s |")
    print("|---|---|---|---|---|---|")
    for name, r, dt in rows:
        low, high = r["success_ci95"]
        print(f"| {name} | {r['num_episodes']} | {r['success_rate']:.3f} | {low:.3f}-{high:.3f} | {r['mean_length']:.1f} | {dt:.0f} |")
    print(f"safety holds in the bundle run: {bundle_result['holds']}")


if __name__ == "__main__":
    main()
