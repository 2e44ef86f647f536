"""Action and state normalization, stored with the model (buffers, so they land in model.safetensors)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Normalizer(nn.Module):
    """Actions map to [-1, 1] per dim (min/max, the diffusion convention); states to zero mean, unit std."""

    def __init__(self, action_dim: int, state_dim: int):
        super().__init__()
        self.register_buffer("action_low", -torch.ones(action_dim))
        self.register_buffer("action_high", torch.ones(action_dim))
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))

    @torch.no_grad()
    def fit(self, actions: np.ndarray | torch.Tensor, states: np.ndarray | torch.Tensor, margin: float = 0.0):
        actions = torch.as_tensor(np.asarray(actions), dtype=torch.float32).reshape(-1, self.action_low.numel())
        states = torch.as_tensor(np.asarray(states), dtype=torch.float32).reshape(-1, self.state_mean.numel())
        low, high = actions.min(0).values, actions.max(0).values
        span = (high - low).clamp(min=1e-3)  # constant dims would divide by zero
        self.action_low.copy_(low - margin * span)
        self.action_high.copy_(high + margin * span)
        self.state_mean.copy_(states.mean(0))
        self.state_std.copy_(states.std(0).clamp(min=1e-3))

    def _span(self):
        return (self.action_high - self.action_low).clamp(min=1e-6)

    def normalize_action(self, a):
        return 2 * (a - self.action_low) / self._span() - 1

    def unnormalize_action(self, a):
        return (a + 1) / 2 * self._span() + self.action_low

    def normalize_state(self, s):
        return (s - self.state_mean) / self.state_std

    def to_dict(self) -> dict:
        return {k: v.tolist() for k, v in self.state_dict().items()}
