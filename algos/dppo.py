"""DPPO: PPO on the denoising chain (Ren et al. 2024, "Diffusion Policy Policy Optimization").

Each of the last K' stochastic denoising transitions of a sampled action chunk is a Gaussian policy
step; the env-level advantage of the decision (one chunk) is shared by all K' transitions. Every trick
of the published recipe is a named :class:`DPPOConfig` option; :meth:`DPPO.loss` reads top to bottom.

BC regularization (``bc_coef > 0``): a frozen copy of the pretrained policy samples actions for the
minibatch observations and the current policy's ``bc_loss`` is pulled toward those samples; this keeps
the fine-tuned policy near the pretrained one's support without needing the demo data.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from vla_rl import distributed
from vla_rl.policy.vla import Chain

log = logging.getLogger(__name__)


@dataclass
class DPPOConfig:
    gamma: float = 0.99  # discount per decision (one executed action chunk)
    gae_lambda: float = 0.95
    gamma_denoising: float = 0.99  # transition j of K' weighted gamma_denoising^(K'-1-j) in the actor loss
    # PPO ratio clip along the chain: clip_ploss_coef at the last (cleanest) transition, rising
    # exponentially (rate) from clip_ploss_coef_base at the first fine-tuned one, as published (0.01 from
    # 0.001, rate 3, with logprob="mean_executed"); base = clip_ploss_coef: one clip for every transition.
    clip_ploss_coef: float = 0.1
    clip_ploss_coef_base: float = 0.1
    clip_ploss_coef_rate: float = 3.0
    # Likelihood of a transition in the PPO ratio. "joint" (default): the exact log-likelihood of the
    # whole chunk. "mean_executed" (the published DPPO code): per-coordinate Gaussian log-densities,
    # clamped to [logprob_min, logprob_max], of the executed actions only, averaged -- the clip then
    # bounds a per-coordinate change and the never-executed tail of the chunk adds no gradient noise.
    # On `place` (3 seeds, 200k env steps) neither form beat the other beyond noise (BENCHMARKS.md);
    # "joint" stays the default as the exact likelihood.
    logprob: str = "joint"
    logprob_min: float = -5.0
    logprob_max: float = 2.0
    clip_vloss_coef: float = 0.0  # value clipping (0 = off)
    vf_coef: float = 0.5
    ent_coef: float = 0.0  # unused: no entropy bonus (the std is the floor, or learned by the PPO loss alone); kept for parity
    update_epochs: int = 5
    num_minibatches: int = 4
    actor_lr: float = 3e-5  # on `place`, 1e-4 drove approx KL to ~0.05 per minibatch and lost success (BENCHMARKS.md)
    critic_lr: float = 1e-3
    max_grad_norm: float = 1.0
    # Stop the epoch loop once a minibatch's approx KL (per transition) exceeds this; 0 = off. A guard: at the
    # default lr the measured approx KL on `place` is 0.008-0.02 per minibatch (BENCHMARKS.md), while the
    # runs that lost success at lr 1e-4 / 3e-4 went to 0.05-0.5. The Gaussian PPO control uses 0.03 too.
    target_kl: float = 0.03
    # A hard limit: a minibatch whose approx KL exceeds it (measured before its step, so after the steps
    # before it) reverts the whole update -- the actor's weights and optimizer state go back to where the
    # update started -- and is logged (train/kl_reverted). The early stop above cannot undo the step that
    # made the KL jump; on a new third-party task default DPPO produced minibatch KL spikes of 0.95-1.65 and
    # lost 19 points of success (issue 15), where the healthy range on `place` is 0.008-0.02. 0 = off.
    kl_revert: float = 0.3
    norm_adv: bool = True
    # Divide rewards by the running std of discounted returns. Off by default: with outcome-only {0, 1}
    # rewards that std follows the success rate (tiny near 0% and 100%), so the critic's targets are
    # rescaled every iteration and blow up exactly when the policy is bad or good; the actor does not
    # need it (advantages are normalized). Turn on for dense/shaped rewards of arbitrary scale.
    reward_scale_running: bool = False
    reward_scale_const: float = 1.0
    n_critic_warmup_itr: int = 0  # update only the critic for the first n iterations
    bc_coef: float = 0.0  # BC regularization toward a frozen copy of the pretrained policy
    # False (default): a time-limit cut is a failure -- in every built-in task the deadline is part of the
    # task and the observation has no clock, so bootstrapping V(final_obs) credits a timed-out episode with
    # the value of a state that looks like it could still succeed (and that the critic, trained only on
    # states before the deadline, never fits). True: bootstrap every truncation (infinite-horizon tasks).
    # Truncations of diverged envs (``info["unstable"]``) are never counted as failures: the runner gives
    # them next_value = value, so their TD error is ~0 (outcome unknown).
    bootstrap_truncated: bool = False
    # The critic reads the episode clock (obs["episode_time"], added by the runner): with the deadline a
    # failure, V then is a function of its input (VLAPolicy.enable_critic_clock rebuilds the critic).
    critic_clock: bool = True
    advantage: str = "gae"  # "gae" (critic) or "group" (critic-free, group/instruction-relative outcome)
    freeze_early_steps: bool = True  # the deterministic early steps run with frozen pretrained weights
    # False (default): fine-tune only the action head; the observation encoders and trunk (the "VLM" part)
    # stay at their pretrained weights, as when RL fine-tunes only a VLA's action expert. With
    # freeze_early_steps the deterministic early steps then run the *whole* pretrained base, so the latent
    # entering the fine-tuned window never moves outside the ratio and clip. True also trains the encoders
    # and trunk, which the frozen early head shares: the early latents then drift with them.
    train_encoders: bool = False


def refuse_steered(policy, algo: str) -> None:
    """Chain-likelihood algorithms need the chain's stochastic transitions; a DSRL-steered policy has none."""
    if getattr(policy, "noise_actor", None) is not None:
        raise ValueError(f"{algo}: this policy carries a DSRL noise actor (its chain is deterministic); fine-tune "
                         "the base policy it was trained from, or keep training it with algo=dsrl")


