"""Learning benchmark on `place` (state + language): BC pretrain -> DPPO and RWR fine-tuning, vs SB3 PPO
(Gaussian MLP from scratch) on the same sparse reward and env-step budget. Not a test.

    python benchmarks/bench_learning.py --budget 20000 --seeds 0 1 2 --out runs/bench_learning

Prints a table (median and min/max over seeds) and writes ``results.json`` and ``curves.png`` to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


from vla_rl.algos import DPPOConfig, RWRConfig
from vla_rl.evaluate import evaluate
from vla_rl.policy import VLAPolicy
from vla_rl.runner import Runner, RunnerConfig, TrainConfig


def make(task, n, seed):
    from vla_rl.envs import make_env
    return make_env(task, n, seed=seed)


def rl_run(algo, pol_dir, task, budget, seed, num_envs, steps_per_iter, out, eval_episodes):
    policy = VLAPolicy.from_pretrained(pol_dir, noise={"stochastic_steps": 5})
    per_iter = num_envs * steps_per_iter * policy.cfg.exec_steps
    iters = max(1, budget // per_iter)
    cfg = TrainConfig(algo=algo, dppo=DPPOConfig(actor_lr=1e-4, critic_lr=1e-3, update_epochs=5, num_minibatches=4),
                      rwr=RWRConfig(lr=1e-4),
                      runner=RunnerConfig(iterations=iters, num_envs=num_envs, steps_per_iter=steps_per_iter,
                                          eval_every=0, checkpoint_every=0, seed=seed, resume=False,
                                          log_dir=str(out / f"{algo}_s{seed}")))
    r = Runner(cfg, policy=policy, env=make(task, num_envs, seed))
    curve = []
    for it in range(iters):
        buf, roll = r.collect()
        r.algo.update(buf)
        r.iteration += 1
        if roll["success"]:
            curve.append((r.env_steps, sum(roll["success"]) / len(roll["success"])))
    ev = evaluate(policy, make(task, num_envs, seed + 100), eval_episodes, seed=seed + 100)
    return ev["success_rate"], curve


def sb3_run(task, budget, seed, eval_episodes):
    try:
        import gymnasium as gym
        from stable_baselines3 import PPO
    except ImportError:
        print("stable-baselines3 not installed: skipping the SB3 baseline (pip install stable-baselines3)")
        return None, []
    import vla_rl.envs  # noqa: F401  registers vla_rl/<Task>-v0
    env = gym.wrappers.FilterObservation(gym.make(f"vla_rl/{task.capitalize()}-v0"), ["state"])
    model = PPO("MultiInputPolicy", env, seed=seed, verbose=0, n_steps=512, batch_size=64)
    model.learn(total_timesteps=budget)
    succ = 0
    for ep in range(eval_episodes):
        obs, _ = env.reset(seed=10_000 + seed * 1000 + ep)
        done = False
        while not done:
            a, _ = model.predict(obs, deterministic=True)
            obs, _r, term, trunc, info = env.step(a)
            done = term or trunc
        succ += bool(info.get("is_success"))
    return succ / eval_episodes, []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="place")
    ap.add_argument("--budget", type=int, default=20_000, help="env steps per fine-tuning run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--demos", type=int, default=20)
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--num-envs", type=int, default=16)
    ap.add_argument("--steps-per-iter", type=int, default=8)
    ap.add_argument("--eval-episodes", type=int, default=32)
    ap.add_argument("--no-sb3", action="store_true")
    ap.add_argument("--out", default="runs/bench_learning")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from vla_rl.collect import collect_demos
    from vla_rl.pretrain import PretrainConfig, pretrain

    results = {"pretrained": [], "dppo": [], "rwr": [], "sb3_ppo": []}
    curves = {}
    for seed in a.seeds:
        t0 = time.time()
        demo = collect_demos(a.task, a.demos, out / f"demos_s{seed}", num_envs=8, seed=seed)
        pcfg = PretrainConfig(data=demo["path"], out=str(out / f"bc_s{seed}"), steps=a.pretrain_steps, seed=seed,
                              progress=False)
        pcfg.policy.language_encoder = "hash"
        pol_dir = pretrain(pcfg)
        pre = evaluate(VLAPolicy.from_pretrained(pol_dir), make(a.task, a.num_envs, seed + 100), a.eval_episodes,
                       seed=seed + 100)["success_rate"]
        results["pretrained"].append(pre)
        for algo in ("dppo", "rwr"):
            s, c = rl_run(algo, pol_dir, a.task, a.budget, seed, a.num_envs, a.steps_per_iter, out, a.eval_episodes)
            results[algo].append(s)
            curves[f"{algo}_s{seed}"] = c
        if not a.no_sb3:
            s, _ = sb3_run(a.task, a.budget, seed, a.eval_episodes)
            if s is not None:
                results["sb3_ppo"].append(s)
        print(f"seed {seed}: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in results.items() if v)
              + f" ({time.time() - t0:.0f}s)", flush=True)
    print(f"\n{a.task}, budget {a.budget} env steps, seeds {a.seeds}")
    for k, v in results.items():
        if v:
            print(f"{k:>10}: median {statistics.median(v):.3f}  min {min(v):.3f}  max {max(v):.3f}  {v}")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "results": results, "curves": curves}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, c in curves.items():
            if c:
                ax.plot([x for x, _ in c], [y for _, y in c], label=name, color="C0" if "dppo" in name else "C1", alpha=0.7)
        ax.set_xlabel("env steps")
        ax.set_ylabel("train success rate")
        ax.set_title(f"{a.task}: DPPO (blue) vs RWR (orange)")
        fig.savefig(out / "curves.png", dpi=100, bbox_inches="tight")
    except ImportError:
        print("matplotlib not installed: no learning-curve PNG")


if __name__ == "__main__":
    main()
