"""The Gaussian control policy (``noise.kind="gaussian"``): the same encoders, head network, runner,
algorithms and export as the diffusion policy, with a one-step Gaussian instead of the denoising chain."""

import time

import numpy as np
import torch

from vla_rl.algos import DPPOConfig
from vla_rl.deploy import PolicyRuntime
from vla_rl.envs.toy import ToyGoalEnv
from vla_rl.evaluate import evaluate
from vla_rl.export import export_bundle
from vla_rl.policy import VLAPolicy
from vla_rl.runner import RunnerConfig, TrainConfig, train

from toy_utils import pretrain_toy

torch.set_num_threads(1)
GAUSSIAN = {"kind": "gaussian", "sample_steps": 1, "std_floor": 0.01, "log_std_init": -0.5}


def test_gaussian_policy_saves_loads_and_exports_with_parity(tmp_path):
    policy = pretrain_toy(steps=50, **GAUSSIAN)
    with torch.no_grad():
        policy.action_log_std.fill_(-0.7)  # not the initial value: it must travel with the weights
    policy.save_pretrained(tmp_path / "p")
    loaded = VLAPolicy.from_pretrained(tmp_path / "p")
    obs = ToyGoalEnv(5, seed=3).reset(seed=3)
    noise = torch.randn(5, 2, 4, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = policy.sample(obs, noise=noise)
        again = loaded.sample(obs, noise=noise)
    assert torch.equal(ref.actions, again.actions) and torch.equal(ref.log_prob, again.log_prob)
    rt = PolicyRuntime.load(export_bundle(loaded, tmp_path / "bundle", hold="last"))
    got = rt.predict_chunk(obs["state"].numpy(), obs["instruction"], None, noise.numpy())
    assert np.abs(got - ref.actions.numpy()).max() <= 1e-4
    # The draw around the mean is exp(log_std) wide: other noise, other actions.
    assert np.abs(rt.predict_chunk(obs["state"].numpy(), obs["instruction"], None, noise.numpy() + 1)
                  - ref.actions.numpy()).max() > 1e-2


def test_gaussian_ppo_through_the_runner_learns_the_toy_task(tmp_path):
    """MSE BC on the bimodal toy demos averages the two modes; PPO (DPPO on a one-step chain) fixes it."""
    t0 = time.perf_counter()
    policy = pretrain_toy(steps=400, seed=0, **GAUSSIAN)
    pre = evaluate(policy, ToyGoalEnv(256), 512, seed=1)["success_rate"]
    std0 = policy.action_log_std.detach().clone()
    cfg = TrainConfig(algo="dppo",
                      dppo=DPPOConfig(train_encoders=True, actor_lr=1e-3, critic_lr=3e-3, update_epochs=10, kl_revert=0.0,
                                      num_minibatches=1, clip_ploss_coef=0.2, clip_ploss_coef_base=0.2),
                      runner=RunnerConfig(iterations=45, num_envs=128, steps_per_iter=1, eval_every=0,
                                          checkpoint_every=0, seed=0, log_dir=str(tmp_path / "run"), progress=False))
    train(cfg, policy=policy, env=ToyGoalEnv(128, seed=0))
    post = evaluate(policy, ToyGoalEnv(256), 512, seed=2)["success_rate"]
    print(f"gaussian: pretrained {pre:.3f} -> PPO {post:.3f} in {time.perf_counter() - t0:.1f}s")
    assert post >= 0.9 and post > pre + 0.2, (pre, post)
    assert not torch.equal(policy.action_log_std.detach(), std0)  # the std is trained, not fixed
