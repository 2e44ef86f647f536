"""DSRL: the noise actor's squashed-Gaussian likelihood and bound, SAC's targets by hand, the frozen chain,
replay/resume, export parity, and learning on the toy task."""

import math

import numpy as np
import pytest
import torch

from vla_rl.algos import DSRL, DSRLConfig, ReplayBuffer
from vla_rl.envs.toy import ToyGoalEnv, toy_demos
from vla_rl.evaluate import evaluate
from vla_rl.policy import VLAPolicy
from vla_rl.policy.config import NoiseActorConfig
from vla_rl.policy.noise_actor import NoiseActor
from vla_rl.runner import Runner, RunnerConfig, TrainConfig

from toy_utils import pretrain_toy, toy_policy_cfg

torch.set_num_threads(1)


def test_squashed_gaussian_log_prob_matches_change_of_variables():
    torch.manual_seed(0)
    actor = NoiseActor(NoiseActorConfig(bound=1.5, hidden=[16]), feature_dim=5, horizon=2, action_dim=3)
    torch.nn.init.normal_(actor.net[-1].weight, std=0.5)
    feats = torch.randn(64, 5)
    eps = torch.randn(64, 6) * 3  # large draws: the squash saturates, the softplus form must stay finite
    w, logp = actor.sample(feats, eps=eps)
    assert w.shape == (64, 2, 3) and w.abs().max() <= 1.5 and torch.isfinite(logp).all()
    mean, log_std = actor(feats)
    u = mean + log_std.exp() * eps
    ref = torch.distributions.Normal(mean.double(), log_std.exp().double()).log_prob(u.double()).sum(-1)
    ref -= torch.log(1.5 * (1 - torch.tanh(u.double()) ** 2) + 1e-300).sum(-1)
    ok = torch.isfinite(ref)
    assert ok.sum() > 32
    assert torch.allclose(logp.double()[ok], ref[ok], rtol=1e-4, atol=1e-3)
    # The density integrates to 1 over the box (1-D, numerically).
    a1 = NoiseActor(NoiseActorConfig(bound=1.5, hidden=[4]), 1, 1, 1)
    grid = torch.linspace(-1.5 + 1e-4, 1.5 - 1e-4, 20001)
    u = torch.atanh(grid / 1.5)
    m, ls = a1(torch.zeros(1, 1))
    dens = a1.log_prob_pre_squash(u[:, None], m, ls).exp()
    assert abs(torch.trapezoid(dens, grid).item() - 1) < 1e-3


def test_sac_target_and_losses_by_hand():
    torch.manual_seed(0)
    pol = VLAPolicy(toy_policy_cfg())
    algo = DSRL(pol, DSRLConfig(n_critics=2, gamma=0.9, tau=0.5, init_alpha=0.5, batch_size=4, learning_starts=0))
    F, E, D = algo.feature_dim, algo.extra_dim, algo.noise_dim
    batch = {"feat": torch.randn(4, F), "extra": torch.rand(4, E), "w": torch.rand(4, D) - 0.5,
             "reward": torch.tensor([0.0, 1.0, 0.0, 1.0]), "next_feat": torch.randn(4, F),
             "next_extra": torch.rand(4, E), "done": torch.tensor([0.0, 1.0, 1.0, 0.0])}
    torch.manual_seed(1)
    w_next, logp_next = algo.actor.sample(batch["next_feat"])
    x_next = torch.cat([batch["next_feat"], batch["next_extra"], w_next.flatten(1)], -1)
    q1, q2 = (t(x_next).squeeze(-1) for t in algo.targets)
    y = batch["reward"] + 0.9 * (1 - batch["done"]) * (torch.minimum(q1, q2) - 0.5 * logp_next)
    x = torch.cat([batch["feat"], batch["extra"], batch["w"]], -1)
    want_critic = 0.5 * sum(((c(x).squeeze(-1) - y) ** 2) for c in algo.critics).mean()
    before = [p.clone() for p in algo.critics.parameters()]
    targets_before = [p.clone() for p in algo.targets.parameters()]
    torch.manual_seed(1)
    stats = algo.gradient_step(batch)
    assert math.isclose(stats["critic_loss"], want_critic.item(), rel_tol=1e-5)
    assert math.isclose(stats["alpha"], 0.5, rel_tol=1e-6)
    # Polyak with tau = 0.5: target = (old target + new critic) / 2
    for t0, t1, c in zip(targets_before, algo.targets.parameters(), algo.critics.parameters()):
        assert torch.allclose(t1, 0.5 * t0 + 0.5 * c)
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.critics.parameters()))


