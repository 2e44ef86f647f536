"""How fragile a BC policy is to noise on its own actions: success on `place` when N(0, std) is added to every
executed action (normalized units, clamped to [-1, 1]), on all action dimensions, on the position deltas only or
on the gripper only. The library's policy acts through its deterministic chain (from x_K = 0 with
``--init-scale 0``); ``--mlp DEMOS`` trains and probes bench_bc's 2 x 256 tanh MLP control on the same demos
instead. Not a test.

    python benchmarks/bench_action_noise.py --policy runs/demo/pretrained [--init-scale 0]
    python benchmarks/bench_action_noise.py --mlp runs/demo/demos
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vla_rl.envs import make_env
from vla_rl.evaluate import run_episodes
from vla_rl.policy import VLAPolicy

from bench_bc import train_mlp  # benchmarks/, beside this script

LEVELS = [(0.0, "all"), (0.1, "all"), (0.22, "all"), (0.22, "xyz"), (0.22, "gripper"), (0.35, "all")]
MASKS = {"all": [1.0, 1.0, 1.0, 1.0], "xyz": [1.0, 1.0, 1.0, 0.0], "gripper": [0.0, 0.0, 0.0, 1.0]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", help="a library policy directory")
    p.add_argument("--init-scale", type=float, default=None, help="override noise.init_scale (0: x_K at its mode)")
    p.add_argument("--mlp", help="demos to train bench_bc's Gaussian MLP control on (3,000 steps, hash language)")
    p.add_argument("--episodes", type=int, default=128)
    p.add_argument("--seed", type=int, default=10_000, help="eval episodes (the demo's are 10,000)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if bool(a.policy) == bool(a.mlp):
        p.error("give exactly one of --policy and --mlp")
    torch.set_num_threads(a.threads)
    if a.policy:
        over = {"noise": {"init_scale": a.init_scale}} if a.init_scale is not None else {}
        policy = VLAPolicy.from_pretrained(a.policy, **over)
        if policy.cfg.action_dim != 4:
            p.error("the dimension groups are `place`'s: 3 position deltas and the gripper")
        chain_noise = torch.Generator()

        def mean_action(obs):
            return policy.sample(obs, deterministic=True, generator=chain_noise).actions[:, 0]
    else:
        mlp = train_mlp(a.mlp, 3000, 0, language=True)

        def mean_action(obs):
            return mlp(obs["state"].float(), obs["instruction"])

    for std, dims in LEVELS:
        chain_noise = torch.Generator().manual_seed(a.seed)  # the same x_K draws at every level
        g = torch.Generator().manual_seed(a.seed + 1)
        mask = torch.tensor(MASKS[dims])

        def act(obs, _ended):
            with torch.no_grad():
                m = mean_action(obs)
                return (m + std * mask * torch.randn(m.shape, generator=g)).clamp(-1, 1)

        t0 = time.time()
        env = make_env("place", 32, seed=a.seed)
        r = run_episodes(env, act, a.episodes, a.seed, 3, None, 10_000)
        env.close()
        print(json.dumps({"policy": a.policy or f"mlp:{a.mlp}", "init_scale": a.init_scale, "std": std, "dims": dims,
                          "success": round(r["success_rate"], 3), "ci95": [round(c, 2) for c in r["success_ci95"]],
                          "s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
