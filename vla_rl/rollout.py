"""Rollout storage of policy decisions (one decision = one action chunk with its denoising chain).

Tensors live in a ``tensordict.TensorDict`` with batch size ``[T, N]`` (observation tensors under
``obs.*``), so that flattening and minibatch indexing are one call; instructions are kept as a list
of per-step lists of strings.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from vla_rl.policy.vla import Chain


class RolloutBuffer:
    def __init__(self, num_steps: int, num_envs: int, device="cpu"):
        self.T, self.N, self.device = num_steps, num_envs, torch.device(device)
        self.steps: list[TensorDict] = []
        self.instructions: list[list[str]] = []
        self.data: TensorDict | None = None
        # The envs were reset right after this rollout (group resets): its unfinished episodes never end.
        self.episodes_cut = False

    def reset(self):
        self.steps, self.instructions, self.data = [], [], None

    def add(self, obs: dict, chain: Chain, reward, terminated, truncated, value, next_value, group=None,
            unstable=None):
        td = TensorDict({
            "obs": TensorDict({k: v for k, v in obs.items() if isinstance(v, torch.Tensor)}, batch_size=[self.N]),
            "latents": chain.latents.detach(), "actions": chain.actions.detach(), "log_prob": chain.log_prob.detach(),
            "reward": reward.float(), "terminated": terminated.bool(), "truncated": truncated.bool(),
            "value": value.detach().float(), "next_value": next_value.detach().float(),
            "group": (torch.zeros(self.N, dtype=torch.long) if group is None else group.long()),
            "unstable": (torch.zeros(self.N, dtype=torch.bool) if unstable is None else unstable.bool()),
        }, batch_size=[self.N], device=self.device)
        self.steps.append(td)
        self.instructions.append(list(obs["instruction"]))

    def finalize(self) -> TensorDict:
        self.data = torch.stack(self.steps, 0)  # [T, N]
        return self.data

    def flatten(self, adv: torch.Tensor, ret: torch.Tensor) -> dict:
        d = self.data.reshape(-1)
        instr = [s for step in self.instructions for s in step]
        return {"n": d.shape[0], "td": d, "instruction": instr, "adv": adv.reshape(-1), "ret": ret.reshape(-1),
                "value": d["value"], "log_prob": d["log_prob"],
                "chain": Chain(actions=d["actions"], latents=d["latents"], log_prob=d["log_prob"])}

    @staticmethod
    def index_obs(flat: dict, idx: torch.Tensor) -> dict:
        obs = {k: v for k, v in flat["td"]["obs"][idx].items()}
        obs["instruction"] = [flat["instruction"][i] for i in idx.tolist()]
        return obs
