"""Reward-weighted regression on whole episodes (Peters & Schaal 2007; DPPO's RWR baseline).

Every decision (observation, sampled action chunk) of a *finished* episode is regressed on with the weight
``exp(beta * normalized G_t)``, clipped at ``max_weight``, where G_t is the decision's discounted return-to-go
(``gamma`` per decision: with an outcome-only reward a faster success weighs more), or with ``weights=
"advantage"`` ``exp(beta * normalized (G_t - V(s_t)))``, V a critic fit to the returns of earlier updates (AWR's
per-decision credit). The update is the weighted per-sample loss (``target``, below), optionally plus a BC loss
on demonstrations (``demo_path``).

Whole episodes: a rollout of a few decisions per env cuts most episodes in two. Decisions of an episode
still running at the end of a rollout wait in ``pending`` and join the update once their episode ends, so
no decision is dropped for having started early and no failure is hidden by the window (the previous
design used only the decisions whose episode ended inside one rollout: it lost the early decisions of long,
failing episodes and biased the weights toward fast successes). The policy is updated once at least
``min_episodes`` episodes have finished, so each update sees the outcome of many episodes rather than a
handful of decisions (150 decisions per update regressed the policy onto a few of its own chunks on
`place`: BENCHMARKS.md). Episodes cut by a reset of the envs (evaluation on the training envs, group
resets) or by a divergence of the simulator have no outcome and are dropped. The episodes waiting for an
update are not checkpointed: a resume restarts the envs, and at most ``min_episodes`` episodes' worth of
env steps are collected again.

What the weights multiply (``target``). "transition" (the default): minus the exact Gaussian log-likelihood of
the stored stochastic transitions (on `place`, the chain DPPO fine-tunes: x_K = 0, noise on the last
transition), so uniform weights leave the policy where it is in expectation and the weights move it; on `place`
it gained on 3 of 3 seeds without demos, a little more with them (BENCHMARKS.md, stops 29-30). "action": the
flow / diffusion training loss on the drawn chunk, for chains sampled without transition noise
(``ode_sampling``); a new noise level and noise draw per sample, so for a chain it is not the likelihood of what
was sampled, and the regression of a chain on its own draws drifts whatever the weights: on `place` (410k env
steps, no demos) the chain sampled from its own distribution fell from 0.77 to 0.09-0.15 success with return
weights, advantage weights and uniform weights (beta 0) alike, more slowly with 20 ODE steps than 5. Mix the BC
demonstrations in (``demo_path``, ``demo_coef``) to hold it there. Either way the target is the chain's own
draw, not the executed action clamped to the action bounds: the expert saturates them, and regressed on clamped
draws a Gaussian head lost 20 points where on its draws it held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict
from torch import nn

from vla_rl import distributed
from vla_rl.config import check_values
from vla_rl.policy.vla import Chain

from .dppo import refuse_noiseless, refuse_steered


@dataclass
class RWRConfig:
    beta: float = 2.0  # inverse temperature
    max_weight: float = 20.0
    normalize_returns: bool = True
    gamma: float = 0.99  # discount per decision (one executed action chunk)
    min_episodes: int = 64  # update once this many episodes have finished since the last update
    update_epochs: int = 4
    num_minibatches: int = 4
    # 1e-4 (4 epochs over ~150 decisions of known outcome per iteration) regressed the policy onto a
    # handful of its own chunks and lost every success on `place` within 13k env steps; 1e-5 did not.
    lr: float = 1e-5
    max_grad_norm: float = 1.0
    skip_constant: bool = True  # no update when all returns are equal (no signal), e.g. no success at all
    demo_path: str = ""  # demonstrations (vla_rl.data format) mixed into every minibatch as plain BC
    demo_coef: float = 0.0  # weight of that BC term against the weighted loss (0 = no demos)
    # Collect with the chain's deterministic transitions (its ODE / DDIM eta = 0 path) from x_K ~ N(0,
    # noise.init_scale^2): at init_scale 1 the samples are draws from the model's own distribution with no
    # transition noise on top, so there is no exploration noise to learn back (see the module docstring).
    ode_sampling: bool = False
    # "return": the weights are exp(beta * normalized G_t), so every decision of a successful episode is weighted
    # up, the harmful draws it recovered from included. "advantage": exp(beta * normalized (G_t - V(s_t))), V a
    # critic (reading the episode clock) fit to the returns of the earlier updates' episodes: per-decision credit,
    # as advantage-weighted regression (Peng et al. 2019, "AWR").
    weights: str = "return"
    # What a decision's weight multiplies. "transition": minus the exact Gaussian log-likelihood of the stored
    # stochastic transitions under the current weights (the one DPPO's ratio uses), with the early deterministic
    # steps run by a frozen copy of the head; needs transitions with noise (noise.std_floor > 0, no ode_sampling).
    # "action": the flow / diffusion training loss on the drawn chunk x_0 (a new noise level and noise draw per
    # sample; for a chain that is not the likelihood of what it sampled), the target for ode_sampling. For a
    # Gaussian head the two agree up to scale.
    target: str = "transition"
    critic_lr: float = 1e-3
    critic_warmup: int = 3  # updates that fit only the critic before its advantages weight the actor


def _minibatch_obs(td, instructions: list[str], idx: torch.Tensor) -> dict:
    """The observations of rows ``idx`` of a ready batch, with their instructions, as the policy reads them."""
    obs = {k: v for k, v in td["obs"][idx].items()}
    obs["instruction"] = [instructions[i] for i in idx.tolist()]
    return obs


def rwr_weights(returns: torch.Tensor, beta: float, max_weight: float, normalize: bool = True) -> torch.Tensor:
    r = returns.float()
    if normalize and r.numel() * distributed.world_size() > 1:
        mean, std = distributed.mean_std(r)  # over every rank's returns; r.mean(), r.std() in one process
        r = (r - mean) / (std + 1e-8)
    return torch.exp(beta * r).clamp(max=max_weight)


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} over one whole episode's rewards [L]."""
    out, g = torch.zeros_like(rewards, dtype=torch.float32), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        g = float(rewards[t]) + gamma * g
        out[t] = g
    return out


