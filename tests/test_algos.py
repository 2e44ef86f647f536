"""DPPO loss/clipping by hand, ratio == 1 before the first update, GAE vs a reference loop, RWR weights."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from vla_rl.algos import DPPO, DPPOConfig, compute_gae, group_advantages, rwr_weights
from vla_rl.policy import VLAPolicy
from vla_rl.policy.vla import Chain

from toy_utils import toy_policy_cfg
from vla_rl.envs.toy import toy_demos

torch.set_num_threads(1)


class StubPolicy(nn.Module):
    """log_prob returns fixed values: [B, K'] joint, or [B, K', H, A] per coordinate."""

    def __init__(self, new_logp, values, exec_steps=1):
        super().__init__()
        self.new_logp, self.values = new_logp, values
        self.w = nn.Parameter(torch.zeros(1))
        self.head = nn.ParameterList([self.w])  # what DPPO fine-tunes by default (train_encoders=False)
        self.critic = nn.Linear(1, 1)
        self.cfg = type("Cfg", (), {"exec_steps": exec_steps})

    def actor_parameters(self):
        return [self.w]

    def head_parameters(self):
        return [self.w]

    def log_prob(self, obs, chain, per_dim=False):
        assert per_dim == (self.new_logp.dim() == 4)
        return self.new_logp

    def value(self, obs):
        return self.values

    def enable_critic_clock(self):  # the stub's values are fixed
        pass


def test_dppo_loss_hand_computed():
    new = torch.log(torch.tensor([[1.5, 0.5], [1.05, 0.7]]))
    pol = StubPolicy(new, torch.tensor([0.5, 0.0]))
    algo = DPPO(pol, DPPOConfig(clip_ploss_coef=0.2, clip_ploss_coef_base=0.2, gamma_denoising=0.5, norm_adv=False,
                                freeze_early_steps=False, logprob="joint"))
    chain = Chain(torch.zeros(2, 1, 1), torch.zeros(2, 3, 1, 1), torch.zeros(2, 2))
    total, pg, vl, bc, st = algo.loss({}, chain, torch.zeros(2, 2), torch.tensor([1.0, -1.0]),
                                      torch.tensor([1.0, 1.0]), torch.zeros(2))
    # adv +1: max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5 ; adv -1: 1.05 (inside), max(0.7, 0.8) = 0.8
    # denoising weights 0.5^(K'-1-j) = [0.5, 1]
    assert math.isclose(pg.item(), (-1.2 * 0.5 - 0.5 + 1.05 * 0.5 + 0.8) / 4, rel_tol=1e-5)
    assert math.isclose(vl.item(), 0.5 * (0.25 + 1.0) / 2, rel_tol=1e-6)
    assert math.isclose(st["clip_frac"], 0.75)
    assert math.isclose(total.item(), pg.item() + 0.5 * vl.item(), rel_tol=1e-6)


def test_mean_executed_log_prob_by_hand():
    # 1 decision, K' = 1, chunk H = 3 x A = 2, 2 executed actions: the ratio uses the mean of the
    # executed coordinates' log-densities, each clamped to [-5, 2]; the third (unexecuted) row is ignored.
    per_dim = torch.tensor([[[[0.5, -7.0], [3.0, 0.1], [100.0, 100.0]]]])
    pol = StubPolicy(per_dim, torch.zeros(1), exec_steps=2)
    algo = DPPO(pol, DPPOConfig(logprob="mean_executed", freeze_early_steps=False))
    lp = algo.transition_log_prob({}, None)
    assert lp.shape == (1, 1)
    assert math.isclose(lp.item(), (0.5 - 5.0 + 2.0 + 0.1) / 4, rel_tol=1e-6)
    # The joint form is the policy's own [B, K'] log-likelihood, untouched.
    joint = DPPO(StubPolicy(torch.tensor([[-40.0]]), torch.zeros(1)), DPPOConfig(logprob="joint", freeze_early_steps=False))
    assert joint.transition_log_prob({}, None).item() == -40.0
    with pytest.raises(ValueError, match="logprob"):
        DPPO(pol, DPPOConfig(logprob="sum", freeze_early_steps=False))


def test_clip_varies_along_chain():
    # DPPO's schedule: base at the first fine-tuned transition, rising as (e^(rate t) - 1) / (e^rate - 1).
    algo = DPPO(StubPolicy(None, None), DPPOConfig(clip_ploss_coef=0.2, clip_ploss_coef_base=0.02,
                                                   clip_ploss_coef_rate=3.0, freeze_early_steps=False))
    mid = 0.02 + 0.18 * (math.exp(1.5) - 1) / (math.exp(3.0) - 1)
    assert torch.allclose(algo.clip_coefs(3, "cpu"), torch.tensor([0.02, mid, 0.2]))
    flat = DPPO(StubPolicy(None, None), DPPOConfig(clip_ploss_coef=0.1, clip_ploss_coef_base=0.1, freeze_early_steps=False))
    assert torch.allclose(flat.clip_coefs(4, "cpu"), torch.full((4,), 0.1))


@pytest.mark.parametrize("head_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("logprob", ["joint", "mean_executed"])
def test_ratio_is_one_before_update(logprob, head_dtype):
    torch.manual_seed(0)
    cfg = toy_policy_cfg(stochastic_steps=3)
    cfg.head_dtype = head_dtype
    pol = VLAPolicy(cfg)
    with torch.no_grad():  # a fresh DiT head outputs zeros (adaLN-zero): give it weights that matter
        for p in pol.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    algo = DPPO(pol, DPPOConfig(logprob=logprob))  # freezes the early steps, as in training
    obs, _ = toy_demos(16, 4)
    with torch.no_grad():
        chain = pol.sample(obs)
        lp = pol.log_prob(obs, chain)
        per_dim = pol.log_prob(obs, chain, per_dim=True)
    assert chain.log_prob.shape == (16, 3)
    assert torch.allclose(lp, chain.log_prob, atol=1e-5)
    assert per_dim.shape == (16, 3, pol.cfg.horizon, pol.cfg.action_dim)
    assert torch.allclose(per_dim.sum((-1, -2)), chain.log_prob, atol=1e-4)
    # The update's first ratio (old log-probs as the update computes them) is exactly 1.
    from vla_rl.rollout import RolloutBuffer
    buf = RolloutBuffer(1, 16)
    buf.add(obs, chain, torch.zeros(16), torch.zeros(16), torch.zeros(16), torch.zeros(16), torch.zeros(16))
    buf.finalize()
    flat = buf.flatten(torch.zeros(1, 16), torch.zeros(1, 16))
    old = algo.old_log_probs(buf, flat)
    with torch.no_grad():
        new = algo.transition_log_prob(RolloutBuffer.index_obs(flat, torch.arange(16)), flat["chain"])
    assert torch.equal((new - old).exp(), torch.ones(16, 3))


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


def test_dppo_bc_regularization_regresses_on_the_pretrained_draws_before_the_clamp():
    """dppo.bc_coef: the BC target is the frozen pretrained chain's draw x_0, not its executed (clamped) action."""
    torch.manual_seed(0)
    pol = VLAPolicy(toy_policy_cfg(stochastic_steps=3))
    algo = DPPO(pol, DPPOConfig(bc_coef=0.5))
    obs, _ = toy_demos(4, 4)
    obs = {**obs, "episode_time": torch.zeros(4)}
    drawn = algo.pretrained.sample(obs)
    drawn.latents[:, -1] = 1.5  # a draw beyond the action bounds; executed clamped to 1
    algo.pretrained.sample = lambda _obs: drawn
    seen = []
    bc_loss = pol.bc_loss
    pol.bc_loss = lambda o, target, *a, **k: seen.append(target) or bc_loss(o, target, *a, **k)
    chain = pol.sample(obs)
    algo.loss(obs, chain, chain.log_prob, torch.zeros(4), torch.zeros(4), torch.zeros(4))
    torch.testing.assert_close(seen[0], pol.normalizer.unnormalize_action(torch.full_like(drawn.actions, 1.5)))


