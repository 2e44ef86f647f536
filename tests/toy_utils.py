"""Shared helpers for the RL tests: a tiny diffusion policy BC-pretrained on the bimodal toy demos."""

import torch

from vla_rl.envs.toy import ToyGoalEnv, toy_demos
from vla_rl.policy import VLAPolicy
from vla_rl.policy.config import DiTConfig, NoiseConfig, PolicyConfig


def toy_policy_cfg(**noise):
    return PolicyConfig(action_dim=2, state_dim=3, horizon=4, exec_steps=4, language_encoder="hash",
                        language_dim=16, language_buckets=64, dit=DiTConfig(d_model=32, n_layers=1, n_heads=2),
                        noise=NoiseConfig(**{"kind": "ddim", "train_steps": 50, "sample_steps": 5, "eta": 1.0,
                                             "std_floor": 0.1, **noise}),
                        critic_hidden=[64, 64], critic_privileged=False)


def pretrain_toy(steps=600, seed=0, **noise):
    torch.manual_seed(seed)
    pol = VLAPolicy(toy_policy_cfg(**noise))
    obs, actions = toy_demos(2048, 4, seed=seed)
    pol.normalizer.fit(actions, obs["state"])
    opt = torch.optim.Adam(pol.actor_parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 2048, (256,), generator=g)
        o = {"state": obs["state"][idx], "instruction": [obs["instruction"][0]] * 256}
        loss = pol.bc_loss(o, actions[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pol