def test_base_chain_frozen_and_deterministic():
    torch.manual_seed(0)
    pol = pretrain_toy(steps=30, seed=0)
    base = {k: v.clone() for k, v in pol.state_dict().items()}
    algo = DSRL(pol, DSRLConfig(batch_size=8, learning_starts=0, utd=2))
    obs, _ = toy_demos(8, 4)
    w = torch.rand(8, 4, 2) * 2 - 1
    a1 = pol.sample(obs, init_noise=w).actions
    a2 = pol.sample(obs, init_noise=w, generator=torch.Generator().manual_seed(5)).actions
    assert torch.equal(a1, a2)  # the steered chain has no randomness left after x_K
    for _ in range(3):
        feats = pol.encode(obs).flatten(1).detach()
        algo.observe(feats, torch.zeros(8, 1), w, torch.rand(8), feats, torch.zeros(8, 1), torch.zeros(8))
        algo.update()
    assert algo.grad_steps > 0
    after = pol.state_dict()
    moved = {k for k in base if not torch.equal(base[k], after[k])}
    assert moved == set(), moved  # only noise_actor.* (not in base) may change
    assert torch.equal(pol.sample(obs, init_noise=w).actions, a1)  # same x_K -> same chunk after updates
    assert any(p.requires_grad for p in pol.noise_actor.parameters())
    assert not any(p.requires_grad for n, p in pol.named_parameters() if not n.startswith("noise_actor."))


def test_replay_buffer_wraps():
    buf = ReplayBuffer(5, 2, 1, 3)
    for i in range(3):
        n = 2
        buf.add(feat=torch.full((n, 2), float(i)), extra=torch.zeros(n, 1), w=torch.zeros(n, 3),
                reward=torch.full((n,), float(i)), next_feat=torch.zeros(n, 2), next_extra=torch.zeros(n, 1),
                done=torch.zeros(n))
    assert buf.size == 5 and buf.pos == 1
    assert buf.data["reward"].tolist() == [2.0, 0.0, 1.0, 1.0, 2.0]  # the oldest (slot 0) overwritten first


def test_dsrl_learns_the_toy_task_and_resumes(tmp_path):
    policy = pretrain_toy(steps=400, seed=0)
    pre = evaluate(policy, ToyGoalEnv(256), 512, seed=1, deterministic=True)["success_rate"]
    assert 0.2 <= pre <= 0.8, pre
    cfg = TrainConfig(algo="dsrl", dsrl=DSRLConfig(learning_starts=256, utd=1.0, batch_size=128,
                                                   actor_hidden=(64, 64), critic_hidden=(64, 64), target_entropy=-4.0),
                      runner=RunnerConfig(iterations=60, num_envs=32, steps_per_iter=1, eval_every=0, checkpoint_every=30,
                                          seed=0, log_dir=str(tmp_path / "run"), progress=False))
    runner = Runner(cfg, policy=policy, env=ToyGoalEnv(32, seed=0))
    runner.train()
    post = evaluate(policy, ToyGoalEnv(256), 512, seed=2, deterministic=True)["success_rate"]
    assert post >= 0.9, (pre, post)
    # Resume: a new runner on the same directory picks up the noise actor, critics and replay buffer.
    fresh = pretrain_toy(steps=400, seed=0)
    cfg.runner.iterations = 61
    r2 = Runner(cfg, policy=fresh, env=ToyGoalEnv(32, seed=0))
    assert r2.iteration == 60 and r2.algo.replay.size == runner.algo.replay.size
    assert r2.algo.decisions == runner.algo.decisions
    for a, b in zip(r2.algo.critics.parameters(), runner.algo.critics.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(fresh.noise_actor.net[0].weight, policy.noise_actor.net[0].weight)
