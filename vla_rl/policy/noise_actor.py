"""The noise actor of DSRL (Wagenmaker et al. 2025): a small policy over the *initial noise* x_K of a frozen
denoising chain.

It reads the frozen policy's conditioning tokens (computed once per observation, never trained through)
and outputs a tanh-squashed Gaussian over the chunk-shaped noise, bounded to +-``bound``: the chain then
runs deterministically (DDIM eta = 0 / the flow ODE) from that x_K. Steering the chain's input instead of
its weights keeps every action inside what the pretrained policy can produce, needs only black-box access
to the chain, and is trained off-policy (``vla_rl.algos.DSRL``), which suits scarce env steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import NoiseActorConfig


def layer_norm_mlp(sizes: list[int]) -> nn.Sequential:
    """Linear -> LayerNorm -> tanh blocks, a plain linear output (the networks DSRL's critics and actors use)."""
    layers = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.LayerNorm(sizes[i + 1]), nn.Tanh()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


class NoiseActor(nn.Module):
    def __init__(self, cfg: NoiseActorConfig, feature_dim: int, horizon: int, action_dim: int):
        super().__init__()
        if cfg.bound <= 0:
            raise ValueError(f"noise_actor.bound must be > 0, got {cfg.bound}")
        self.cfg, self.shape = cfg, (horizon, action_dim)
        dim = horizon * action_dim
        self.net = layer_norm_mlp([feature_dim, *cfg.hidden, 2 * dim])
        # Start at the base policy's own noise distribution's centre with a small spread: the steered
        # chain begins as the pretrained policy run from near x_K = 0.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias[:dim], 0.0)
        nn.init.constant_(self.net[-1].bias[dim:], cfg.log_std_init)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-squash mean and log-std, each [B, H*A]."""
        mean, log_std = self.net(features).chunk(2, -1)
        return mean, log_std.clamp(self.cfg.log_std_min, self.cfg.log_std_max)

    def squash(self, u: torch.Tensor) -> torch.Tensor:
        return self.cfg.bound * torch.tanh(u)

    def mode(self, features: torch.Tensor) -> torch.Tensor:
        """The deterministic noise b * tanh(mean), shaped [B, H, A]."""
        return self.squash(self(features)[0]).view(-1, *self.shape)

    def sample(self, features: torch.Tensor, eps: torch.Tensor | None = None, generator=None):
        """Draw w = b * tanh(mean + std * eps); returns (w [B, H, A], log-density of w [B]). ``eps``
        (standard normal, [B, H, A] or [B, H*A]) fixes the draw, e.g. in the exported graph."""
        mean, log_std = self(features)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        u = mean + log_std.exp() * eps.reshape(mean.shape)
        return self.squash(u).view(-1, *self.shape), self.log_prob_pre_squash(u, mean, log_std)

    def log_prob_pre_squash(self, u, mean, log_std) -> torch.Tensor:
        """log p(w) for w = b tanh(u), u ~ N(mean, exp(log_std)^2): the Gaussian density minus the log
        Jacobian sum log(b (1 - tanh(u)^2)), written in the overflow-free softplus form."""
        gauss = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_det = (math.log(self.cfg.bound) + 2 * (math.log(2) - u - nn.functional.softplus(-2 * u))).sum(-1)
        return gauss - log_det