def refuse_noiseless(policy, algo: str) -> None:
    """The likelihood of a transition needs a std > 0: DDIM's schedule std is 0 at the chain's last step and the
    flow SDE's is 0 at eta 0, so without a floor or a learned std a fine-tuned transition may have none."""
    noise = getattr(policy, "noise", None)  # None: a policy with its own likelihood (no denoising chain)
    if noise is not None and noise.cfg.std_floor <= 0 and noise.log_std is None:
        raise ValueError(f"{algo}: noise.std_floor=0 without a learned std leaves the fine-tuned transitions a std of "
                         "0 where the schedule's vanishes, so their likelihood is undefined; set noise.std_floor > 0 "
                         "(DPPO's published minimum sampling std is 0.1) or noise.learn_std=true")


class RunningMeanStd:
    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor):
        m, v, n = distributed.moments(x)  # over every rank's returns (x.mean(), x.var(), numel for one process)
        d, tot = m - self.mean, self.count + n
        self.mean += d * n / tot
        self.var = (self.var * self.count + v * n + d * d * self.count * n / tot) / tot
        self.count = tot

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, d):
        self.mean, self.var, self.count = d["mean"], d["var"], d["count"]


class RunningRewardScaler:
    """Scale rewards by the std of the running discounted return (as in DPPO / CleanRL's NormalizeReward)."""

    def __init__(self, gamma: float):
        self.gamma, self.rms, self.ret = gamma, RunningMeanStd(), None

    def __call__(self, reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:  # [T, N]
        if self.ret is None or self.ret.shape != reward.shape[1:]:
            self.ret = torch.zeros(reward.shape[1:])
        rets = []
        for t in range(reward.shape[0]):
            self.ret = self.ret * self.gamma + reward[t].cpu()
            rets.append(self.ret.clone())
            self.ret[done[t].cpu()] = 0.0
        self.rms.update(torch.stack(rets))
        return reward / (self.rms.var ** 0.5 + 1e-8)

    def state_dict(self):
        return {**self.rms.state_dict(), "ret": None if self.ret is None else self.ret.tolist()}

    def load_state_dict(self, d):
        self.rms.load_state_dict(d)
        self.ret = None if d.get("ret") is None else torch.tensor(d["ret"])


def compute_gae(rewards, values, next_values, terminated, dones, gamma, lam):
    """Vectorized-over-envs GAE; all inputs [T, N].

    ``next_values[t]`` is V of the observation after decision t (for a truncated episode, V of
    ``info["final_obs"]``); ``terminated`` cuts the bootstrap, ``dones`` (terminated | truncated)
    cuts the GAE recursion. Returns (advantages, returns)."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * next_values[t] * (1 - terminated[t].float()) - values[t]
        last = delta + gamma * lam * (1 - dones[t].float()) * last
        adv[t] = last
    return adv, adv + values


def group_advantages(rewards, dones, group_ids):
    """Critic-free outcome advantage: undiscounted reward-to-go within each episode (cut at the end of
    the rollout), minus the mean over decisions of the same group (same seeded start or instruction),
    divided by the group std. ``group_ids`` [T, N] long."""
    T = rewards.shape[0]
    rtg = torch.zeros_like(rewards)
    run = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        run = rewards[t] + (1 - dones[t].float()) * run
        rtg[t] = run
    adv = torch.zeros_like(rtg)
    flat_r, flat_g, flat_a = rtg.flatten(), group_ids.flatten(), adv.view(-1)
    for g in flat_g.unique():
        m = flat_g == g
        r = flat_r[m]
        flat_a[m] = (r - r.mean()) / (r.std(unbiased=False) + 1e-6) if m.sum() > 1 else 0.0
    return adv, rtg


class DPPO:
    name = "dppo"

    def __init__(self, policy, cfg: DPPOConfig | None = None):
        self.cfg = cfg = cfg or DPPOConfig()
        if cfg.logprob not in ("mean_executed", "joint"):
            raise ValueError(f"dppo.logprob must be 'mean_executed' or 'joint', got {cfg.logprob!r}")
        if cfg.advantage not in ("gae", "group"):
            raise ValueError(f"dppo.advantage must be 'gae' or 'group', got {cfg.advantage!r}")
        self.policy = policy
        refuse_steered(policy, "dppo")
        refuse_noiseless(policy, "dppo")
        if cfg.freeze_early_steps:
            policy.freeze_early_steps()
        self.pretrained = None
        if cfg.bc_coef > 0:
            self.pretrained = copy.deepcopy(policy).eval()
            for p in self.pretrained.parameters():
                p.requires_grad_(False)
        if cfg.critic_clock and self.uses_critic:
            policy.enable_critic_clock()
        self.actor_params = policy.actor_parameters() if cfg.train_encoders else policy.head_parameters()
        trained = {id(p) for p in self.actor_params}
        for p in policy.actor_parameters():  # no gradients computed for what is not trained
            p.requires_grad_(id(p) in trained)
        # fused: one kernel over all parameters, 3.3x the default per-tensor Adam step on the CPU (40 steps an
        # iteration); the same update rule.
        self.actor_opt = torch.optim.Adam(self.actor_params, lr=cfg.actor_lr, fused=True)
        self.critic_opt = torch.optim.Adam(policy.critic.parameters(), lr=cfg.critic_lr, fused=True)
        self._trained_params = list(self.actor_params) + list(policy.critic.parameters())
        self.reward_scaler = RunningRewardScaler(cfg.gamma)
        self.iteration = 0

    @property
    def uses_critic(self) -> bool:
        return self.cfg.advantage == "gae"

    # ------------------------------------------------------------------ advantages
    def compute_advantages(self, buf):
        c = buf.data
        rewards = c["reward"] * self.cfg.reward_scale_const
        dones = c["terminated"] | c["truncated"]
        if self.cfg.advantage == "group":
            return group_advantages(rewards, dones, c["group"])
        if self.cfg.reward_scale_running:
            rewards = self.reward_scaler(rewards, dones)
        unstable = c["unstable"] if "unstable" in c.keys() else torch.zeros_like(dones)
        no_bootstrap = c["terminated"] if self.cfg.bootstrap_truncated else (dones & ~unstable)
        return compute_gae(rewards, c["value"], c["next_value"], no_bootstrap, dones,
                           self.cfg.gamma, self.cfg.gae_lambda)

    def _actor_state(self) -> tuple[list[torch.Tensor], dict]:
        return [p.detach().clone() for p in self.actor_params], copy.deepcopy(self.actor_opt.state_dict())

    @torch.no_grad()
    def _restore_actor_state(self, state) -> None:
        params, opt_state = state
        for p, saved in zip(self.actor_params, params):
            p.copy_(saved)
        self.actor_opt.load_state_dict(opt_state)

    # ------------------------------------------------------------------ the loss, top to bottom
    def clip_coefs(self, n: int, device) -> torch.Tensor:
        """Clip coefficient of each of the n fine-tuned transitions (first to last)."""
        cfg = self.cfg
        if n == 1 or cfg.clip_ploss_coef_base == cfg.clip_ploss_coef:
            return torch.full((n,), cfg.clip_ploss_coef, device=device)
        t = torch.arange(n, device=device, dtype=torch.float32) / (n - 1)
        rise = (torch.exp(cfg.clip_ploss_coef_rate * t) - 1) / math.expm1(cfg.clip_ploss_coef_rate)
        return cfg.clip_ploss_coef_base + (cfg.clip_ploss_coef - cfg.clip_ploss_coef_base) * rise

    def transition_log_prob(self, obs, chain: Chain) -> torch.Tensor:
        """[B, K'] log-likelihoods of the stored transitions as the PPO ratio uses them (``cfg.logprob``)."""
        if self.cfg.logprob == "joint":
            return self.policy.log_prob(obs, chain)
        lp = self.policy.log_prob(obs, chain, per_dim=True)[:, :, :self.policy.cfg.exec_steps]
        return lp.clamp(self.cfg.logprob_min, self.cfg.logprob_max).mean((-1, -2))

    @torch.no_grad()
    def old_log_probs(self, buf, flat, batch: int = 1024) -> torch.Tensor:
        """The rollout's log-likelihoods in ``cfg.logprob`` form, from the weights that sampled it (the
        update has not started yet); "joint" is what the sampler stored."""
        if self.cfg.logprob == "joint":
            return flat["log_prob"]
        out = []
        for start in range(0, flat["n"], batch):
            idx = torch.arange(start, min(start + batch, flat["n"]))
            out.append(self.transition_log_prob(buf.index_obs(flat, idx), flat["chain"][idx]).cpu())
        return torch.cat(out)

    def loss(self, obs, chain: Chain, old_logp, adv, returns, old_values):
        """DPPO loss on a minibatch. old_logp [B, K']; adv/returns/old_values [B]."""
        cfg = self.cfg
        n_steps = old_logp.shape[1]
        # 1) new log-likelihoods of the stored chain transitions (one batched pass)
        new_logp = self.transition_log_prob(obs, chain)  # [B, K']
        logratio = new_logp - old_logp
        ratio = logratio.exp()
        # 2) advantage normalization, shared by all K' transitions of a decision
        if cfg.norm_adv and adv.numel() * distributed.world_size() > 1:
            mean, std = distributed.mean_std(adv)  # the global minibatch's (all ranks'); adv.mean(), adv.std() alone
            adv = (adv - mean) / (std + 1e-8)
        adv = adv[:, None]
        # 3) clipped surrogate with a per-denoising-step clip coefficient
        clip = self.clip_coefs(n_steps, ratio.device)[None]
        pg1 = -adv * ratio
        pg2 = -adv * torch.maximum(torch.minimum(ratio, 1 + clip), 1 - clip)
        pg = torch.maximum(pg1, pg2)  # [B, K']
        # 4) denoising discount: later (cleaner) steps weigh more
        w = cfg.gamma_denoising ** (n_steps - 1 - torch.arange(n_steps, device=ratio.device, dtype=torch.float32))
        pg_loss = (pg * w[None]).mean()
        # 5) critic: (optionally clipped) value regression
        if self.uses_critic:
            v = self.policy.value(obs)
            v_loss = (v - returns) ** 2
            if cfg.clip_vloss_coef > 0:
                v_clip = old_values + (v - old_values).clamp(-cfg.clip_vloss_coef, cfg.clip_vloss_coef)
                v_loss = torch.maximum(v_loss, (v_clip - returns) ** 2)
            v_loss = 0.5 * v_loss.mean()
        else:
            v_loss = torch.zeros((), device=ratio.device)
        # 6) BC regularization toward the frozen pretrained policy's own samples
        bc = torch.zeros((), device=ratio.device)
        if cfg.bc_coef > 0:
            with torch.no_grad():
                target = self.pretrained.drawn_actions(self.pretrained.sample(obs).latents)  # not clamped
            bc = self.policy.bc_loss(obs, target)
        with torch.no_grad():
            stats = {
                "approx_kl": ((ratio - 1) - logratio).mean().item(),
                "clip_frac": ((ratio - 1).abs() > clip).float().mean().item(),
                "ratio": ratio.mean().item(),
            }
        total = pg_loss + cfg.vf_coef * v_loss + cfg.bc_coef * bc
        return total, pg_loss, v_loss, bc, stats

    # ------------------------------------------------------------------ update
    def update(self, buf) -> dict:
        cfg = self.cfg
        adv, returns = self.compute_advantages(buf)
        flat = buf.flatten(adv, returns)
        old_logp = self.old_log_probs(buf, flat)
        n = flat["n"]
        mb = max(1, n // cfg.num_minibatches)
        # Critic warm-up only means something with a critic (the group advantage has none).
        critic_only = self.uses_critic and self.iteration < cfg.n_critic_warmup_itr
        logs = {"policy_loss": [], "value_loss": [], "bc_loss": [], "approx_kl": [], "clip_frac": []}
        start_state = self._actor_state() if cfg.kl_revert > 0 and not critic_only else None
        stop, reverted = False, False
        for _epoch in range(cfg.update_epochs):
            perm = torch.randperm(n)
            for start in range(0, n, mb):
                idx = perm[start:start + mb]
                obs, chain = buf.index_obs(flat, idx), flat["chain"][idx]
                total, pg, vl, bc, st = self.loss(obs, chain, old_logp[idx], flat["adv"][idx],
                                                   flat["ret"][idx], flat["value"][idx])
                if critic_only:
                    total = cfg.vf_coef * vl
                self.actor_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                total.backward()
                distributed.average_gradients(self._trained_params)  # ranks: the global minibatch's gradient
                nn.utils.clip_grad_norm_(self.actor_params, cfg.max_grad_norm)
                nn.utils.clip_grad_norm_(self.policy.critic.parameters(), cfg.max_grad_norm)
                if not critic_only:
                    self.actor_opt.step()
                if self.uses_critic:
                    self.critic_opt.step()
                # Averaged over ranks (equal minibatches: the global minibatch's values), so that every rank takes
                # the same early-stop / revert decision below and the logs describe the whole batch.
                vals = distributed.all_mean([pg.item(), vl.item(), bc.item(), st["approx_kl"], st["clip_frac"]])
                st = {**st, "approx_kl": vals[3], "clip_frac": vals[4]}
                for k, v in zip(("policy_loss", "value_loss", "bc_loss", "approx_kl", "clip_frac"), vals):
                    logs[k].append(v)
                if start_state is not None and st["approx_kl"] > cfg.kl_revert:
                    self._restore_actor_state(start_state)
                    log.warning("DPPO iteration %d: minibatch approx KL %.3f > dppo.kl_revert=%.3f; the update was "
                                "reverted", self.iteration, st["approx_kl"], cfg.kl_revert)
                    stop = reverted = True
                    break
                if cfg.target_kl > 0 and st["approx_kl"] > cfg.target_kl:
                    stop = True
                    break
            if stop:
                break
        self.iteration += 1
        out = {k: sum(v) / max(len(v), 1) for k, v in logs.items()}
        out["kl_reverted"] = float(reverted)
        if self.uses_critic:
            out["explained_variance"] = distributed.explained_variance(flat["ret"], flat["value"])
        out["early_stop"] = float(stop)
        if self.policy.action_log_std is not None:  # the learned std (Gaussian control, noise.learn_std)
            out["action_std"] = self.policy.noise.stochastic_std(None).detach().mean().item()
        return out

    # ------------------------------------------------------------------ checkpoint state
    def optimizers(self) -> dict:
        return {"actor": self.actor_opt, "critic": self.critic_opt}

    def extra_state(self) -> dict:
        return {"iteration": self.iteration, "reward_scaler": self.reward_scaler.state_dict()}

    def load_extra_state(self, d: dict) -> None:
        self.iteration = d["iteration"]
        self.reward_scaler.load_state_dict(d["reward_scaler"])
