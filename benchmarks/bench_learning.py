"""Learning benchmark on `place` (state + language): BC pretrain on few demos -> DPPO and RWR fine-tuning,
vs SB3 PPO (Gaussian MLP from scratch) on the same sparse reward and env-step budget. Not a test.

    # 0) few expert demos + BC pretraining (tiny DiT, hash language encoder, H=8, exec 4, DDIM 10 steps)
    python benchmarks/bench_learning.py pretrain --out runs/bench_learning  # 150 demos, 3000 steps
    # 1) fine-tuning runs and baselines
    python benchmarks/bench_learning.py run --algo dppo --seed 0 --budget 100000 --pretrained runs/bench_learning/bc
    python benchmarks/bench_learning.py run --algo rwr  --seed 0 --budget 100000 --pretrained runs/bench_learning/bc
    python benchmarks/bench_learning.py run --algo sb3  --seed 0 --budget 100000
    python benchmarks/bench_learning.py run --algo pretrained --seed 0 --pretrained runs/bench_learning/bc
    # 2) table + learning curves from every runs/bench_learning/result_*.json
    python benchmarks/bench_learning.py report --out runs/bench_learning

Each run writes ``result_<algo>_s<seed>.json`` (final success, curve, wall time). Curves are periodic
evaluations (32 episodes for DPPO/RWR with the stochastic policy via ``vla_rl.evaluate.evaluate``; 16
deterministic episodes for SB3) vs env steps; the table's number is the final evaluation (64 episodes,
held-out seeds). Evaluation steps are not counted in the budget or the training wall time.

SB3 PPO sees the 16-dim state plus a 4-dim one-hot of the instruction's (object, container) -- a perfect
language parse, which is generous to the baseline; without it the task is not solvable from the state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from vla_rl.algos import DPPOConfig, DSRLConfig, RWRConfig
from vla_rl.envs import make_env
from vla_rl.evaluate import evaluate
from vla_rl.policy import VLAPolicy
from vla_rl.runner import Runner, RunnerConfig, TrainConfig

NOISE = {"stochastic_steps": 5, "std_floor": 0.1}
# RWR regresses on its own samples: an exploration floor above the sampler's std would be learned back
# and compound (algos/rwr.py), so RWR samples with a small floor, i.e. from the model's own distribution.
RWR_NOISE = {"stochastic_steps": 5, "std_floor": 0.01}
# The Gaussian control (noise.kind=gaussian): its one step is the whole "chain"; its std is learned.
GAUSSIAN_NOISE = {"stochastic_steps": 0, "std_floor": 0.05}


def dppo_config(**kw) -> DPPOConfig:
    # Outcome reward in {0, 1} at the success step; a time-limit cut is a failure (the state has no clock).
    base = dict(gamma=0.99, gae_lambda=0.95, gamma_denoising=0.99, actor_lr=1e-4,
                critic_lr=1e-3, update_epochs=5, num_minibatches=4, n_critic_warmup_itr=2,
                reward_scale_running=False, bootstrap_truncated=False, max_grad_norm=1.0)
    base.update(kw)
    return DPPOConfig(**base)


def load_policy(pol_dir, algo: str, noise_overrides=None, head_dtype: str | None = None) -> VLAPolicy:
    kind = OmegaConf.load(Path(pol_dir) / "config.yaml").noise.kind
    noise = GAUSSIAN_NOISE if kind == "gaussian" else RWR_NOISE if algo == "rwr" else NOISE
    extra = {"head_dtype": head_dtype} if head_dtype else {}
    return VLAPolicy.from_pretrained(pol_dir, noise={**noise, **(noise_overrides or {})}, **extra)


def rl_run(algo, pol_dir, task, budget, seed, num_envs, steps_per_iter, out, eval_episodes, threads,
           eval_every_steps=12_800, lr=None, dppo_overrides=None, group_size=0, workers=1, noise_overrides=None,
           dsrl_overrides=None, minutes=0.0, tag="", head_dtype=None):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    policy = load_policy(pol_dir, algo, noise_overrides, head_dtype)
    per_iter = num_envs * steps_per_iter * policy.cfg.exec_steps
    iters = max(1, budget // per_iter)
    cfg = TrainConfig(algo=algo, dppo=dppo_config(**{"actor_lr": 3e-5 if lr is None else lr, **(dppo_overrides or {})}),
                      rwr=RWRConfig(lr=1e-5 if lr is None else lr, beta=2.0, update_epochs=4),
                      dsrl=DSRLConfig(**(dsrl_overrides or {})),
                      runner=RunnerConfig(iterations=iters, num_envs=num_envs, steps_per_iter=steps_per_iter,
                                          group_size=group_size,
                                          eval_every=0, checkpoint_every=0, seed=seed, resume=False, progress=False,
                                          log_dir=str(out / f"{algo}{tag}_s{seed}")))
    r = Runner(cfg, policy=policy, env=make_env(task, num_envs, seed=seed, workers=workers))
    eval_env = make_env(task, 16, seed=seed + 100)
    curve, ecurve, t0, t_eval = [], [], time.time(), 0.0

    def ev_point():
        te = time.time()
        e = evaluate(policy, eval_env, 32, seed=seed + 100 + r.iteration)["success_rate"]
        ecurve.append((r.env_steps, e, 32, te - t0 - t_eval))  # (env steps, success, episodes, training seconds)
        print(f"{algo} s{seed} eval @ {r.env_steps} steps: {e:.3f}", flush=True)
        return time.time() - te

    t_eval += ev_point()
    next_eval = eval_every_steps
    for _ in range(iters):
        if getattr(r.algo, "off_policy", False):  # DSRL: gradient steps interleaved with the decisions
            st, roll = r.collect_off_policy()
        else:
            buf, roll = r.collect()
            st = r.algo.update(buf)
        r.iteration += 1
        if roll["success"]:
            curve.append((r.env_steps, sum(roll["success"]) / len(roll["success"]), len(roll["success"])))
        if r.env_steps >= next_eval and r.iteration < iters:
            next_eval += eval_every_steps
            t_eval += ev_point()
        if r.iteration % max(1, 5 * 10 // steps_per_iter) == 0:
            print(f"{algo} s{seed} it {r.iteration}/{iters} steps {r.env_steps} "
                  f"train_succ {curve[-1][1] if curve else float('nan'):.2f} "
                  f"ev {st.get('explained_variance', float('nan')):.2f} kl {st.get('approx_kl', 0):.4f} clip {st.get('clip_frac', 0):.2f} "
                  f"q {st.get('q', float('nan')):.3f} alpha {st.get('alpha', float('nan')):.4f} ent {st.get('entropy', float('nan')):.1f} "
                  f"t {time.time() - t0:.0f}s", flush=True)
        if minutes and time.time() - t0 - t_eval > minutes * 60:
            print(f"{algo} s{seed}: training wall-clock budget of {minutes} min reached at {r.env_steps} env steps", flush=True)
            break
    train_time = time.time() - t0 - t_eval
    r.env.close()
    r.policy.save_pretrained(out / f"{algo}{tag}_s{seed}" / "final")
    ev = evaluate(policy, make_env(task, 16, seed=seed + 100), eval_episodes, seed=seed + 100)
    ecurve.append((r.env_steps, ev["success_rate"], eval_episodes))
    det = evaluate(policy, make_env(task, 16, seed=seed + 100), eval_episodes, deterministic=True, seed=seed + 100)
    print(f"{algo} s{seed} final: sampled {ev['success_rate']:.3f}, deterministic {det['success_rate']:.3f}", flush=True)
    return {"success": ev["success_rate"], "ci95": ev["success_ci95"], "success_deterministic": det["success_rate"],
            "curve": ecurve, "train_curve": curve, "env_steps": r.env_steps, "train_time_s": train_time}


def _task_onehot(instruction: str):
    words = instruction.split()
    return [float("cube" in words), float("cylinder" in words), float("bowl" in words), float("box" in words)]


def sb3_run(task, budget, seed, eval_episodes, threads, n_envs=8):
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    import vla_rl.envs  # noqa: F401  registers vla_rl/<Task>-v0

    torch.set_num_threads(threads)

    class StateTask(gym.Wrapper):
        """state (16) + one-hot (object, container) parsed from the instruction."""

        def __init__(self, env):
            super().__init__(env)
            d = env.observation_space["state"].shape[0] + 4
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (d,), np.float32)

        def _o(self, obs, info):
            return np.concatenate([obs["state"], _task_onehot(info["instruction"])]).astype(np.float32)

        def reset(self, **kw):
            obs, info = self.env.reset(**kw)
            return self._o(obs, info), info

        def step(self, a):
            obs, r, term, trunc, info = self.env.step(a)
            return self._o(obs, info), r, term, trunc, info

    def mk(i):
        def f():
            e = StateTask(gym.make(f"vla_rl/{task.capitalize()}-v0"))
            e.reset(seed=seed * 1000 + i)
            return e
        return f

    class Curve(BaseCallback):
        def __init__(self):
            super().__init__()
            self.curve, self.train_curve, self.buf, self.next_eval = [], [], [], eval_every_steps

        def _on_step(self):
            for d, info in zip(self.locals["dones"], self.locals["infos"]):
                if d:
                    self.buf.append(float(info.get("is_success", False)))
            return True

        def _on_rollout_end(self):
            if self.buf:
                self.train_curve.append((self.num_timesteps, sum(self.buf) / len(self.buf), len(self.buf)))
            self.buf = []
            if self.num_timesteps >= self.next_eval:
                self.next_eval += eval_every_steps
                self.curve.append((self.num_timesteps, sb3_eval(self.model, 16, 5000), 16))

    venv = DummyVecEnv([mk(i) for i in range(n_envs)])
    model = PPO("MlpPolicy", venv, seed=seed, verbose=0, n_steps=256, batch_size=256, n_epochs=10, gamma=0.99,
                learning_rate=3e-4, ent_coef=0.0, policy_kwargs=dict(net_arch=[256, 256]))
    eval_env = mk(999)()

    def sb3_eval(m, n, base):
        succ = 0
        for ep in range(n):
            obs, _ = eval_env.reset(seed=base + seed * 1000 + ep)
            done = False
            while not done:
                a, _ = m.predict(obs, deterministic=True)
                obs, _r, term, trunc, info = eval_env.step(a)
                done = term or trunc
            succ += bool(info.get("is_success"))
        return succ / n

    eval_every_steps = max(2048, budget // 10)
    cb, t0 = Curve(), time.time()
    cb.curve.append((0, 0.0, 0))
    model.learn(total_timesteps=budget, callback=cb)
    train_time = time.time() - t0
    final = sb3_eval(model, eval_episodes, 10_000)
    cb.curve.append((model.num_timesteps, final, eval_episodes))
    return {"success": final, "curve": cb.curve, "train_curve": cb.train_curve, "env_steps": model.num_timesteps,
            "train_time_s": train_time}


def cmd_run(a):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.algo == "sb3":
        res = sb3_run(a.task, a.budget, a.seed, a.eval_episodes, a.threads)
    elif a.algo == "pretrained":
        torch.set_num_threads(a.threads)
        policy = load_policy(a.pretrained, "dppo", _overrides(a.noise), a.head_dtype)
        ev = evaluate(policy, make_env(a.task, 16, seed=a.seed + 100), a.eval_episodes, seed=a.seed + 100)
        det = evaluate(policy, make_env(a.task, 16, seed=a.seed + 100), a.eval_episodes, deterministic=True,
                       seed=a.seed + 100)
        res = {"success": ev["success_rate"], "ci95": ev["success_ci95"], "success_deterministic": det["success_rate"],
               "curve": [], "env_steps": 0}
    else:
        res = rl_run(a.algo, a.pretrained, a.task, a.budget, a.seed, a.num_envs, a.steps_per_iter, out,
                     a.eval_episodes, a.threads, eval_every_steps=a.eval_every, lr=a.lr,
                     dppo_overrides=_overrides(a.dppo), group_size=a.group_size, workers=a.workers,
                     noise_overrides=_overrides(a.noise), dsrl_overrides=_overrides(a.dsrl), minutes=a.minutes,
                     tag=a.tag, head_dtype=a.head_dtype)
    res.update(algo=a.algo, seed=a.seed, budget=a.budget, pretrained=a.pretrained, wall_s=time.time() - t0)
    res.update(variant=a.tag, dppo_overrides=_overrides(a.dppo), dsrl_overrides=_overrides(a.dsrl), noise_overrides=_overrides(a.noise), num_envs=a.num_envs,
               steps_per_iter=a.steps_per_iter, threads=a.threads, workers=a.workers, head_dtype=a.head_dtype)
    (out / f"result_{a.algo}{a.tag}_s{a.seed}.json").write_text(json.dumps(res, indent=1))
    print(f"{a.algo} seed {a.seed}: success {res['success']:.3f} ({res['wall_s']:.0f}s)", flush=True)


def _overrides(pairs):
    import yaml
    return {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs or [])}


def cmd_pretrain(a):
    from vla_rl.collect import collect_demos
    from vla_rl.pretrain import PretrainConfig, pretrain

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    t0 = time.time()
    d = collect_demos(a.task, a.demos, out / f"demos_{a.demos}_s{a.seed}", num_envs=8, noise=a.noise, seed=a.seed)
    t1 = time.time()
    c = PretrainConfig(data=d["path"], out=str(out / a.name), steps=a.steps, size="tiny", batch_size=256,
                       lr=a.lr, seed=a.seed, progress=False)
    c.policy.language_encoder, c.policy.horizon, c.policy.exec_steps = "hash", a.horizon, a.exec_steps
    c.policy.noise.sample_steps = 10
    c = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(c), OmegaConf.from_dotlist(a.set)))
    pretrain(c)
    print(f"collected {d['written']} demos in {t1 - t0:.0f}s, pretrained {a.steps} steps in {time.time() - t1:.0f}s "
          f"-> {out / a.name}", flush=True)


def cmd_report(a):
    out = Path(a.out)
    rows = {}
    for f in sorted(out.glob("result_*.json")):
        r = json.loads(f.read_text())
        rows.setdefault(r["algo"] + r.get("variant", ""), []).append(r)  # a --tag makes its own row
    names = {"pretrained": "BC pretrained (few demos)", "dppo": "DPPO fine-tune", "rwr": "RWR fine-tune",
             "dsrl": "DSRL (noise steering)", "sb3": "SB3 PPO, Gaussian MLP from scratch"}
    order = ("pretrained", "dppo", "rwr", "dsrl", "sb3")
    keys = sorted(rows, key=lambda k: (order.index(rows[k][0]["algo"]), k))
    name = lambda k: names[rows[k][0]["algo"]] + (f" [{rows[k][0]['variant']}]" if rows[k][0].get("variant") else "")  # noqa: E731
    lines = ["| method | env steps | seeds | success median | min-max | per seed [95% CI] | deterministic per seed | wall (train) |",
             "|---|---|---|---|---|---|---|---|"]
    for k in keys:
        rs = sorted(rows[k], key=lambda r: r["seed"])
        s = [r["success"] for r in rs]
        wall = ", ".join(f"{r.get('train_time_s', 0) / 60:.1f} min" for r in rs)
        det = ", ".join(f"{r['success_deterministic']:.2f}" if "success_deterministic" in r else "-" for r in rs)
        per = ", ".join(f"{r['success']:.2f}" + (f" [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if "ci95" in r else "")
                        for r in rs)
        lines.append(f"| {name(k)} | {max(r['env_steps'] for r in rs)} | {len(rs)} | {statistics.median(s):.2f} | "
                     f"{min(s):.2f}-{max(s):.2f} | {per} | {det} | {wall} |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {k: f"C{i}" for i, k in enumerate(k for k in keys if not k.startswith("pretrained"))}
    for k in colors:
        for j, r in enumerate(rows[k]):
            c = r["curve"]
            if not c:
                continue
            xs, ys = [e[0] for e in c], [e[1] for e in c]
            # training minutes of each point: recorded (4th entry), else at the run's mean speed
            mins = [(e[3] if len(e) > 3 else e[0] / max(r["env_steps"], 1) * r.get("train_time_s", 0)) / 60 for e in c]
            for ax, x in zip(axes, (xs, mins)):
                ax.plot(x, ys, color=colors[k], alpha=0.8, label=name(k) if j == 0 else None)
    for r in (r for k in keys if k.startswith("pretrained") for r in rows[k]):
        for ax in axes:
            ax.axhline(r["success"], color="gray", ls="--", lw=1, label="BC pretrained (eval)" if r["seed"] == 0 else None)
    axes[0].set_xlabel("env steps (10 Hz control steps)")
    axes[1].set_xlabel("training wall-clock minutes (evaluation excluded)")
    axes[0].set_ylabel("success rate (periodic evaluation)")
    axes[0].set_ylim(-0.02, 1.02)
    fig.suptitle("place (state + language), outcome-only reward")
    axes[0].legend(fontsize=8)
    fig.savefig(out / "curves.png", dpi=110, bbox_inches="tight")
    print(f"wrote {out / 'table.md'} and {out / 'curves.png'}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--algo", choices=["dppo", "rwr", "dsrl", "sb3", "pretrained"], required=True)
    r.add_argument("--task", default="place")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--budget", type=int, default=100_000, help="env steps per run")
    r.add_argument("--pretrained", default="runs/bench_learning/bc")
    r.add_argument("--num-envs", type=int, default=32)
    r.add_argument("--steps-per-iter", type=int, default=10, help="decisions per env per iteration")
    r.add_argument("--eval-episodes", type=int, default=64)
    r.add_argument("--eval-every", type=int, default=12_800, help="env steps between 32-episode curve points")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--workers", type=int, default=1, help="env worker processes of the training env")
    r.add_argument("--lr", type=float, default=None, help="DPPO actor lr (default 3e-5) / RWR lr (default 1e-5)")
    r.add_argument("--dppo", nargs="*", default=[], metavar="KEY=VALUE", help="DPPOConfig overrides")
    r.add_argument("--noise", nargs="*", default=[], metavar="KEY=VALUE",
                   help="sampler overrides (NoiseConfig), e.g. init_scale=0")
    r.add_argument("--dsrl", nargs="*", default=[], metavar="KEY=VALUE", help="DSRLConfig overrides")
    r.add_argument("--minutes", type=float, default=0.0, help="stop training after this many wall-clock minutes")
    r.add_argument("--head-dtype", default=None, help="policy.head_dtype for the run (default: the checkpoint's)")
    r.add_argument("--group-size", type=int, default=0, help="envs per group of identical starts (advantage=group)")
    r.add_argument("--tag", default="", help="suffix of the result file (variants of one algo)")
    r.add_argument("--out", default="runs/bench_learning")
    q = sub.add_parser("pretrain")
    q.add_argument("--task", default="place")
    q.add_argument("--demos", type=int, default=150)
    q.add_argument("--noise", type=float, default=0.1, help="executed-action noise; labels are the expert's (DART)")
    q.add_argument("--steps", type=int, default=3000)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--horizon", type=int, default=8, help="action chunk length H")
    q.add_argument("--exec-steps", type=int, default=4, help="actions executed per chunk")
    q.add_argument("--name", default="bc", help="checkpoint directory name under --out")
    q.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="PretrainConfig overrides (dotted)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--out", default="runs/bench_learning")
    p = sub.add_parser("report")
    p.add_argument("--out", default="runs/bench_learning")
    a = ap.parse_args()
    {"run": cmd_run, "pretrain": cmd_pretrain, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
