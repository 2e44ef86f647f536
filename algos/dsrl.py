"""DSRL: off-policy RL over the initial noise of a frozen diffusion / flow chain (Wagenmaker et al. 2025,
"Steering Your Diffusion Policy with Latent Space Reinforcement Learning"), the SAC variant.

The pretrained chain is a fixed, deterministic map from x_K (and the observation) to an action chunk.
A small noise actor (``vla_rl.policy.NoiseActor``: tanh-squashed Gaussian, |w| <= bound) picks
w = x_K per decision; SAC learns it from a replay buffer of (observation features, w, outcome reward,
next features) with an ensemble of critics Q(s, w), several gradient steps per decision. The actor and
critics read the frozen policy's conditioning tokens (computed once per observation, so a VLM backbone
runs once per decision), and the critics also read the episode clock -- the time-limit cut counts as a
failure, so without it the value of a state is not a function of the input.

One update, top to bottom (:meth:`DSRL.gradient_step`):
1. target  y = r + gamma (1 - done) [min_i Q'_i(s', w') - alpha log pi(w'|s')],  w' ~ pi(.|s')
2. critic  sum_i (Q_i(s, w) - y)^2
3. actor   alpha log pi(w|s) - min_i Q_i(s, w),  w ~ pi(.|s)  (reparameterized)
4. alpha   -log_alpha (log pi(w|s) + target_entropy)
5. Polyak  Q'_i <- (1 - tau) Q'_i + tau Q_i
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from vla_rl import distributed
from vla_rl.policy.noise_actor import layer_norm_mlp


@dataclass
class DSRLConfig:
    bound: float = 1.5  # |x_K| <= bound (published default)
    # Published: 3 x 2048 (GPU). On a CPU a gradient step of 2 x 256 critics + actor at batch 256 costs
    # ~20-40 ms, 20-40x an env step: the update, not the simulator, sets the pace.
    actor_hidden: list[int] = field(default_factory=lambda: [256, 256])
    critic_hidden: list[int] = field(default_factory=lambda: [256, 256])
    # Initial log-std of the pre-squash Gaussian: 0 starts the actor close to the base policy's own N(0, 1)
    # noise (squashed into the bound), i.e. the pretrained behaviour with its full spread to explore.
    actor_log_std_init: float = 0.0
    n_critics: int = 2
    gamma: float = 0.99  # per decision
    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    # Outcome rewards in {0, 1} bound Q by 1, while the entropy of a 32-dim noise moves by tens of nats: an
    # entropy weight starting at SAC's usual 1.0 drowns the reward (on the toy task: no learning in 2k
    # decisions; from 0.01: 100% in 1k). Tuned automatically from there toward target_entropy.
    init_alpha: float = 0.01
    # Target entropy of the squashed noise (nats, whole chunk). Published: 0.0 (robomimic).
    target_entropy: float = 0.0
    batch_size: int = 256
    # Gradient steps per decision collected (the update-to-data ratio). Published: 20 gradient steps per
    # vector step of 4 envs, i.e. 5 per decision.
    utd: float = 5.0
    buffer_size: int = 200_000  # decisions
    # Decisions collected with the base policy's own noise (w ~ N(0, 1) clipped to the bound) before the
    # actor acts and updates start (published: 1,501 rollout steps).
    learning_starts: int = 1_000
    # Subtracted from every decision's reward (the published robomimic recipe uses 1: -1 per decision until
    # success). Still a function of outcome and time only, but on a task that can *fail* early (a wrapped
    # env's own termination) it makes failing early cheaper than timing out: set 0 there. Measured on
    # `place`: with the {0, 1} reward alone Q rose to 3-7 within 30k env steps while the entropy term was
    # ~0 (alpha 0.004, entropy ~0 nats), i.e. far above any return; with the offset it stayed below 0.
    reward_offset: float = 1.0
    critic_clock: bool = True  # the critics see the fraction of the episode's time limit used
    critic_privileged: bool = False  # the critics also see obs["privileged"]


class ReplayBuffer:
    """Preallocated ring buffer of transitions in feature space (the base policy is frozen, so the
    features of an observation never change)."""

    def __init__(self, capacity: int, feature_dim: int, extra_dim: int, noise_dim: int):
        self.capacity, self.size, self.pos = int(capacity), 0, 0
        self.data = {
            "feat": torch.zeros(capacity, feature_dim), "extra": torch.zeros(capacity, extra_dim),
            "w": torch.zeros(capacity, noise_dim), "reward": torch.zeros(capacity),
            "next_feat": torch.zeros(capacity, feature_dim), "next_extra": torch.zeros(capacity, extra_dim),
            "done": torch.zeros(capacity),
        }

    def add(self, **batch: torch.Tensor) -> None:
        n = len(batch["reward"])
        if n > self.capacity:
            raise ValueError(f"replay buffer: {n} transitions at once exceed its capacity {self.capacity}")
        idx = (self.pos + torch.arange(n)) % self.capacity
        for k, v in self.data.items():
            v[idx] = batch[k].detach().to(v.dtype).cpu().reshape(n, *v.shape[1:])
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator=None) -> dict:
        idx = torch.randint(0, self.size, (batch_size,), generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    def state_tensors(self) -> dict:
        return {f"replay/{k}": v[: self.size].contiguous() for k, v in self.data.items()}

    def load_tensors(self, tensors: dict, pos: int) -> None:
        for k, v in self.data.items():
            t = tensors[f"replay/{k}"]
            v[: len(t)] = t
            self.size = len(t)
        self.pos = pos


class DSRL:
    name = "dsrl"
    off_policy = True
    uses_critic = False  # the runner's on-policy critic (V) is not used

    def __init__(self, policy, cfg: DSRLConfig | None = None):
        self.cfg = cfg = cfg or DSRLConfig()
        if cfg.n_critics < 1 or cfg.batch_size < 1 or cfg.utd <= 0:
            raise ValueError("dsrl: n_critics, batch_size and utd must be positive")
        self.policy = policy
        self.actor = policy.attach_noise_actor(bound=cfg.bound, hidden=list(cfg.actor_hidden),
                                               log_std_init=cfg.actor_log_std_init)
        if self.actor.cfg.bound != cfg.bound:  # a policy that already carries its noise actor keeps it
            raise ValueError(f"dsrl.bound={cfg.bound} but the policy's noise actor has bound {self.actor.cfg.bound}")
        p = policy.cfg
        self.feature_dim = policy.num_cond_tokens * p.dit.d_model
        self.noise_dim = p.horizon * p.action_dim
        self.extra_dim = int(cfg.critic_clock) + (p.privileged_dim if cfg.critic_privileged else 0)
        sizes = [self.feature_dim + self.extra_dim + self.noise_dim, *cfg.critic_hidden, 1]
        self.critics = nn.ModuleList(layer_norm_mlp(sizes) for _ in range(cfg.n_critics)).to(policy.device)
        self.targets = copy.deepcopy(self.critics).requires_grad_(False)
        self.log_alpha = torch.tensor(float(torch.tensor(cfg.init_alpha).log()), device=policy.device, requires_grad=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critics.parameters(), lr=cfg.critic_lr, fused=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr)
        self.replay = ReplayBuffer(cfg.buffer_size, self.feature_dim, self.extra_dim, self.noise_dim)
        self.decisions, self.grad_steps, self._owed = 0, 0, 0.0
        self.gen = torch.Generator().manual_seed(0)

    # ------------------------------------------------------------------ acting
    def critic_extra(self, obs: dict, clock: torch.Tensor) -> torch.Tensor:
        """The critics' inputs beyond the features (on the CPU, where the replay buffer lives)."""
        parts = [clock.float().cpu().view(-1, 1)] if self.cfg.critic_clock else []
        if self.cfg.critic_privileged:
            parts.append(obs["privileged"].float().cpu())
        return torch.cat(parts, -1) if parts else torch.zeros(len(clock), 0)

    @torch.no_grad()
    def act(self, obs: dict, cond: torch.Tensor | None = None, generator=None):
        """(action chunk [N, H, A], noise w [N, H, A], features [N, F]) for one decision of every env;
        ``cond``: the observation's conditioning tokens if already computed."""
        cond = self.policy.encode(obs) if cond is None else cond
        feats = cond.flatten(1)
        if self.decisions < self.cfg.learning_starts:  # the base policy's own noise, within the actor's bound
            w = torch.randn(feats.shape[0], *self.actor.shape, generator=generator, device=feats.device)
            bound = self.actor.cfg.bound
            w = (w * self.policy.cfg.noise.init_scale).clamp(-bound, bound)
        else:
            w, _ = self.actor.sample(feats, generator=generator)
        chain = self.policy.sample(obs, deterministic=True, init_noise=w, cond=cond)
        return chain.actions, w, feats

    def observe(self, feats, extra, w, reward, next_feats, next_extra, terminal) -> None:
        """Store one decision of every env; ``terminal`` cuts the bootstrap (success, or the time limit,
        which the clock makes part of the state)."""
        self.replay.add(feat=feats, extra=extra, w=w.flatten(1), reward=reward - self.cfg.reward_offset, next_feat=next_feats,
                        next_extra=next_extra, done=terminal.float())
        n = len(reward)
        if distributed.enabled():  # every rank's decisions: all ranks owe the same gradient steps, in step
            n = int(distributed.all_sum([n])[0])
        self.decisions += n
        self._owed += self.cfg.utd * n

    # ------------------------------------------------------------------ learning
    def q_values(self, critics, feat, extra, w) -> torch.Tensor:
        x = torch.cat([feat, extra, w], -1)
        return torch.stack([q(x).squeeze(-1) for q in critics])  # [n_critics, B]

    def gradient_step(self, batch: dict) -> dict:
        cfg = self.cfg
        dev = self.policy.device
        b = {k: v.to(dev) for k, v in batch.items()}
        alpha = self.log_alpha.exp().detach()
        # 1) target: clipped double-Q (min over the ensemble) with the entropy bonus
        with torch.no_grad():
            w_next, logp_next = self.actor.sample(b["next_feat"], generator=None)
            q_next = self.q_values(self.targets, b["next_feat"], b["next_extra"], w_next.flatten(1)).min(0).values
            target = b["reward"] + cfg.gamma * (1 - b["done"]) * (q_next - alpha * logp_next)
        # 2) critics
        q = self.q_values(self.critics, b["feat"], b["extra"], b["w"])
        critic_loss = 0.5 * ((q - target[None]) ** 2).sum(0).mean()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        distributed.average_gradients(self.critics.parameters())  # ranks: the global batch's gradient
        self.critic_opt.step()
        # 3) actor (reparameterized through the squash)
        w, logp = self.actor.sample(b["feat"])
        q_pi = self.q_values(self.critics, b["feat"], b["extra"], w.flatten(1)).min(0).values  # as SAC: the min
        actor_loss = (alpha * logp - q_pi).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        distributed.average_gradients(self.actor.parameters())
        self.actor_opt.step()
        self.critic_opt.zero_grad(set_to_none=True)  # the actor's pass left gradients on the critics
        # 4) temperature
        alpha_loss = -(self.log_alpha * (logp.detach() + cfg.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        distributed.average_gradients([self.log_alpha])
        self.alpha_opt.step()
        # 5) target networks
        with torch.no_grad():
            for t, s in zip(self.targets.parameters(), self.critics.parameters()):
                t.lerp_(s, cfg.tau)
        self.grad_steps += 1
        return {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(), "alpha": alpha.item(),
                "entropy": -logp.mean().item(), "q": q.mean().item()}

    def update(self, _buf=None) -> dict:
        """The gradient steps owed by the decisions observed since the last call (``utd`` per decision),
        once ``learning_starts`` decisions are in the buffer."""
        # Several ranks: each samples batch_size / world from its own replay buffer (its own envs' decisions),
        # so a gradient step averages over batch_size transitions as in one process.
        batch = self.cfg.batch_size // distributed.world_size()
        ready = self.decisions >= self.cfg.learning_starts and self.replay.size >= batch
        if distributed.enabled():  # all ranks or none (a resumed rank > 0 refills its buffer first)
            ready = distributed.all_max([0.0 if ready else 1.0])[0] == 0.0
        if not ready:
            self._owed = 0.0
            return {}
        n = int(self._owed)
        self._owed -= n
        logs: dict[str, list] = {}
        for _ in range(n):
            for k, v in self.gradient_step(self.replay.sample(batch, self.gen)).items():
                logs.setdefault(k, []).append(v)
        out = {k: sum(v) / len(v) for k, v in logs.items()}
        if distributed.enabled() and out:  # the logged means over every rank's batches
            out = dict(zip(out, distributed.all_mean(list(out.values()))))
        return out | {"grad_steps": float(n)}

    # ------------------------------------------------------------------ checkpoint state
    def optimizers(self) -> dict:
        return {"actor": self.actor_opt, "critic": self.critic_opt, "alpha": self.alpha_opt}

    def state_tensors(self) -> dict:
        """Tensors beyond the policy and the optimizers: critics, targets, temperature, replay buffer."""
        out = {f"critics/{k}": v for k, v in self.critics.state_dict().items()}
        out |= {f"targets/{k}": v for k, v in self.targets.state_dict().items()}
        out["log_alpha"] = self.log_alpha.detach().reshape(1)
        return out | self.replay.state_tensors()

    def load_state_tensors(self, t: dict) -> None:
        self.critics.load_state_dict({k[8:]: v for k, v in t.items() if k.startswith("critics/")})
        self.targets.load_state_dict({k[8:]: v for k, v in t.items() if k.startswith("targets/")})
        with torch.no_grad():
            self.log_alpha.copy_(t["log_alpha"][0])

    def extra_state(self) -> dict:
        return {"decisions": self.decisions, "grad_steps": self.grad_steps, "owed": self._owed,
                "replay_pos": self.replay.pos, "replay_capacity": self.replay.capacity, "gen": self.gen.get_state().tolist()}

    def load_extra_state(self, d: dict, tensors: dict | None = None) -> None:
        if d["replay_capacity"] != self.replay.capacity:  # the ring's positions only mean something at its size
            raise ValueError(f"the checkpoint's replay buffer holds {d['replay_capacity']} transitions, this run's "
                             f"dsrl.buffer_size is {self.replay.capacity}; resume with the size it was written with")
        self.decisions, self.grad_steps, self._owed = d["decisions"], d["grad_steps"], d["owed"]
        self.gen.set_state(torch.tensor(d["gen"], dtype=torch.uint8))
        if tensors is not None:
            self.load_state_tensors(tensors)
            self.replay.load_tensors(tensors, d["replay_pos"])
