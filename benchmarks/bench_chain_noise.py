"""How much of each fine-tuned denoising transition's noise reaches the executed action. Not a test.

    python benchmarks/bench_chain_noise.py POLICY_DIR [--stochastic-steps 5] [--std-floor 0.1] [--task place]

DPPO treats every stochastic transition of the chain as a Gaussian policy step and gives each the decision's
advantage. A transition whose noise the later steps undo carries a likelihood-ratio gradient of full
variance but almost no signal: its noise barely changes the action the outcome depends on. For each
transition j the script draws the noise of j alone (the same x_K, every other transition at its mean) and
reports the spread that noise leaves in the final action, next to the spread it injects at step j.
"""

from __future__ import annotations

import argparse

import torch

from vla_rl.envs import make_env
from vla_rl.policy import VLAPolicy


@torch.no_grad()
def spread_per_transition(policy: VLAPolicy, obs: dict, draws: int = 64, seed: int = 0) -> dict:
    """{"all": final-action std with every transition's noise, "per_transition": [(injected std, final std)]}.

    Stds are in normalized action units, per coordinate, averaged over observations and coordinates."""
    gen = torch.Generator().manual_seed(seed)
    cond = policy.encode(obs)
    n_obs = cond.shape[0]
    cond = cond.repeat_interleave(draws, 0)
    K, H, A = policy.noise.num_steps, policy.cfg.horizon, policy.cfg.action_dim
    x_K = torch.randn(n_obs, 1, H, A, generator=gen).repeat_interleave(draws, 0)  # one start per observation

    def spread(x: torch.Tensor) -> float:
        return x.reshape(n_obs, draws, -1).std(1).mean().item()

    def chain_with(noise: torch.Tensor) -> torch.Tensor:
        return policy.sample(None, noise=torch.cat([x_K, noise], 1), cond=cond).latents

    all_noise = torch.randn(n_obs * draws, K, H, A, generator=gen)
    per = []
    for j, k in enumerate(policy.stochastic_indices):
        noise = torch.zeros_like(all_noise)
        noise[:, k] = all_noise[:, k]
        latents = chain_with(noise)
        per.append((spread(latents[:, j + 1]), spread(latents[:, -1])))
    return {"all": spread(chain_with(all_noise)[:, -1]), "per_transition": per}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policy")
    p.add_argument("--stochastic-steps", type=int, default=5, help="K': the fine-tuned transitions")
    p.add_argument("--std-floor", type=float, default=0.1)
    p.add_argument("--task", default="place", help="env spec, e.g. place or bench_bc:place_oracle")
    p.add_argument("--num-envs", type=int, default=16, help="observations (first state of each env)")
    p.add_argument("--draws", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.task.startswith("bench_bc:"):
        import bench_bc  # noqa: F401  (benchmarks/, beside this script: registers its env specs)
    policy = VLAPolicy.from_pretrained(a.policy, noise={"stochastic_steps": a.stochastic_steps,
                                                        "std_floor": a.std_floor})
    env = make_env(a.task, a.num_envs, seed=7)
    obs = env.reset(seed=7)
    obs = obs[0] if isinstance(obs, tuple) else obs
    r = spread_per_transition(policy, obs, a.draws)
    print(f"K' = {a.stochastic_steps}, std floor {a.std_floor}: final-action std with every transition's noise "
          f"{r['all']:.3f}")
    print("| transition (of K') | denoising step k | std injected at the step | std it leaves in the action | share |")
    print("|---|---|---|---|---|")
    for j, (k, (inj, fin)) in enumerate(zip(policy.stochastic_indices, r["per_transition"])):
        print(f"| {j} | {k} | {inj:.3f} | {fin:.3f} | {fin / inj:.0%} |")
    env.close()


if __name__ == "__main__":
    main()
