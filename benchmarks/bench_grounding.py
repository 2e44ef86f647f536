"""Does a policy read its instruction? Not a test.

    python benchmarks/bench_grounding.py runs/s13/bc/x0_h4_150 runs/s12/bc/mlp512_h8_500demos

From 64 starts of `place`, the first action chunk (deterministic chain, the same x_K) is sampled with the
instruction as given and with its object words swapped (cube <-> cylinder): the mean distance between the
two chunks' gripper motions against the distance between two x_K draws with the same instruction. A policy
that ignores the object word (conditioning neglect: the diffusion head fits the instruction-blind mixture
of "go to either object" and lets x_K pick) shows a swap distance far below the draw distance; a grounded
one shows the opposite. The swap also changes the observation tokens the head reads, reported per token.
"""

from __future__ import annotations

import argparse

import torch

from vla_rl.envs import make_env
from vla_rl.policy import VLAPolicy


def swap(text: str, a: str, b: str) -> str:
    return text.replace(a, "\0").replace(b, a).replace("\0", b)


@torch.no_grad()
def grounding(path: str, starts: int = 64, seed: int = 5) -> dict:
    policy = VLAPolicy.from_pretrained(path).eval()
    obs = make_env("place", starts, seed=seed).reset()
    swapped = {**obs, "instruction": [swap(s, "cube", "cylinder") for s in obs["instruction"]]}

    def first_chunk(o, draw):
        return policy.sample(o, deterministic=True, generator=torch.Generator().manual_seed(draw)).actions[..., :3]

    base = first_chunk(obs, 0)
    dist = lambda a, b: (a - b).norm(dim=-1).mean().item()  # noqa: E731
    tokens, tokens_swapped = policy.encode(obs), policy.encode(swapped)
    perm = torch.roll(torch.arange(starts), 1)
    return {"policy": path, "draw_distance": dist(base, first_chunk(obs, 1)),
            "object_swap_distance": dist(base, first_chunk(swapped, 0)),
            "token_change_on_swap": (tokens_swapped - tokens).norm(dim=-1).mean(0)[:2].tolist(),
            "token_change_across_starts": (tokens - tokens[perm]).norm(dim=-1).mean(0)[:2].tolist()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policies", nargs="+")
    p.add_argument("--starts", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    print("| policy | x_K draw distance | object-swap distance | swap / draw | state, language token change on swap "
          "(across starts) |")
    print("|---|---|---|---|---|")
    for path in a.policies:
        r = grounding(path, a.starts)
        sw, ac = r["token_change_on_swap"], r["token_change_across_starts"]
        print(f"| {path} | {r['draw_distance']:.3f} | {r['object_swap_distance']:.3f} | "
              f"{r['object_swap_distance'] / max(r['draw_distance'], 1e-9):.1f} | {sw[0]:.2f}, {sw[1]:.2f} "
              f"({ac[0]:.2f}, {ac[1]:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
