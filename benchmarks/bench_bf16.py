"""Does running the action head in bfloat16 (``policy.head_dtype``) change what DPPO learns? Not a test.

    python benchmarks/bench_bf16.py [--seeds 0 1 2]

The toy task of tests/test_learning.py (a BC policy that picks the wrong goal half of the time; DPPO must
fix it), the same settings as that test, once with the head in float32 and once in bfloat16, from the same
float32 BC policy per seed. Success on 512 held-out episodes after 15, 30 and 45 iterations of 128 envs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from vla_rl.algos import DPPOConfig
from vla_rl.envs.toy import ToyGoalEnv
from vla_rl.evaluate import evaluate
from vla_rl.runner import Runner, RunnerConfig, TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toy_utils import pretrain_toy  # noqa: E402


def run(policy, seed: int, log_dir: str) -> tuple[list[float], float]:
    cfg = TrainConfig(algo="dppo",
                      dppo=DPPOConfig(train_encoders=True, actor_lr=1e-3, critic_lr=3e-3, update_epochs=10,
                                      num_minibatches=1, kl_revert=0.0, clip_ploss_coef=0.2, clip_ploss_coef_base=0.2,
                                      gamma_denoising=0.9, bootstrap_truncated=False, reward_scale_running=False),
                      runner=RunnerConfig(iterations=45, num_envs=128, steps_per_iter=1, eval_every=0,
                                          checkpoint_every=0, seed=seed, log_dir=log_dir, progress=False))
    runner = Runner(cfg, policy=policy, env=ToyGoalEnv(128, seed=seed))
    curve, t0 = [], time.perf_counter()
    for it in range(45):
        buf, _ = runner.collect()
        runner.algo.update(buf)
        if (it + 1) % 15 == 0:
            curve.append(evaluate(policy, ToyGoalEnv(256), 512, seed=100 + seed)["success_rate"])
    return curve, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    torch.set_num_threads(1)
    print("| seed | head dtype | BC | after 15 / 30 / 45 iterations | loop s |")
    print("|---|---|---|---|---|")
    for seed in a.seeds:
        base = pretrain_toy(steps=400, seed=seed)
        for dtype in ("float32", "bfloat16"):
            policy = copy.deepcopy(base)
            policy.cfg.head_dtype = dtype
            pre = evaluate(policy, ToyGoalEnv(256), 512, seed=100 + seed)["success_rate"]
            torch.manual_seed(seed)
            with tempfile.TemporaryDirectory() as tmp:
                curve, secs = run(policy, seed, tmp)
            print(f"| {seed} | {dtype} | {pre:.2f} | {' / '.join(f'{c:.2f}' for c in curve)} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
