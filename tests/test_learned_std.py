"""``noise.learn_std``: a DDIM or flow chain whose stochastic transitions draw with a learned per-dimension std,
switched on for fine-tuning a checkpoint trained without it, trained by DPPO, saved and exported with it."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from vla_rl.algos import DPPOConfig
from vla_rl.deploy import PolicyRuntime
from vla_rl.envs.toy import ToyGoalEnv
from vla_rl.checkpoint import CheckpointError
from vla_rl.export import export_bundle
from vla_rl.policy import VLAPolicy
from vla_rl.runner import RunnerConfig, TrainConfig, train

from toy_utils import pretrain_toy

torch.set_num_threads(1)
LEARNED = {"learn_std": True, "log_std_init": math.log(0.3), "std_floor": 0.05, "stochastic_steps": 1}


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_the_last_transition_draws_with_the_learned_std_and_its_exact_likelihood(kind):
    policy = pretrain_toy(steps=5, kind=kind, **LEARNED)
    with torch.no_grad():
        policy.action_log_std.copy_(torch.tensor([math.log(0.4), math.log(0.01)]))  # the second under the floor
    obs = ToyGoalEnv(6, seed=1).reset(seed=1)
    noise = torch.randn(6, policy.noise.num_steps + 1, 4, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = policy.sample(obs, noise=noise)
        mean_only = policy.sample(obs, noise=noise * torch.tensor([1.0] * policy.noise.num_steps + [0.0]).view(1, -1, 1, 1))
    # x_K minus the noiseless last step is std * the last draw, per action dimension
    step = out.latents[:, -1] - mean_only.latents[:, -1]
    assert torch.allclose(step, noise[:, -1] * torch.tensor([0.4, 0.05]), atol=1e-5)
    last = noise[:, -1]
    expected = (-0.5 * last**2 - torch.log(torch.tensor([0.4, 0.05])) - 0.5 * math.log(2 * math.pi)).sum((-1, -2))
    assert torch.allclose(out.log_prob[:, -1], expected, atol=1e-4)
    # the likelihood carries gradient to the std (what PPO trains)
    policy.log_prob(obs, out).sum().backward()
    assert policy.action_log_std.grad is not None and policy.action_log_std.grad[0].abs() > 0


def test_switching_learn_std_on_for_fine_tuning_starts_at_its_initial_value_and_travels_with_the_weights(tmp_path):
    plain = pretrain_toy(steps=20, kind="flow", stochastic_steps=1)
    assert plain.action_log_std is None
    plain.save_pretrained(tmp_path / "bc")
    tuned = VLAPolicy.from_pretrained(tmp_path / "bc", noise={"learn_std": True, "log_std_init": -1.2})
    assert torch.allclose(tuned.action_log_std.detach(), torch.full((2,), -1.2))
    assert any(p is tuned.action_log_std for p in tuned.actor_parameters())
    with torch.no_grad():
        tuned.action_log_std.copy_(torch.tensor([-0.9, -1.6]))
    tuned.save_pretrained(tmp_path / "rl")
    again = VLAPolicy.from_pretrained(tmp_path / "rl")
    assert again.cfg.noise.learn_std and torch.equal(again.action_log_std, tuned.action_log_std)
    # the learned std is part of the weights: dropping it is a mismatch, not a silent fall-back to the floor
    with pytest.raises(CheckpointError, match="action_log_std"):
        VLAPolicy.from_pretrained(tmp_path / "rl", noise={"learn_std": False})
    # exported: the bundle draws with the learned std
    obs = ToyGoalEnv(4, seed=2).reset(seed=2)
    noise = torch.randn(4, again.noise.num_steps + 1, 4, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = again.sample(obs, noise=noise).actions
    rt = PolicyRuntime.load(export_bundle(again, tmp_path / "bundle", hold="last"))
    got = rt.predict_chunk(obs["state"].numpy(), obs["instruction"], None, noise.numpy())
    assert np.abs(got - ref.numpy()).max() <= 1e-4


def test_a_saved_config_with_the_old_key_name_still_loads(tmp_path):
    policy = pretrain_toy(steps=5, kind="gaussian", sample_steps=1, std_floor=0.01, log_std_init=-0.5)
    policy.save_pretrained(tmp_path / "p")
    cfg_file = tmp_path / "p" / "config.yaml"
    saved = OmegaConf.load(cfg_file)
    saved.noise.gaussian_log_std = saved.noise.pop("log_std_init")
    OmegaConf.save(saved, cfg_file)
    loaded = VLAPolicy.from_pretrained(tmp_path / "p")
    assert loaded.cfg.noise.log_std_init == -0.5


def test_dppo_trains_the_learned_std_of_the_chain_and_logs_it(tmp_path):
    policy = pretrain_toy(steps=100, kind="flow", **LEARNED)
    std0 = policy.action_log_std.detach().clone()
    cfg = TrainConfig(algo="dppo",
                      dppo=DPPOConfig(train_encoders=True, actor_lr=1e-2, update_epochs=2, num_minibatches=1,
                                      n_critic_warmup_itr=0, kl_revert=0.0, target_kl=0.0),
                      runner=RunnerConfig(iterations=3, num_envs=32, steps_per_iter=1, eval_every=0,
                                          checkpoint_every=0, seed=0, log_dir=str(tmp_path / "run"), progress=False))
    run_dir = train(cfg, policy=policy, env=ToyGoalEnv(32, seed=0))
    assert not torch.equal(policy.action_log_std.detach(), std0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((run_dir / "tb").iterdir()))).Reload()
    tag = next(t for t in acc.Tags()["scalars"] if t.endswith("action_std"))
    stds = [e.value for e in acc.Scalars(tag)]
    assert len(stds) == 3 and abs(stds[-1] - policy.action_log_std.detach().exp().mean().item()) < 1e-5