def test_rwr_weights():
    r = torch.tensor([0.0, 1.0, 2.0])
    w = rwr_weights(r, beta=1.0, max_weight=2.0, normalize=True)
    z = (r - r.mean()) / r.std()
    assert torch.allclose(w, torch.exp(z).clamp(max=2.0))
    assert w.max().item() == 2.0
    w2 = rwr_weights(r, beta=0.5, max_weight=100.0, normalize=False)
    assert torch.allclose(w2, torch.exp(0.5 * r))


def _rollout(pol, obs, rewards, dones, unstable=None):
    from vla_rl.rollout import RolloutBuffer

    T, N = dones.shape
    buf = RolloutBuffer(T, N)
    with torch.no_grad():
        for t in range(T):
            z = torch.zeros(N)
            buf.add(obs, pol.sample(obs), rewards[t], dones[t], z, z, z,
                    unstable=None if unstable is None else unstable[t])
    buf.finalize()
    return buf


def test_rwr_regresses_on_whole_episodes_across_rollouts():
    """An episode cut by the end of a rollout joins the update with every decision once it ends; decisions
    weigh by their discounted return-to-go; the update waits for min_episodes; a reset drops what is running."""
    from vla_rl.algos import RWR, RWRConfig

    torch.manual_seed(0)
    pol = VLAPolicy(toy_policy_cfg(stochastic_steps=3))
    obs, _ = toy_demos(2, 4)
    algo = RWR(pol, RWRConfig(update_epochs=1, num_minibatches=1, gamma=0.5, min_episodes=2))
    # Rollout 1: env 0 succeeds at t=1; env 1 is still running at the end.
    buf1 = _rollout(pol, obs, torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[False, False], [True, False]]))
    stats = algo.update(buf1)
    assert stats["skipped"] == 1.0 and stats["episodes_ready"] == 1.0  # one episode: below min_episodes
    # Rollout 2: env 1's episode succeeds at t=0 (its third decision); env 0's new one is still running.
    buf2 = _rollout(pol, obs, torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([[False, True], [False, False]]))
    algo.add_rollout(buf2)
    td, instructions, ret = algo.ready_batch()
    assert ret.tolist() == [0.5, 1.0, 0.25, 0.5, 1.0]  # gamma = 0.5 per decision before the success
    # The targets are the chain's own draws x_0 before the clamp to the action bounds, not the executed actions.
    drawn = [pol.normalizer.unnormalize_action(b.data["latents"][:, :, -1]) for b in (buf1, buf2)]
    expected = torch.cat([drawn[0][:, 0], drawn[0][:, 1], drawn[1][:1, 1]])
    assert torch.allclose(td["actions"], expected) and len(instructions) == 5
    executed = torch.cat([buf1.data["actions"][:, 0], buf1.data["actions"][:, 1], buf2.data["actions"][:1, 1]])
    assert not torch.allclose(expected, executed) and torch.equal(expected.clamp(-1, 1), executed)
    before = [p.detach().clone() for p in pol.head.parameters()]
    algo = RWR(pol, RWRConfig(update_epochs=1, num_minibatches=1, gamma=0.5, min_episodes=2))
    algo.update(buf1)
    stats = algo.update(buf2)
    assert stats["skipped"] == 0.0 and stats["decisions"] == 5.0 and stats["episodes_ready"] == 2.0
    assert any(not torch.equal(a, p) for a, p in zip(before, pol.head.parameters()))
    # A reset of the envs (evaluation on the training envs) ends the running episodes without an outcome.
    algo.ready, algo.pending = [], None
    algo.add_rollout(buf1)
    algo.on_env_reset()
    algo.add_rollout(buf2)
    assert [len(e["ret"]) for e in algo.ready] == [2, 1]  # env 1's 2 decisions before the reset are gone
    # A diverged episode has no outcome either.
    algo.ready, algo.pending = [], None
    algo.add_rollout(_rollout(pol, obs, torch.zeros(1, 2), torch.tensor([[True, True]]),
                              unstable=torch.tensor([[True, False]])))
    assert len(algo.ready) == 1


