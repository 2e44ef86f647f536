"""The main job, small: collect expert demos -> BC pretrain -> DPPO fine-tune -> evaluate before/after.

``vla-rl demo`` (or ``vla-rl demo --config configs/demo/place.yaml key=value ...``) runs the whole
story on CPU MuJoCo in minutes and prints the success rate before and after RL. Every stage is the
library's public entry point, so the demo is also a worked example of a training script.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .algos import DPPOConfig
from .collect import collect_demos
from .envs import make_env
from .evaluate import evaluate
from .policy import PolicyConfig, VLAPolicy
from .pretrain import PretrainConfig, pretrain
from .runner import RunnerConfig, TrainConfig, train


def _demo_policy() -> PolicyConfig:
    # The BC recipe of configs/pretrain/default.yaml (MLP action head, learned word-hash language, rectified
    # flow, bfloat16 matmuls where the hardware has them) in the shape RL fine-tunes best on `place`: one action
    # per decision and no transformer trunk, the head reading the projected state and language tokens. On 50
    # demos only that shape let PPO gain (chunks lost ground, the trunk blocked it); from 150 demos it
    # also clones better (BENCHMARKS.md, "Which denoising transitions to fine-tune").
    cfg = PolicyConfig(horizon=1, exec_steps=1, fusion_layers=0, language_encoder="hash", head="mlp",
                       head_dtype="auto")
    # A 256-wide head (the BC preset's is 512): a quarter of the FLOPs, so on a CPU without bfloat16, where the
    # head's float32 matmuls were most of the loop, the demo runs in 9.5-10 minutes instead of 15, and from 100
    # demos DPPO gained as much or more over 3 seeds (BENCHMARKS.md, "The demo's 256-wide head").
    cfg.mlp_head.hidden = 256
    cfg.noise.kind = "flow"
    # 5 Euler steps per chain (BC trains the flow on continuous time, so the step count is a sampling choice):
    # on `place` BC succeeds as often as with 10 and the loop's chain sampling costs half (BENCHMARKS.md, "The
    # demo's loop on a CPU without bfloat16").
    cfg.noise.sample_steps = 5
    cfg.noise.std_floor = 0.1
    return cfg


def _demo_dppo() -> DPPOConfig:
    # The settings of every RL row in BENCHMARKS.md since stop 14: 4,096 env steps per update in 8 minibatches,
    # 5 epochs, lr 1e-4, clip 0.2, target KL 0.03, 3 critic-only iterations first.
    return DPPOConfig(num_minibatches=8, actor_lr=1e-4, clip_ploss_coef=0.2, clip_ploss_coef_base=0.2,
                      n_critic_warmup_itr=3)


@dataclass
class DemoConfig:
    task: str = "place"  # an env spec: a task name, gym:<id> or module:factory
    expert: str = ""  # module:factory of the demo expert (default: the built-in task's scripted expert)
    out: str = "runs/demo"
    seed: int = 0
    # Few demonstrations, so RL has room: from 100 the BC chain succeeds 61-77% (3 seeds) where 150 give 80-95% and
    # leave RL a few points at most (BENCHMARKS.md, "The demo from 100 demos at 410k env steps").
    demos: int = 100
    demo_noise: float = 0.1  # executed-action noise; the labels are the expert's own actions (DART)
    pretrain_steps: int = 3000
    pretrain_lr: float = 1e-3
    size: str = ""  # a DiT size preset (tiny | small | ...) when policy.head = "dit"
    policy: PolicyConfig = field(default_factory=_demo_policy)
    # DPPO's sampler: it fine-tunes the last K' of the K denoising steps, each a Gaussian of std >= std_floor.
    # K' = 1: the later steps undo most of an earlier transition's noise, so earlier transitions add gradient
    # noise without signal (BENCHMARKS.md, "Which denoising transitions to fine-tune").
    stochastic_steps: int = 1
    std_floor: float = 0.22
    learn_std: bool = False  # a learned std per action dimension, from exp(log_std_init), floored at std_floor
    log_std_init: float = -1.5
    # The initial noise x_K when fine-tuning and evaluating: 0 = its mode, so the deterministic policy is a function
    # of the observation. On `place` the BC chain from x_K = 0 succeeds more often than from random draws (0.95,
    # 0.75, 0.92 against 0.82, 0.70, 0.88 over 3 seeds; BENCHMARKS.md, "The initial noise at its mode").
    init_scale: float = 0.0
    dppo: DPPOConfig = field(default_factory=_demo_dppo)
    # 100 updates of 4,096 env steps (410k, the Gaussian PPO reference's budget in issue 13; at 205k the gains
    # were half as large): 64 envs x 64 decisions, stepped in `env_workers` processes so the two halves' physics
    # run at once, one per core. 256 envs x 16 decisions run the loop 1.4x faster but were not shown to learn alike
    # (BENCHMARKS.md, stop 19).
    runner: RunnerConfig = field(default_factory=lambda: RunnerConfig(
        iterations=100, num_envs=64, steps_per_iter=64, eval_every=0, checkpoint_every=10))
    env_workers: int = 2
    eval_episodes: int = 128
    eval_envs: int = 32
    threads: int = 0  # torch threads (0: torch's default)


def demo_rl_noise(cfg: DemoConfig) -> dict:
    """The sampler DPPO fine-tunes and the demo evaluates with: noise overrides for ``VLAPolicy.from_pretrained``."""
    return {"stochastic_steps": cfg.stochastic_steps, "std_floor": cfg.std_floor, "learn_std": cfg.learn_std,
            "log_std_init": cfg.log_std_init, "init_scale": cfg.init_scale}


def run_demo(cfg: DemoConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    t0 = time.time()
    stamp = lambda: f"[{time.time() - t0:6.1f}s]"  # noqa: E731

    print(f"{stamp()} 1/4 collecting {cfg.demos} expert demos of '{cfg.task}'")
    demos = collect_demos(cfg.task, cfg.demos, out / "demos", num_envs=min(16, cfg.demos), noise=cfg.demo_noise,
                          seed=cfg.seed, expert=cfg.expert or None)
    print(f"{stamp()}     {demos['written']} episodes, expert success {demos['success_rate']:.0%}")

    print(f"{stamp()} 2/4 behaviour cloning ({cfg.pretrain_steps} steps, {cfg.policy.head} action head)")
    pretrained = pretrain(PretrainConfig(data=str(out / "demos"), out=str(out / "pretrained"), size=cfg.size,
                                         policy=cfg.policy, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, seed=cfg.seed,
                                         save_every=cfg.pretrain_steps))
    rl_noise = demo_rl_noise(cfg)
    before = _evaluate(pretrained, cfg, rl_noise)
    print(f"{stamp()}     pretrained success {_fmt(before)}")

    print(f"{stamp()} 3/4 DPPO fine-tuning with outcome-only reward "
          f"({cfg.runner.iterations} iterations x {cfg.runner.num_envs} envs)")
    runner = RunnerConfig(**{**asdict(cfg.runner), "log_dir": str(out / "dppo"), "seed": cfg.seed, "resume": False})
    policy = VLAPolicy.from_pretrained(pretrained, noise=rl_noise)
    env = {"task": cfg.task, "workers": cfg.env_workers}
    run_dir = train(TrainConfig(policy_path=str(pretrained), env=env, algo="dppo", dppo=cfg.dppo,
                                runner=runner), policy=policy)

    print(f"{stamp()} 4/4 evaluating the fine-tuned policy")
    after = _evaluate(run_dir / "checkpoint" / "policy", cfg, rl_noise)
    print(f"{stamp()}     fine-tuned success {_fmt(after)}")
    summary = {"task": cfg.task, "before": before, "after": after, "seconds": time.time() - t0,
               "run_dir": str(run_dir), "pretrained": str(pretrained)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    x_k = "x_K = 0" if cfg.init_scale == 0 else f"x_K ~ N(0, {cfg.init_scale:g}^2)"
    evaluated = "the Gaussian head's mean" if cfg.policy.noise.kind == "gaussian" else f"deterministic chain from {x_k}"
    print(f"\nsuccess on '{cfg.task}' ({evaluated}) before RL {_fmt_ci(before)} -> after RL {_fmt_ci(after)} "
          f"({cfg.eval_episodes} episodes each, {summary['seconds'] / 60:.1f} min total)")
    print(f"TensorBoard: tensorboard --logdir {out}")
    return summary


def _evaluate(policy_dir, cfg: DemoConfig, noise: dict) -> dict:
    """Success on the same held-out episodes before and after: of the deterministic chain (no transition noise,
    x_K drawn with std ``init_scale``, 0 in the demo; what `vla-rl export --deterministic` exports) and, under
    "sampled", of the RL sampler that DPPO trains."""
    policy = VLAPolicy.from_pretrained(policy_dir, noise=noise)
    results = {}
    for mode in ("sampled", "deterministic"):
        env = make_env(cfg.task, cfg.eval_envs, seed=cfg.seed + 10_000)
        with torch.no_grad():
            results[mode] = evaluate(policy, env, cfg.eval_episodes, deterministic=mode == "deterministic",
                                     seed=cfg.seed + 10_000)
        env.close()
    return {**results["deterministic"], "sampled": results["sampled"]}


def _fmt_ci(result: dict) -> str:
    low, high = result["success_ci95"]
    return f"{result['success_rate']:.1%} [{low:.0%}, {high:.0%}]"


def _fmt(result: dict) -> str:
    low, high = result["success_ci95"]
    sampled = result["sampled"]
    return (f"{result['success_rate']:.1%} (95% CI {low:.0%}-{high:.0%}, {result['num_episodes']} episodes; "
            f"sampled {sampled['success_rate']:.1%})")
