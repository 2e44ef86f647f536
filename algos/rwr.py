"""Reward-weighted regression on the diffusion / flow-matching loss.

Each collected (observation, executed action chunk) is weighted by ``exp(beta * normalized return)``
(return = undiscounted reward-to-go of its episode, normalized over the batch), weights clipped at
``max_weight``; the update is the weighted per-sample ``bc_loss``.

Only decisions whose episode ended inside the rollout have a known return; the others (the episode is
still running when the rollout stops) are left out of the update rather than counted as failures.

The samples are regressed on as they were drawn, so any exploration noise added on top of the model's
own distribution (``noise.std_floor`` above the sampler's std) is learned back and compounds over
iterations; run RWR with a small std floor (configs/train/place_rwr.yaml) so that the samples are the
model's distribution and only the weights move it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dppo import group_advantages, refuse_steered


@dataclass
class RWRConfig:
    beta: float = 2.0  # inverse temperature
    max_weight: float = 20.0
    normalize_returns: bool = True
    update_epochs: int = 4
    num_minibatches: int = 4
    # 1e-4 (4 epochs over ~150 decisions of known outcome per iteration) regressed the policy onto a
    # handful of its own chunks and lost every success on `place` within 13k env steps; 1e-5 did not.
    lr: float = 1e-5
    max_grad_norm: float = 1.0
    skip_constant: bool = True  # no update when all returns of the rollout are equal (no signal)


def rwr_weights(returns: torch.Tensor, beta: float, max_weight: float, normalize: bool = True) -> torch.Tensor:
    r = returns.float()
    if normalize and r.numel() > 1:
        r = (r - r.mean()) / (r.std() + 1e-8)
    return torch.exp(beta * r).clamp(max=max_weight)


def episode_ended_later(dones: torch.Tensor) -> torch.Tensor:
    """[T, N] bool: the episode of decision t ends at t or later within the rollout."""
    return dones.int().flip(0).cummax(0).values.flip(0).bool()


class RWR:
    name = "rwr"
    uses_critic = False

    def __init__(self, policy, cfg: RWRConfig | None = None):
        self.cfg = cfg or RWRConfig()
        self.policy = policy
        refuse_steered(policy, "rwr")
        self.opt = torch.optim.Adam(policy.actor_parameters(), lr=self.cfg.lr)
        self.iteration = 0

    def update(self, buf) -> dict:
        c = buf.data
        dones = c["terminated"] | c["truncated"]
        zeros = torch.zeros_like(c["group"])
        _, rtg = group_advantages(c["reward"], dones, zeros)
        known = episode_ended_later(dones)
        rtg_known = rtg[known]
        # Skip when no return is known yet, or (skip_constant) when every known return is equal (typically:
        # no success in the rollout): uniform weights would make the update plain BC on the policy's own
        # noisy samples -- pure drift, no signal.
        constant = rtg_known.numel() > 1 and bool((rtg_known == rtg_known[0]).all())
        if rtg_known.numel() == 0 or (self.cfg.skip_constant and constant):
            self.iteration += 1
            return {"policy_loss": float("nan"), "weight_max": 1.0, "weight_mean": 1.0, "skipped": 1.0}
        w = torch.zeros_like(rtg)
        w[known] = rwr_weights(rtg_known, self.cfg.beta, self.cfg.max_weight, self.cfg.normalize_returns)
        flat = buf.flatten(w, rtg)
        n, mb = flat["n"], max(1, flat["n"] // self.cfg.num_minibatches)
        losses = []
        for _ in range(self.cfg.update_epochs):
            perm = torch.randperm(n)
            for s in range(0, n, mb):
                idx = perm[s:s + mb]
                obs = buf.index_obs(flat, idx)
                per = self.policy.bc_loss(obs, flat["td"]["actions"][idx], reduction="none")
                wi = flat["adv"][idx]
                if wi.sum() <= 0:  # no decision of known outcome in this minibatch
                    continue
                loss = (wi * per).sum() / wi.sum()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.policy.actor_parameters(), self.cfg.max_grad_norm)
                self.opt.step()
                losses.append(loss.item())
        self.iteration += 1
        return {"policy_loss": sum(losses) / max(len(losses), 1), "weight_max": w[known].max().item(),
                "weight_mean": w[known].mean().item(), "known_fraction": known.float().mean().item(), "skipped": 0.0}

    def optimizers(self) -> dict:
        return {"actor": self.opt}

    def extra_state(self) -> dict:
        return {"iteration": self.iteration}

    def load_extra_state(self, d: dict) -> None:
        self.iteration = d["iteration"]
