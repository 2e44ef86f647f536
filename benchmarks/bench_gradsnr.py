"""Signal vs noise of DPPO's actor gradient on `place`: the mean pairwise cosine between the policy
gradients of independent rollout batches. Not a test.

    python benchmarks/bench_gradsnr.py runs/bench_learning/bc [--envs 64] [--decisions 10] [--batches 8] [--init-scale 1]

Each batch is one runner collection (envs x decisions) from the same policy; its gradient is that of the
unclipped surrogate (ratio x normalized advantage) at ratio 1, i.e. the score-function estimate DPPO's
first minibatch step follows. The critic is first fitted on a few batches (DPPO's critic warm-up:
critic-only updates) so that the advantages are the GAE ones of mid-training. A cosine near 0 means each
batch's step points mostly in its own random direction.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from vla_rl.algos import DPPOConfig
from vla_rl.envs import make_env
from vla_rl.policy import VLAPolicy
from vla_rl.runner import Runner, RunnerConfig, TrainConfig


def batch_gradient(runner, params) -> torch.Tensor:
    algo = runner.algo
    buf, _ = runner.collect()
    adv, ret = algo.compute_advantages(buf)
    flat = buf.flatten(adv, ret)
    old = algo.old_log_probs(buf, flat)
    a = (flat["adv"] - flat["adv"].mean()) / (flat["adv"].std() + 1e-8)
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, flat["n"], 512):
        idx = torch.arange(start, min(start + 512, flat["n"]))
        new = algo.transition_log_prob(buf.index_obs(flat, idx), flat["chain"][idx])
        loss = -(a[idx, None] * (new - old[idx]).exp()).sum() / flat["n"]
        for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                t += g
    return torch.cat([t.flatten() for t in total])


def fit_critic(runner, batches: int):
    """DPPO's own critic warm-up (``n_critic_warmup_itr`` >= batches): critic-only updates."""
    for _ in range(batches):
        buf, _ = runner.collect()
        runner.algo.update(buf)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("policy")
    ap.add_argument("--envs", type=int, default=64)
    ap.add_argument("--decisions", type=int, default=10, help="decisions per env per batch")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--critic-batches", type=int, default=6, help="critic warm-up batches before measuring")
    ap.add_argument("--init-scale", type=float, default=1.0)
    ap.add_argument("--stochastic-steps", type=int, default=5)
    ap.add_argument("--std-floor", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    policy = VLAPolicy.from_pretrained(a.policy, noise={"stochastic_steps": a.stochastic_steps,
                                                        "std_floor": a.std_floor, "init_scale": a.init_scale})
    with tempfile.TemporaryDirectory() as log_dir:
        cfg = TrainConfig(algo="dppo", dppo=DPPOConfig(n_critic_warmup_itr=a.critic_batches),
                          runner=RunnerConfig(num_envs=a.envs, steps_per_iter=a.decisions, eval_every=0,
                                              checkpoint_every=0, seed=a.seed, resume=False, progress=False,
                                              log_dir=log_dir))
        runner = Runner(cfg, policy=policy, env=make_env("place", a.envs, seed=a.seed))
        fit_critic(runner, a.critic_batches)
        params = runner.algo.actor_params
        grads = torch.stack([batch_gradient(runner, params) for _ in range(a.batches)])
        runner.env.close()
    cos = torch.nn.functional.cosine_similarity(grads[:, None], grads[None], dim=-1)
    pairs = cos[~torch.eye(a.batches, dtype=torch.bool)]
    print(f"{a.policy} ({a.envs} envs x {a.decisions} decisions, K'={a.stochastic_steps}, std_floor={a.std_floor}, "
          f"init_scale={a.init_scale}): mean pairwise cosine {pairs.mean():.3f} (min {pairs.min():.3f}, "
          f"max {pairs.max():.3f}) over {a.batches} batches, seed {a.seed}")


if __name__ == "__main__":
    main()
