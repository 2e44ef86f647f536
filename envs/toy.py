"""A tiny outcome-reward task for learning tests: a 2-D point must reach the *correct* one of two goals.

The point starts near the origin; goals sit at (+1, 0) and (-1, 0). Which goal is correct is shown in
the state (``state[2]`` is +1 or -1). Scripted demos (:func:`toy_demos`) go to either goal 50/50
*regardless* of that bit, so a policy cloned from them picks the wrong mode about half the time and
only RL (reward 1 on reaching the correct goal, episode ends there) can make it read the bit.
Pure torch, any device; ``reset_group`` puts groups of envs into identical initial states (GRPO).
"""

from __future__ import annotations

import torch

from .base import BatchedEnv, EnvSpec

GOAL_X = 1.0
STEP = 0.3  # max displacement per control step
RADIUS = 0.3


class ToyGoalEnv(BatchedEnv):
    def __init__(self, num_envs: int, device="cpu", max_episode_steps: int = 4, seed: int = 0):
        spec = EnvSpec(action_dim=2, state_dim=3, privileged_dim=0, control_hz=10.0,
                       max_episode_steps=max_episode_steps, action_low=(-STEP, -STEP), action_high=(STEP, STEP),
                       action_names=("dx", "dy"), action_hold=("zero", "zero"), action_control="delta",
                       state_names=("x", "y", "goal_side"),
                       instructions=("go to the correct goal",))
        super().__init__(spec, num_envs, device)
        self.pos = torch.zeros(num_envs, 2, device=self.device)
        self.side = torch.ones(num_envs, device=self.device)
        self.start = torch.zeros(num_envs, 2, device=self.device)  # drawn start, reported as a "randomization" factor
        self.gen = torch.Generator(device=self.device)
        self.seed(seed)

    def seed(self, seed: int) -> None:
        super().seed(seed)
        self.gen.manual_seed(int(seed))

    def _reset_envs(self, env_ids):
        n = len(env_ids)
        self.pos[env_ids] = (torch.rand(n, 2, generator=self.gen, device=self.device) - 0.5) * 0.2
        self.side[env_ids] = torch.randint(0, 2, (n,), generator=self.gen, device=self.device).float() * 2 - 1
        self.start[env_ids] = self.pos[env_ids]

    def reset_group(self, group_size: int, seed: int | None = None):
        """Reset all envs so that each consecutive block of ``group_size`` envs starts identically."""
        obs = self.reset(seed)
        idx = torch.arange(self.num_envs, device=self.device) // group_size * group_size
        self.pos.copy_(self.pos[idx])
        self.side.copy_(self.side[idx])
        self.start.copy_(self.start[idx])
        return self._observe()

    def _control_step(self, action):
        self.pos += action.clamp(-STEP, STEP)

    def _goal(self):
        return torch.stack([self.side * GOAL_X, torch.zeros_like(self.side)], -1)

    def _success(self):
        return (self.pos - self._goal()).norm(dim=-1) < RADIUS

    def _observe(self):
        return {"state": torch.cat([self.pos, self.side[:, None]], -1).clone(),
                "instruction": [self.spec.instructions[0]] * self.num_envs}

    def _episode_info(self):
        return {"randomization": {"start_x": self.start[:, 0].clone()}}


def toy_demos(n: int, horizon: int, seed: int = 0):
    """(obs, actions [n, horizon, 2]) of a scripted expert going to a random goal (50/50, bit ignored)."""
    g = torch.Generator().manual_seed(seed)
    pos = (torch.rand(n, 2, generator=g) - 0.5) * 0.2
    side = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    target = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1  # independent of `side`
    delta = torch.stack([target * GOAL_X - pos[:, 0], -pos[:, 1]], -1) / 4  # reach in 4 steps
    actions = delta[:, None].expand(n, horizon, 2).clamp(-STEP, STEP).clone()
    actions += 0.01 * torch.randn(actions.shape, generator=g)
    obs = {"state": torch.cat([pos, side[:, None]], -1), "instruction": ["go to the correct goal"] * n}
    return obs, actions