def test_rwr_advantage_weights_use_the_critic_before_it_fits_the_batch():
    """rwr.weights=advantage: the critic reads the episode clock, fits alone for critic_warmup updates (the actor
    untouched), then the actor's weights are exp(beta * normalized (G_t - V(s_t))) with V as the earlier updates
    left it; the critic's optimizer and fit count are checkpointed."""
    from vla_rl.algos import RWR, RWRConfig
    from vla_rl.algos.rwr import _minibatch_obs

    torch.manual_seed(0)
    pol = VLAPolicy(toy_policy_cfg(stochastic_steps=3))
    with pytest.raises(ValueError, match="rwr.weights"):
        RWR(pol, RWRConfig(weights="advantages"))
    assert not pol.cfg.critic_clock
    cfg = RWRConfig(weights="advantage", critic_warmup=1, update_epochs=2, num_minibatches=1, gamma=0.5,
                    min_episodes=2, beta=1.0)
    algo = RWR(pol, cfg)
    assert pol.cfg.critic_clock and pol.critic.use_clock
    assert set(algo.optimizers()) == {"actor", "critic"}
    obs, _ = toy_demos(2, 4)
    obs = {**obs, "episode_time": torch.tensor([0.1, 0.3])}
    rewards, dones = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[False, False], [True, False]])
    buf1 = _rollout(pol, obs, rewards, dones)
    buf2 = _rollout(pol, obs, torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([[False, True], [False, False]]))

    def params(module):
        return [p.detach().clone() for p in module.parameters()]

    actor, critic = params(pol.head), params(pol.critic)
    algo.update(buf1)
    stats = algo.update(buf2)  # the first full batch: the critic alone
    assert stats["skipped"] == 1.0 and stats["value_loss"] > 0 and algo.critic_fits == 1
    assert all(torch.equal(a, p) for a, p in zip(actor, pol.head.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(critic, pol.critic.parameters()))

    algo.pending = None
    algo.update(buf1)  # env 0's episode is ready, env 1's still running: below min_episodes
    ready = RWR(VLAPolicy(toy_policy_cfg(stochastic_steps=3)), RWRConfig(min_episodes=2, gamma=0.5))
    ready.add_rollout(buf1)
    ready.add_rollout(buf2)
    td, instructions, ret = ready.ready_batch()
    with torch.no_grad():
        value = pol.value(_minibatch_obs(td, instructions, torch.arange(len(ret))))
    seen = {}
    regress = algo._regress

    def spy(td_, instructions_, w, targets):
        seen["w"], seen["targets"] = w, targets
        return regress(td_, instructions_, w, targets)

    algo._regress = spy
    actor = params(pol.head)
    stats = algo.update(buf2)
    assert stats["skipped"] == 0.0 and stats["decisions"] == 5.0
    torch.testing.assert_close(seen["w"], rwr_weights(ret - value, 1.0, cfg.max_weight))
    assert torch.equal(seen["targets"], ret)  # the critic regresses on the returns-to-go
    r = ret - ret.mean()
    e = (ret - value) - (ret - value).mean()
    assert abs(stats["explained_variance"] - (1 - e.pow(2).mean() / r.pow(2).mean()).item()) < 1e-5
    assert any(not torch.equal(a, p) for a, p in zip(actor, pol.head.parameters()))
    assert algo.extra_state()["critic_fits"] == 2


def test_rwr_transition_target_weights_the_exact_likelihood_of_the_stored_transitions():
    """rwr.target=transition: the weighted loss is minus the Gaussian log-likelihood of the stored stochastic
    transitions (per action coordinate), the early deterministic steps run a frozen copy of the head, and a
    chain without transition noise is refused."""
    from vla_rl.algos import RWR, RWRConfig

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="rwr.ode_sampling"):
        RWR(VLAPolicy(toy_policy_cfg(stochastic_steps=1, init_scale=1.0)),
            RWRConfig(target="transition", ode_sampling=True))
    pol = VLAPolicy(toy_policy_cfg(stochastic_steps=1, clip_sample=0.0))  # unclipped: the untrained x_0 has a gradient
    algo = RWR(pol, RWRConfig(target="transition", update_epochs=1, num_minibatches=1, min_episodes=2, gamma=0.5))
    assert pol.early_head is not None and not any(p.requires_grad for p in pol.early_head.parameters())
    obs, _ = toy_demos(2, 4)
    buf = _rollout(pol, obs, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[False, True], [True, False]]))
    algo.add_rollout(buf)
    td, instructions, ret = algo.ready_batch()
    idx = torch.arange(len(ret))
    chain = Chain(td["actions"], td["latents"], torch.zeros(0))
    from vla_rl.algos.rwr import _minibatch_obs
    expected = -pol.log_prob(_minibatch_obs(td, instructions, idx), chain).sum(1) / (pol.cfg.horizon * pol.cfg.action_dim)
    torch.testing.assert_close(algo._sample_loss(td, instructions, idx), expected)
    early, head = [[p.detach().clone() for p in m.parameters()] for m in (pol.early_head, pol.head)]
    algo.ready, algo.pending = [], None
    assert algo.update(buf)["skipped"] == 0.0
    assert all(torch.equal(a, p) for a, p in zip(early, pol.early_head.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(head, pol.head.parameters()))


def test_likelihood_algorithms_refuse_transitions_that_may_have_no_std():
    """DDIM's last transition has a schedule std of 0: without std_floor (or a learned std) its likelihood is
    undefined, so DPPO and RWR's transition target refuse the policy, naming noise.std_floor."""
    from vla_rl.algos import RWR, RWRConfig

    torch.manual_seed(0)
    pol = VLAPolicy(toy_policy_cfg(stochastic_steps=1, std_floor=0.0))
    obs, _ = toy_demos(4, 4)
    with torch.no_grad():
        assert not torch.isfinite(pol.log_prob(obs, pol.sample(obs))).all()  # what the refusal prevents
    for make in (lambda: DPPO(pol, DPPOConfig()), lambda: RWR(pol, RWRConfig())):
        with pytest.raises(ValueError, match="noise.std_floor=0"):
            make()
    RWR(pol, RWRConfig(target="action"))  # the flow / diffusion loss needs no transition std
    RWR(VLAPolicy(toy_policy_cfg(stochastic_steps=1, std_floor=0.0, learn_std=True)), RWRConfig())


def test_rwr_mixes_in_demonstrations(tmp_path):
    from vla_rl.algos import RWR, RWRConfig
    from vla_rl.data import EpisodeWriter

    torch.manual_seed(0)
    pol = VLAPolicy(toy_policy_cfg(stochastic_steps=3))
    with pytest.raises(ValueError, match="rwr.demo_path"):
        RWR(pol, RWRConfig(demo_coef=1.0))
    with EpisodeWriter(tmp_path / "bad") as w:
        w.add_episode({"state": np.zeros((5, 3))}, np.zeros((5, 7)), instruction="go", success=True)
    with pytest.raises(ValueError, match="action dim 7"):
        RWR(pol, RWRConfig(demo_coef=1.0, demo_path=str(tmp_path / "bad")))
    with EpisodeWriter(tmp_path / "demos") as w:
        w.add_episode({"state": np.ones((6, 3))}, np.full((6, 2), 0.5), instruction="go", success=True)
    algo = RWR(pol, RWRConfig(demo_coef=1.0, demo_path=str(tmp_path / "demos")))
    torch.manual_seed(1)
    with_demo = algo._demo_loss(4)
    obs = {"state": torch.ones(4, 3), "instruction": ["go"] * 4}
    torch.manual_seed(1)
    idx = torch.randint(0, 6, (4,))  # the same draw: the demo term is the policy's BC loss on the demo chunks
    torch.testing.assert_close(with_demo, pol.bc_loss(obs, torch.full((4, 4, 2), 0.5), algo.demos["action_mask"][idx]))


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


def test_train_encoders_false_moves_only_the_action_head(tmp_path):
    from vla_rl.envs.toy import ToyGoalEnv
    from vla_rl.runner import Runner, RunnerConfig, TrainConfig

    from toy_utils import pretrain_toy

    policy = pretrain_toy(steps=50, seed=0)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    # lr 1e-2 so that every trained tensor visibly moves; its KL would trip the revert guard, so that is off.
    cfg = TrainConfig(algo="dppo", dppo=DPPOConfig(train_encoders=False, actor_lr=1e-2, update_epochs=1, kl_revert=0.0),
                      runner=RunnerConfig(iterations=2, num_envs=16, steps_per_iter=1, eval_every=0, checkpoint_every=0,
                                          log_dir=str(tmp_path / "run"), progress=False))
    Runner(cfg, policy=policy, env=ToyGoalEnv(16, seed=0)).train()
    after = policy.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("head.") for k in moved)
    assert all(k.startswith(("head.", "critic.")) for k in moved), sorted(moved)


