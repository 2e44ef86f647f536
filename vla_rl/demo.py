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
    # The BC recipe measured best on `place` (configs/pretrain/default.yaml): MLP action head, learned
    # word-hash language, chunks of 4 executed whole, rectified flow (reads the instruction at any demo count).
    # head_dtype auto: bfloat16 matmuls where the CPU/GPU has them (1.8x faster BC at equal success, BENCHMARKS.md).
    cfg = PolicyConfig(horizon=4, exec_steps=4, language_encoder="hash", head="mlp", head_dtype="auto")
    cfg.mlp_head.hidden = 512
    cfg.noise.kind = "flow"
    cfg.noise.sample_steps = 10
    cfg.noise.std_floor = 0.1
    return cfg


@dataclass
class DemoConfig:
    task: str = "place"  # an env spec: a task name, gym:<id> or module:factory
    expert: str = ""  # module:factory of the demo expert (default: the built-in task's scripted expert)
    out: str = "runs/demo"
    seed: int = 0
    demos: int = 150  # few demonstrations: the pretrained policy is decent, not perfect
    demo_noise: float = 0.1  # executed-action noise; the labels are the expert's own actions (DART)
    pretrain_steps: int = 3000
    pretrain_lr: float = 1e-3
    size: str = ""  # a DiT size preset (tiny | small | ...) when policy.head = "dit"
    policy: PolicyConfig = field(default_factory=_demo_policy)
    stochastic_steps: int = 5  # K': DPPO fine-tunes the last K' of the K denoising steps
    dppo: DPPOConfig = field(default_factory=lambda: DPPOConfig(n_critic_warmup_itr=2))
    runner: RunnerConfig = field(default_factory=lambda: RunnerConfig(
        iterations=20, num_envs=32, steps_per_iter=8, eval_every=0, checkpoint_every=5))
    eval_episodes: int = 64
    eval_envs: int = 32
    threads: int = 0  # torch threads (0: torch's default)


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
    before = _evaluate(pretrained, cfg, stochastic_steps=cfg.stochastic_steps)
    print(f"{stamp()}     pretrained success {_fmt(before)}")

    print(f"{stamp()} 3/4 DPPO fine-tuning with outcome-only reward "
          f"({cfg.runner.iterations} iterations x {cfg.runner.num_envs} envs)")
    runner = RunnerConfig(**{**asdict(cfg.runner), "log_dir": str(out / "dppo"), "seed": cfg.seed, "resume": False})
    policy = VLAPolicy.from_pretrained(pretrained, noise={"stochastic_steps": cfg.stochastic_steps})
    run_dir = train(TrainConfig(policy_path=str(pretrained), env={"task": cfg.task}, algo="dppo", dppo=cfg.dppo,
                                runner=runner), policy=policy)

    print(f"{stamp()} 4/4 evaluating the fine-tuned policy")
    after = _evaluate(run_dir / "checkpoint" / "policy", cfg)
    print(f"{stamp()}     fine-tuned success {_fmt(after)}")
    summary = {"task": cfg.task, "before": before, "after": after, "seconds": time.time() - t0,
               "run_dir": str(run_dir), "pretrained": str(pretrained)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nsuccess on '{cfg.task}' before RL {before['success_rate']:.1%} -> after RL {after['success_rate']:.1%} "
          f"({cfg.eval_episodes} episodes each, {summary['seconds'] / 60:.1f} min total)")
    print(f"TensorBoard: tensorboard --logdir {out}")
    return summary


def _evaluate(policy_dir, cfg: DemoConfig, **noise) -> dict:
    policy = VLAPolicy.from_pretrained(policy_dir, noise=noise) if noise else VLAPolicy.from_pretrained(policy_dir)
    env = make_env(cfg.task, cfg.eval_envs, seed=cfg.seed + 10_000)
    with torch.no_grad():
        result = evaluate(policy, env, cfg.eval_episodes, seed=cfg.seed + 10_000)
    env.close()
    return result


def _fmt(result: dict) -> str:
    low, high = result["success_ci95"]
    return f"{result['success_rate']:.1%} (95% CI {low:.0%}-{high:.0%}, {result['num_episodes']} episodes)"