class RWR:
    name = "rwr"
    uses_critic = False  # the runner need not run the critic during the rollout: V is computed in the update

    def __init__(self, policy, cfg: RWRConfig | None = None):
        self.cfg = cfg or RWRConfig()
        self.policy = policy
        refuse_steered(policy, "rwr")
        if self.cfg.ode_sampling and policy.noise.init_scale == 0:
            raise ValueError("rwr.ode_sampling with noise.init_scale=0 samples one action per observation: "
                             "set noise.init_scale > 0 (1 = the model's own distribution)")
        self.deterministic_rollouts = self.cfg.ode_sampling  # read by the runner's collect
        check_values(self.cfg, "rwr.")  # the config's rules (vla_rl/config_rules.py), for configs built in code
        if self.cfg.target == "transition":
            if self.cfg.ode_sampling:
                raise ValueError("rwr.target=transition (the default) regresses on the chain's noisy transitions: "
                                 "rwr.ode_sampling samples without transition noise, so there would be nothing to "
                                 "weight; set rwr.target=action with it")
            refuse_noiseless(policy, "rwr.target=transition")
            # The early deterministic steps run with the weights as they are now, so the latent entering the
            # weighted transitions stays where the stored chains had it (as DPPO's freeze_early_steps).
            policy.freeze_early_steps()
        self.opt = torch.optim.Adam(policy.actor_parameters(), lr=self.cfg.lr, fused=True)
        self.critic_opt = None
        if self.advantage_weighted:
            # With the deadline a failure, V is a function of the state only if the critic reads the clock.
            policy.enable_critic_clock()
            self.critic_opt = torch.optim.Adam(policy.critic.parameters(), lr=self.cfg.critic_lr, fused=True)
        self.critic_fits = 0  # updates the critic has been fit in
        self.iteration = 0
        self.pending: list[list[dict]] | None = None  # per env: segments of its running episode
        self.ready: list[dict] = []  # finished episodes since the last update
        self.demos = self._load_demos() if self.cfg.demo_coef > 0 else None

    @property
    def advantage_weighted(self) -> bool:
        return self.cfg.weights == "advantage"

    # ------------------------------------------------------------------ episodes
    def on_env_reset(self) -> None:
        """The runner restarted the envs: the episodes in progress end without an outcome."""
        self.pending = None

    def add_rollout(self, buf) -> None:
        """Split a rollout [T, N] into episode segments; finished episodes move to ``ready``."""
        c = buf.data
        T, N = c.batch_size
        if self.pending is None or len(self.pending) != N:
            self.pending = [[] for _ in range(N)]
        dones = (c["terminated"] | c["truncated"]).cpu()
        for n in range(N):
            start = 0
            for t in dones[:, n].nonzero().flatten().tolist():
                self.pending[n].append(self._segment(buf, n, start, t + 1))
                if not bool(c["unstable"][t, n]):  # a diverged episode has no outcome
                    self.ready.append(self._episode(self.pending[n]))
                self.pending[n], start = [], t + 1
            if start < T:
                self.pending[n].append(self._segment(buf, n, start, T))
        if buf.episodes_cut:
            self.pending = None

    def _segment(self, buf, n: int, start: int, end: int) -> dict:
        td = buf.data[start:end, n].select("obs", "latents", "reward")
        # The regression target is the chain's own draw, not the executed (clamped) action: on `place` the expert
        # saturates the action bounds (38-100% of demo actions per dim) and 15-48% of the policy's draws per dim
        # fall beyond them (BENCHMARKS.md).
        td["actions"] = self.policy.drawn_actions(td["latents"])
        if self.cfg.target != "transition":
            del td["latents"]
        return {"td": td, "instruction": [buf.instructions[t][n] for t in range(start, end)]}

    def _episode(self, segments: list[dict]) -> dict:
        td = torch.cat([s["td"] for s in segments], 0)
        return {"td": td, "instruction": [i for s in segments for i in s["instruction"]],
                "ret": discounted_returns(td["reward"], self.cfg.gamma)}

    def ready_batch(self) -> tuple[TensorDict, list[str], torch.Tensor]:
        """Every decision of the finished episodes: (tensors [M], instructions, discounted returns [M])."""
        td = torch.cat([e["td"] for e in self.ready], 0)
        return td, [i for e in self.ready for i in e["instruction"]], torch.cat([e["ret"] for e in self.ready])

    # ------------------------------------------------------------------ update
    def update(self, buf) -> dict:
        self.add_rollout(buf)
        self.iteration += 1
        if distributed.enabled():
            return self._update_ranks()
        stats = {"episodes_ready": float(len(self.ready))}
        if len(self.ready) < max(self.cfg.min_episodes, 1):
            return {**stats, "skipped": 1.0}
        td, instructions, ret = self.ready_batch()
        self.ready = []
        # Equal returns (typically: no success among the episodes) make uniform weights: the update would
        # be plain BC on the policy's own samples -- drift, no signal. The critic still learns from them.
        constant = self.cfg.skip_constant and bool((ret == ret[0]).all())
        return {**stats, **self._fit(td, instructions, ret, constant)}

    def _fit(self, td, instructions: list[str], ret: torch.Tensor, constant: bool) -> dict:
        """The update on a ready batch (this rank's part of it on several ranks) and its logged numbers."""
        fit_actor = not constant and self.critic_fits >= (self.cfg.critic_warmup if self.advantage_weighted else 0)
        if not fit_actor and not self.advantage_weighted:
            return {"skipped": 1.0}
        stats = {}
        signal = ret
        if self.advantage_weighted:
            # V from the critic as the earlier updates left it, before it is fit to these returns: fit first, it
            # would explain part of this batch's luck and shrink the advantages toward zero.
            with torch.no_grad():
                value = self.policy.value(_minibatch_obs(td, instructions, torch.arange(len(ret)))).cpu() if len(ret) \
                    else torch.zeros(0)
            signal = ret - value
            stats.update(self._value_stats(ret, value))
        w = rwr_weights(signal, self.cfg.beta, self.cfg.max_weight, self.cfg.normalize_returns)
        losses, value_losses = self._regress(td, instructions, w if fit_actor else None,
                                             ret if self.advantage_weighted else None)
        if self.advantage_weighted:
            self.critic_fits += 1
            stats["value_loss"] = sum(value_losses) / max(len(value_losses), 1)
        if not fit_actor:
            return {**stats, "skipped": 1.0}
        n, w_sum, r_sum = distributed.all_sum([float(len(w)), w.sum().item(), ret.float().sum().item()])
        w_max = distributed.all_max([w.max().item() if len(w) else -float("inf")])[0]
        return {**stats, "skipped": 0.0, "policy_loss": sum(losses) / max(len(losses), 1), "decisions": n,
                "weight_max": w_max, "weight_mean": w_sum / n, "return_mean": r_sum / n}

    @staticmethod
    def _value_stats(ret: torch.Tensor, value: torch.Tensor) -> dict:
        """Explained variance of the returns by V and the advantages' spread, over every rank's decisions."""
        n, r1, r2, e1, e2 = distributed.all_sum([float(len(ret)), ret.sum().item(), ret.pow(2).sum().item(),
                                                 (ret - value).sum().item(), (ret - value).pow(2).sum().item()])
        var_r, var_e = r2 / n - (r1 / n) ** 2, e2 / n - (e1 / n) ** 2
        return {"explained_variance": 1 - var_e / var_r if var_r > 0 else float("nan"),
                "advantage_std": max(var_e, 0.0) ** 0.5}

    def _regress(self, td: TensorDict, instructions: list[str], w: torch.Tensor | None,
                 targets: torch.Tensor | None) -> tuple[list[float], list[float]]:
        """Epochs of minibatch steps: the actor on the weighted loss (``w``; None: the critic alone) and the
        critic on the returns (``targets``; None: no critic). Returns the per-step actor and critic losses."""
        n = len(targets if w is None else w)
        mb = max(1, n // self.cfg.num_minibatches)
        # listed once: actor_parameters() walks the whole policy
        actor_params = self.policy.actor_parameters() if w is not None else []
        critic_params = list(self.policy.critic.parameters()) if targets is not None else []
        params = actor_params + critic_params
        ranks = distributed.enabled()
        losses, value_losses = [], []
        for _ in range(self.cfg.update_epochs):
            perm = torch.randperm(n)
            # Several ranks hold different numbers of decisions: each takes num_minibatches steps per epoch (its
            # share of each global minibatch, maybe empty), so that their gradient all-reduces stay in step.
            batches = torch.tensor_split(perm, self.cfg.num_minibatches) if ranks else [perm[s:s + mb] for s in range(0, n, mb)]
            for idx in batches:
                actor, actor_value = self._rank_loss(td, instructions, w, idx) if w is not None else (None, None)
                critic, critic_value = self._critic_loss(td, instructions, targets, idx) if targets is not None \
                    else (None, None)
                self.opt.zero_grad(set_to_none=True)
                if self.critic_opt is not None:
                    self.critic_opt.zero_grad(set_to_none=True)
                parts = [loss for loss in (actor, critic) if loss is not None]
                if parts:
                    sum(parts).backward()  # the actor and the critic share no trained parameter
                distributed.average_gradients(params)
                if w is not None:
                    nn.utils.clip_grad_norm_(actor_params, self.cfg.max_grad_norm)
                    self.opt.step()
                    losses.append(actor_value)
                if targets is not None:
                    nn.utils.clip_grad_norm_(critic_params, self.cfg.max_grad_norm)
                    self.critic_opt.step()
                    value_losses.append(critic_value)
        return losses, value_losses

    def _sample_loss(self, td, instructions: list[str], idx: torch.Tensor) -> torch.Tensor:
        """The per-decision loss [len(idx)] that the weights multiply (``rwr.target``)."""
        obs = _minibatch_obs(td, instructions, idx)
        if self.cfg.target == "transition":
            chain = Chain(actions=td["actions"][idx], latents=td["latents"][idx], log_prob=torch.zeros(0))
            lp = self.policy.log_prob(obs, chain, per_dim=True)  # [B, K', H, A]
            return -lp.mean((-1, -2)).sum(1)  # per action coordinate, summed over the stochastic transitions
        return self.policy.bc_loss(obs, td["actions"][idx], reduction="none")

    def _critic_loss(self, td, instructions: list[str], targets: torch.Tensor, idx: torch.Tensor):
        """Mean squared error of V on the global minibatch (this rank's rows ``idx``), scaled as :meth:`_rank_loss`
        scales the actor's; the loss value for the logs. ``None`` as the loss where this rank's part is empty."""
        world = distributed.world_size()
        err = None
        if len(idx):
            v = self.policy.value(_minibatch_obs(td, instructions, idx))
            err = (v - targets[idx].to(v.device)).pow(2).sum()
        count, err_sum = distributed.all_sum([float(len(idx)), err.item() if err is not None else 0.0])
        if count == 0:  # fewer decisions on every rank than minibatches: this step has none
            return None, 0.0
        return (None if err is None else err * (world / count)), err_sum / count

    # ------------------------------------------------------------------ several ranks
    def _update_ranks(self) -> dict:
        """:meth:`update` on several ranks (``vla_rl.distributed``): each rank holds the episodes its own envs
        finished; whether to update, the return normalization, the weighted mean of every minibatch and the
        logged numbers are over all ranks' decisions, so the step is the one a single process would take on
        all of them."""
        ready = int(distributed.all_sum([len(self.ready)])[0])
        stats = {"episodes_ready": float(ready)}
        if ready < max(self.cfg.min_episodes, 1):
            return {**stats, "skipped": 1.0}
        if self.ready:
            td, instructions, ret = self.ready_batch()
        else:  # this rank's envs finished no episode since the last update; the others did
            td, instructions, ret = None, [], torch.zeros(0)
        self.ready = []
        inf = float("inf")
        hi, neg_lo = distributed.all_max([ret.max().item() if len(ret) else -inf, -ret.min().item() if len(ret) else -inf])
        return {**stats, **self._fit(td, instructions, ret, self.cfg.skip_constant and hi == -neg_lo)}

    def _rank_loss(self, td, instructions: list[str], w: torch.Tensor, idx: torch.Tensor):
        """This rank's part of a global minibatch's loss: ``world * sum_i w_i l_i / sum_all w`` (its gradient,
        averaged over the ranks, is the gradient of the global weighted mean; one process: the weighted mean)
        plus the demo BC term on its own demo draws; also the global loss value, for the logs. ``None`` as the
        loss when this rank's part is empty and there are no demos."""
        world = distributed.world_size()
        num = demo = None
        if len(idx):
            num = (w[idx] * self._sample_loss(td, instructions, idx)).sum()
        if self.demos is not None:
            demo = self._demo_loss(max(1, len(idx)))
        w_sum, num_sum, demo_sum = distributed.all_sum([w[idx].sum().item(), num.item() if num is not None else 0.0,
                                                        demo.item() if demo is not None else 0.0])
        if w_sum == 0:  # no rank holds a row of this minibatch (fewer decisions than minibatches)
            return (self.cfg.demo_coef * demo if demo is not None else None), 0.0
        value = num_sum / w_sum + (self.cfg.demo_coef * demo_sum / world if demo is not None else 0.0)
        loss = None if num is None else num * (world / w_sum)
        if demo is not None:
            loss = self.cfg.demo_coef * demo if loss is None else loss + self.cfg.demo_coef * demo
        return loss, value

    # ------------------------------------------------------------------ demonstrations
    def _load_demos(self) -> dict:
        from vla_rl.data import DemoDataset, load_episodes

        if not self.cfg.demo_path:
            raise ValueError("rwr.demo_coef > 0 needs rwr.demo_path (a demo directory or .hdf5 file)")
        cfg = self.policy.cfg
        data = DemoDataset(load_episodes(self.cfg.demo_path), cfg.horizon, use_rgb=bool(cfg.cameras)).tensors()
        if data["action"].shape[-1] != cfg.action_dim or data["state"].shape[-1] != cfg.state_dim:
            raise ValueError(f"rwr.demo_path={self.cfg.demo_path}: demos have action dim {data['action'].shape[-1]} and "
                             f"state dim {data['state'].shape[-1]}, the policy {cfg.action_dim} and {cfg.state_dim}")
        return data

    def _demo_loss(self, size: int) -> torch.Tensor:
        idx = torch.randint(0, len(self.demos["state"]), (size,))
        obs = {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx.tolist()]) for k, v in self.demos.items()
               if k in ("state", "rgb", "privileged", "instruction")}
        return self.policy.bc_loss(obs, self.demos["action"][idx], self.demos["action_mask"][idx])

    # ------------------------------------------------------------------ checkpoint
    def optimizers(self) -> dict:
        return {"actor": self.opt, **({"critic": self.critic_opt} if self.critic_opt is not None else {})}

    def extra_state(self) -> dict:
        return {"iteration": self.iteration, "critic_fits": self.critic_fits}

    def load_extra_state(self, d: dict) -> None:
        self.iteration = d["iteration"]
        self.critic_fits = d.get("critic_fits", 0)
