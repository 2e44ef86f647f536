"""DPPO loss/clipping by hand, ratio == 1 before the first update, GAE vs a reference loop, RWR weights."""

import math

import torch
from torch import nn

from vla_rl.algos import DPPO, DPPOConfig, compute_gae, group_advantages, rwr_weights
from vla_rl.policy import VLAPolicy
from vla_rl.policy.vla import Chain

from toy_utils import toy_policy_cfg
from vla_rl.envs.toy import toy_demos

torch.set_num_threads(1)


class StubPolicy(nn.Module):
    def __init__(self, new_logp, values):
        super().__init__()
        self.new_logp, self.values = new_logp, values
        self.w = nn.Parameter(torch.zeros(1))
        self.critic = nn.Linear(1, 1)

    def actor_parameters(self):
        return [self.w]

    def log_prob(self, obs, chain):
        return self.new_logp

    def value(self, obs):
        return self.values


def test_dppo_loss_hand_computed():
    new = torch.log(torch.tensor([[1.5, 0.5], [1.05, 0.7]]))
    pol = StubPolicy(new, torch.tensor([0.5, 0.0]))
    algo = DPPO(pol, DPPOConfig(clip_ploss_coef=0.2, gamma_denoising=0.5, norm_adv=False, freeze_early_steps=False))
    chain = Chain(torch.zeros(2, 1, 1), torch.zeros(2, 3, 1, 1), torch.zeros(2, 2))
    total, pg, vl, bc, st = algo.loss({}, chain, torch.zeros(2, 2), torch.tensor([1.0, -1.0]),
                                      torch.tensor([1.0, 1.0]), torch.zeros(2))
    # adv +1: max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5 ; adv -1: 1.05 (inside), max(0.7, 0.8) = 0.8
    # denoising weights 0.5^(K'-1-j) = [0.5, 1]
    assert math.isclose(pg.item(), (-1.2 * 0.5 - 0.5 + 1.05 * 0.5 + 0.8) / 4, rel_tol=1e-5)
    assert math.isclose(vl.item(), 0.5 * (0.25 + 1.0) / 2, rel_tol=1e-6)
    assert math.isclose(st["clip_frac"], 0.75)
    assert math.isclose(total.item(), pg.item() + 0.5 * vl.item(), rel_tol=1e-6)


def test_clip_varies_along_chain():
    algo = DPPO(StubPolicy(None, None), DPPOConfig(clip_ploss_coef=0.2, clip_ploss_coef_rate=0.5,
                                                   freeze_early_steps=False))
    assert torch.allclose(algo.clip_coefs(3, "cpu"), torch.tensor([0.05, 0.1, 0.2]))


def test_ratio_is_one_before_update():
    torch.manual_seed(0)
    pol = VLAPolicy(toy_policy_cfg(stochastic_steps=3))
    DPPO(pol, DPPOConfig())  # freezes the early steps, as in training
    obs, _ = toy_demos(16, 4)
    with torch.no_grad():
        chain = pol.sample(obs)
        lp = pol.log_prob(obs, chain)
    assert chain.log_prob.shape == (16, 3)
    assert torch.allclose(lp, chain.log_prob, atol=1e-5)


def gae_reference(rewards, values, next_values, terminated, truncated, gamma, lam):
    T, N = rewards.shape
    adv = torch.zeros(T, N)
    for n in range(N):
        for t in range(T):
            a, discount = 0.0, 1.0
            for u in range(t, T):
                boot = 0.0 if terminated[u, n] else next_values[u, n]
                delta = rewards[u, n] + gamma * boot - values[u, n]
                a += discount * delta
                if terminated[u, n] or truncated[u, n]:
                    break
                discount *= gamma * lam
            adv[t, n] = a
    return adv


def test_gae_matches_reference_with_terminations_and_truncations():
    g = torch.Generator().manual_seed(0)
    T, N = 7, 5
    rewards = (torch.rand(T, N, generator=g) > 0.7).float()
    values = torch.rand(T, N, generator=g)
    next_values = torch.rand(T, N, generator=g)  # V(next obs), V(final_obs) where truncated
    terminated = torch.rand(T, N, generator=g) > 0.8
    truncated = (torch.rand(T, N, generator=g) > 0.8) & ~terminated
    assert terminated.any() and truncated.any()
    adv, ret = compute_gae(rewards, values, next_values, terminated, terminated | truncated, 0.9, 0.8)
    ref = gae_reference(rewards, values, next_values, terminated, truncated, 0.9, 0.8)
    assert torch.allclose(adv, ref, atol=1e-5)
    assert torch.allclose(ret, ref + values, atol=1e-5)


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    adv, rtg = group_advantages(rewards, torch.ones(1, 4, dtype=torch.bool), torch.tensor([[0, 0, 1, 1]]))
    assert torch.allclose(adv, torch.tensor([[1.0, -1.0, -1.0, 1.0]]), atol=1e-4)


def test_rwr_weights():
    r = torch.tensor([0.0, 1.0, 2.0])
    w = rwr_weights(r, beta=1.0, max_weight=2.0, normalize=True)
    z = (r - r.mean()) / r.std()
    assert torch.allclose(w, torch.exp(z).clamp(max=2.0))
    assert w.max().item() == 2.0
    w2 = rwr_weights(r, beta=0.5, max_weight=100.0, normalize=False)
    assert torch.allclose(w2, torch.exp(0.5 * r))


def test_group_advantage_updates_actor_despite_critic_warmup(tmp_path):
    """Critic-free DPPO ignores n_critic_warmup_itr (there is no critic to warm up) and moves the actor."""
    from vla_rl.envs.toy import ToyGoalEnv
    from vla_rl.runner import Runner, RunnerConfig, TrainConfig

    from toy_utils import pretrain_toy

    policy = pretrain_toy(steps=150, seed=0)  # succeeds about half the time: mixed outcomes in each group
    cfg = TrainConfig(algo="dppo", dppo=DPPOConfig(advantage="group", n_critic_warmup_itr=2, update_epochs=1),
                      runner=RunnerConfig(iterations=1, num_envs=32, steps_per_iter=1, group_size=8, eval_every=0,
                                          checkpoint_every=0, log_dir=str(tmp_path), progress=False))
    runner = Runner(cfg, policy=policy, env=ToyGoalEnv(32, seed=0))
    before = [p.detach().clone() for p in policy.head.parameters()]
    buf, _ = runner.collect()
    assert runner.algo.compute_advantages(buf)[0].abs().sum() > 0
    runner.algo.update(buf)
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.head.parameters()))
