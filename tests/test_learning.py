"""DPPO must fix a pretrained diffusion policy that picks the wrong mode half of the time.

Toy task (envs/toy.py): the correct goal is visible in the state, the demos go to either goal 50/50
regardless of it. The BC policy therefore succeeds ~50% (asserted in [25%, 75%], so a broken pretrain
fails the test); a seeded DPPO run must then reach >= 90% on held-out seeds — a 2-mode guess cannot.
"""

import time

import torch

from vla_rl.algos import DPPOConfig
from vla_rl.envs.toy import ToyGoalEnv
from vla_rl.evaluate import evaluate
from vla_rl.runner import RunnerConfig, TrainConfig, train

from toy_utils import pretrain_toy

torch.set_num_threads(1)


def test_dppo_fixes_the_wrong_mode(tmp_path):
    t0 = time.perf_counter()
    policy = pretrain_toy(steps=400, seed=0)
    pre = evaluate(policy, ToyGoalEnv(256), 512, seed=1)["success_rate"]
    assert 0.25 <= pre <= 0.75, pre
    # The toy's deadline is part of the task (one decision per episode), so a timeout is a failure:
    # bootstrap_truncated=False. Outcome rewards are already in [0, 1]: no running reward scaling. The toy's
    # demos ignore the goal bit, so BC never taught the encoders to carry it: they are trained too
    # (train_encoders=True; with the default, head only, the same run ends at ~0.5). Its lr of 1e-3 takes steps
    # whose KL passes the hard limit that guards real tasks (dppo.kl_revert), so the guard is off here. Three
    # critic-only iterations first, as the presets: an update from the untrained critic's advantages can collapse
    # the policy onto one goal in the first iteration (approx KL 0.37 there; seen on a CPU without AVX512, where
    # this run at lr 1e-3 without the warm-up ended at 0.51). 70 iterations: on a CPU with AVX512 the float32
    # kernels round differently and 45 iterations ended at 0.60-0.75 over RL seeds 0-2, where 70 reach >= 0.99.
    cfg = TrainConfig(algo="dppo",
                      dppo=DPPOConfig(train_encoders=True, actor_lr=3e-4, critic_lr=3e-3, update_epochs=10, num_minibatches=1, kl_revert=0.0,
                                      n_critic_warmup_itr=3,
                                      clip_ploss_coef=0.2, clip_ploss_coef_base=0.2, gamma_denoising=0.9,
                                      bootstrap_truncated=False,
                                      reward_scale_running=False),
                      runner=RunnerConfig(iterations=70, num_envs=128, steps_per_iter=1, eval_every=0,
                                          checkpoint_every=0, seed=0, log_dir=str(tmp_path / "run"), progress=False))
    train(cfg, policy=policy, env=ToyGoalEnv(128, seed=0))
    post = evaluate(policy, ToyGoalEnv(256), 512, seed=2)["success_rate"]
    print(f"pretrained {pre:.3f} -> DPPO {post:.3f} in {time.perf_counter() - t0:.1f}s")
    assert post >= 0.9, (pre, post)
