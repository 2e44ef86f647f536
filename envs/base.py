"""The batched environment seam: one object steps ``num_envs`` copies of a task on one torch device.

Every backend (MuJoCo on CPU, mujoco-warp, Isaac Lab, the Gymnasium adapter) subclasses
:class:`BatchedEnv` and implements five small hooks; the episode bookkeeping that the RL code relies
on lives here once:

* ``step(action)`` takes one action per env, ``[N, A]``, or an action chunk, ``[N, T, A]``. A chunk is
  executed open-loop for ``T`` control steps; an env whose episode ends inside the chunk is frozen
  for the rest of it (its remaining actions are not executed in the next episode) and the reward is
  summed over the executed steps; ``info["steps_executed"]`` counts them per env. One policy
  decision = one chunk, as in DPPO.
* auto-reset: envs that ended are reset before ``step`` returns; the returned observation is the
  first one of the new episode, and ``info["final_obs"]`` / ``info["success"]`` keep the last
  observation and the outcome of the finished episode.
* a diverging simulation (NaN or a physics warning in one env) resets that env alone, counts it in
  ``info["unstable"]`` and the batch goes on.

Observations are dicts of batched tensors on ``self.device``::

    rgb          uint8   [N, cams, 3, H, W]   (when cameras are on)
    state        float32 [N, S]               proprioception
    privileged   float32 [N, P]               object poses etc., for critics only
    instruction  list[str] of length N        the per-env language instruction
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch

Obs = dict  # str -> Tensor, plus "instruction": list[str]


class EnvError(ValueError):
    """Bad input to an environment (wrong action shape, NaN action, bad configuration)."""


@dataclass
class EnvSpec:
    """What a policy needs to know about an environment to be built for it."""

    action_dim: int
    state_dim: int
    privileged_dim: int = 0
    cameras: tuple[str, ...] = ()
    image_size: tuple[int, int] = (0, 0)  # (H, W)
    control_hz: float = 10.0
    max_episode_steps: int = 100
    # Physical meaning of each action dimension and its bounds, for export manifests.
    action_low: tuple[float, ...] = ()
    action_high: tuple[float, ...] = ()
    action_names: tuple[str, ...] = ()
    # What holding still means per action dim, for the deploy safety filter (written to export manifests):
    # "zero" (a delta command: no motion), "last" (an absolute command: repeat the last one) or a fixed
    # value. Empty: not declared (export then asks for it instead of guessing).
    action_hold: tuple = ()
    action_control: str = ""  # a short name of the control mode, e.g. "ee_delta"; informational
    state_names: tuple[str, ...] = ()
    instructions: tuple[str, ...] = ()  # the training instructions (others may be used at eval)
    extra: dict = field(default_factory=dict)


class BatchedEnv(abc.ABC):
    """Base class of all batched environments; see the module docstring for the contract."""

    spec: EnvSpec
    num_envs: int
    device: torch.device

    def __init__(self, spec: EnvSpec, num_envs: int, device: str | torch.device = "cpu"):
        if num_envs < 1:
            raise EnvError(f"num_envs must be >= 1, got {num_envs}")
        self.spec = spec
        self.num_envs = int(num_envs)
        self.device = torch.device(device)
        self.episode_step = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self.episode_return = torch.zeros(self.num_envs, dtype=torch.float32, device=self.device)
        self._seed: int | None = None

    # ------------------------------------------------------------------ hooks for backends
    @abc.abstractmethod
    def _reset_envs(self, env_ids: torch.Tensor) -> None:
        """Reset the listed envs (long tensor of indices) to fresh, randomized initial states."""

    @abc.abstractmethod
    def _control_step(self, action: torch.Tensor) -> None:
        """Apply one control action ``[N, A]`` to every env and advance physics one control period."""

    @abc.abstractmethod
    def _success(self) -> torch.Tensor:
        """Bool ``[N]``: does each env's current state satisfy its task's success predicate?"""

    @abc.abstractmethod
    def _observe(self) -> Obs:
        """The current observation dict of all envs."""

    def _unstable(self) -> torch.Tensor:
        """Bool ``[N]``: envs whose simulation diverged this step (NaN state, physics warning)."""
        return torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)

    def _failed(self) -> torch.Tensor:
        """Bool ``[N]``: envs whose episode ended in failure before the time limit (e.g. a wrapped
        Gymnasium env that terminated without success). Built-in tasks never fail early."""
        return torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)

    def _truncated(self) -> torch.Tensor:
        """Bool ``[N]``: envs whose own simulator ended the episode at its time limit (a wrapped Gymnasium
        env's ``truncated``): reported as a truncation, like ours, not as a failure."""
        return torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)

    def _shaped_reward(self) -> torch.Tensor | None:
        """Optional dense reward for ablations only; ``None`` means outcome-only (the default)."""
        return None

    def _episode_info(self) -> dict:
        """Per-env extras reported with every step, e.g. the randomization values each env drew."""
        return {}

    def seed(self, seed: int) -> None:
        self._seed = int(seed)

    def close(self) -> None:
        """Release simulator resources (renderers, threads)."""

    # ------------------------------------------------------------------ public API
    def reset(self, seed: int | None = None) -> Obs:
        """Reset every env; with ``seed`` the whole batch is reproducible."""
        if seed is not None:
            self.seed(seed)
        all_ids = torch.arange(self.num_envs, device=self.device)
        self._reset_envs(all_ids)
        self.episode_step.zero_()
        self.episode_return.zero_()
        return self._observe()

    def step(self, action: torch.Tensor):
        """Execute an action ``[N, A]`` or a chunk ``[N, T, A]``; see the module docstring."""
        chunk = self._check_action(action)
        n, horizon = chunk.shape[0], chunk.shape[1]
        reward = torch.zeros(n, dtype=torch.float32, device=self.device)
        ended = torch.zeros(n, dtype=torch.bool, device=self.device)
        terminated = torch.zeros_like(ended)
        truncated = torch.zeros_like(ended)
        success = torch.zeros_like(ended)
        unstable = torch.zeros_like(ended)
        final_obs: Obs | None = None
        executed = torch.zeros(n, dtype=torch.long, device=self.device)
        hold = chunk[:, 0]
        for t in range(horizon):
            running = ~ended
            # Frozen envs repeat their last executed action; whatever it does is discarded at reset.
            hold = torch.where(running[:, None], chunk[:, t], hold)
            self._control_step(hold)
            self.episode_step += running.long()
            executed += running.long()
            succ_now = self._success() & running
            bad_now = self._unstable() & running
            shaped = self._shaped_reward()
            step_reward = succ_now.float() if shaped is None else shaped
            step_reward = torch.where(bad_now, torch.zeros_like(step_reward), step_reward)
            reward += torch.where(running, step_reward, torch.zeros_like(step_reward))
            # The time limit: ours, or the wrapped simulator's own (e.g. a Gymnasium TimeLimit).
            trunc_now = running & ~succ_now & ((self.episode_step >= self.spec.max_episode_steps) | self._truncated())
            # A diverged env is cut off as a truncation: its outcome is unknown, not a failure.
            trunc_now |= bad_now & ~succ_now
            fail_now = self._failed() & running & ~succ_now & ~trunc_now
            newly = succ_now | trunc_now | fail_now
            if newly.any():
                obs_now = self._observe()
                final_obs = _merge_obs(final_obs, obs_now, newly)
            terminated |= succ_now | fail_now
            truncated |= trunc_now
            success |= succ_now
            unstable |= bad_now
            ended |= newly
            if bool(ended.all()):
                break
        info = self._end_step(reward, ended, success, unstable, executed, final_obs)
        return self._observe(), reward, terminated, truncated, info

    def _end_step(self, reward, ended, success, unstable, executed, final_obs: Obs | None,
                  reset_ended: bool = True) -> dict:
        """The tail every backend's ``step`` shares: episode bookkeeping, the info dict, and the reset of
        ended envs (``reset_ended=False`` where the simulator already reset them itself). ``executed``:
        control steps each env ran in this call before its episode ended."""
        self.episode_return += reward
        info = {
            "success": success,
            "unstable": unstable,
            "steps_executed": executed,
            "episode_return": torch.where(ended, self.episode_return, torch.zeros_like(reward)),
            "episode_length": torch.where(ended, self.episode_step, torch.zeros_like(self.episode_step)),
        }
        info.update(self._episode_info())
        if final_obs is not None:
            info["final_obs"] = final_obs
        if ended.any():
            ids = ended.nonzero(as_tuple=False).squeeze(-1)
            if reset_ended:
                self._reset_envs(ids)
            self.episode_step[ids] = 0
            self.episode_return[ids] = 0.0
        return info

    # ------------------------------------------------------------------ helpers
    def _check_action(self, action) -> torch.Tensor:
        if not isinstance(action, torch.Tensor):
            action = torch.as_tensor(action)
        action = action.to(self.device, torch.float32)
        a = self.spec.action_dim
        if action.dim() == 2:
            action = action[:, None]
        if action.dim() != 3 or action.shape[0] != self.num_envs or action.shape[2] != a:
            raise EnvError(
                f"action must have shape [num_envs={self.num_envs}, {a}] or "
                f"[num_envs={self.num_envs}, T, {a}], got {tuple(action.shape)}"
            )
        if not torch.isfinite(action).all():
            bad = (~torch.isfinite(action)).flatten(1).any(1).nonzero().flatten().tolist()
            raise EnvError(f"action contains NaN/inf for envs {bad}")
        return action


def _merge_obs(old: Obs | None, new: Obs, mask: torch.Tensor) -> Obs:
    """Keep ``new`` for envs in ``mask`` and ``old`` (if any) elsewhere; lists are merged per env."""
    if old is None:
        old = {k: (list(v) if isinstance(v, list) else v.clone()) for k, v in new.items()}
        return old
    out = {}
    for k, v in new.items():
        if isinstance(v, list):
            out[k] = [nv if m else ov for nv, ov, m in zip(v, old[k], mask.tolist())]
        else:
            m = mask.view(-1, *([1] * (v.dim() - 1)))
            out[k] = torch.where(m, v, old[k])
    return out