@pytest.mark.parametrize("train_encoders", [False, True])
def test_early_steps_stay_frozen_through_an_update(tmp_path, train_encoders):
    """By default DPPO's deterministic early steps run the fully frozen base (early head + encoders and trunk):
    the latent entering the fine-tuned window is identical before and after an update. Training the encoders
    moves it (the check can fail)."""
    from vla_rl.envs.toy import ToyGoalEnv
    from vla_rl.runner import Runner, RunnerConfig, TrainConfig

    from toy_utils import pretrain_toy

    policy = pretrain_toy(steps=50, seed=0, stochastic_steps=2)  # K = 5: steps 0-2 deterministic
    cfg = TrainConfig(algo="dppo", dppo=DPPOConfig(train_encoders=train_encoders, actor_lr=1e-2, update_epochs=2, kl_revert=0.0),
                      runner=RunnerConfig(iterations=1, num_envs=16, steps_per_iter=2, eval_every=0, checkpoint_every=0,
                                          log_dir=str(tmp_path / "run"), progress=False))
    runner = Runner(cfg, policy=policy, env=ToyGoalEnv(16, seed=0))
    obs, _ = toy_demos(16, 4, seed=3)
    noise = torch.randn(16, 6, 4, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = policy.sample(obs, noise=noise)
    runner.train()
    with torch.no_grad():
        after = policy.sample(obs, noise=noise)
    assert not torch.equal(before.actions, after.actions)  # the fine-tuned steps did move
    assert torch.equal(before.latents[:, 0], after.latents[:, 0]) != train_encoders


def test_an_update_whose_kl_jumps_past_the_hard_limit_is_reverted():
    """dppo.kl_revert: a minibatch KL above it puts the actor's weights and optimizer state back where the
    update started (a huge lr makes the second minibatch's KL explode); off, the same update moves them."""
    from vla_rl.rollout import RolloutBuffer

    def run(kl_revert):
        torch.manual_seed(0)
        pol = VLAPolicy(toy_policy_cfg(stochastic_steps=3))
        algo = DPPO(pol, DPPOConfig(actor_lr=1.0, max_grad_norm=100.0, target_kl=0.0, kl_revert=kl_revert,
                                    n_critic_warmup_itr=0, critic_clock=False, num_minibatches=4, update_epochs=1))
        obs, _ = toy_demos(32, 4)
        buf = RolloutBuffer(1, 32)
        with torch.no_grad():
            chain = pol.sample(obs, generator=torch.Generator().manual_seed(0))
        buf.add(obs, chain, torch.randn(32), torch.ones(32, dtype=torch.bool), torch.zeros(32), torch.zeros(32),
                torch.zeros(32))
        buf.finalize()
        before = [p.detach().clone() for p in algo.actor_params]
        stats = algo.update(buf)
        same = all(torch.equal(a, p) for a, p in zip(before, algo.actor_params))
        return stats, same, algo

    stats, same, algo = run(kl_revert=0.3)
    assert stats["kl_reverted"] == 1.0 and same
    assert all(not s for s in algo.actor_opt.state.values())  # Adam's moments back to the (empty) start
    stats, same, _ = run(kl_revert=0.0)
    assert stats["kl_reverted"] == 0.0 and not same and stats["approx_kl"] > 0.3


def test_rwr_ode_sampling_collects_the_deterministic_chain_from_random_initial_noise(tmp_path):
    """rwr.ode_sampling: the runner collects with no transition noise (the chain's deterministic path) from a
    random x_K, so every collected action is the deterministic chain's action for its own x_K draw; with
    init_scale 0 it would collect one action per observation and is refused."""
    from vla_rl.algos import RWR, RWRConfig
    from vla_rl.envs.toy import ToyGoalEnv
    from vla_rl.runner import Runner, RunnerConfig, TrainConfig

    with pytest.raises(ValueError, match="init_scale"):
        RWR(VLAPolicy(toy_policy_cfg(stochastic_steps=3, init_scale=0.0)), RWRConfig(ode_sampling=True, target="action"))
    torch.manual_seed(0)
    policy = VLAPolicy(toy_policy_cfg(stochastic_steps=3, init_scale=1.0))
    cfg = TrainConfig(algo="rwr", rwr=RWRConfig(ode_sampling=True, target="action"),
                      runner=RunnerConfig(iterations=1, num_envs=4, steps_per_iter=1, eval_every=0, progress=False,
                                          log_dir=str(tmp_path / "run")))
    runner = Runner(cfg, policy=policy, env=ToyGoalEnv(4, seed=0))
    obs = runner.obs
    gen_state = runner.gen.get_state()
    buf, _ = runner.collect()
    k, h, a = policy.noise.num_steps, policy.cfg.horizon, policy.cfg.action_dim
    noise = torch.randn((4, k + 1, h, a), generator=torch.Generator().set_state(gen_state))
    with torch.no_grad():
        ode = policy.sample(obs, deterministic=True, noise=noise).actions
        stochastic = policy.sample(obs, noise=noise).actions
        mode = policy.sample(obs, deterministic=True, noise=torch.zeros_like(noise)).actions
    collected = buf.data["actions"][0]
    torch.testing.assert_close(collected, ode)
    assert not torch.allclose(collected, stochastic)  # the transition noise would have moved them
    assert not torch.allclose(collected, mode)  # and x_K is drawn, not the mode
