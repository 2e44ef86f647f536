"""Scripted experts for the built-in tasks: batched torch, memoryless, on privileged task state.

Each expert maps the current :class:`TaskState` (+ episode targets) to a normalized action
``[N, 4 * hands]``. Being memoryless (the phase is read off the state: aligned? at grasp height?
holding?) they need no reset bookkeeping across the base class's auto-resets and recover from slips.
"""

from __future__ import annotations

import torch

from vla_rl.rewards import grasped, released

from .mujoco_cpu import MAX_DELTA
from .tasks import OBJ_WIDTH, Episode, TaskState

HOVER = 0.08  # approach height above the object
CARRY_Z = 0.16
GRASP_MIN_Z = 0.03


def _move(tcp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((target - tcp) / MAX_DELTA).clamp(-1.0, 1.0)


def _pick(tcp, gap, obj, carry_target):
    """Approach from above, descend, close, then carry to ``carry_target``: returns (dpos, grip, holding)."""
    holding = grasped(obj, tcp, gap, OBJ_WIDTH, tol=0.025)
    xy_err = (tcp[:, :2] - obj[:, :2]).norm(dim=-1)
    aligned = xy_err < 0.012
    # Grasp no lower than GRASP_MIN_Z so the fingertips stay clear of the table (they would jam).
    grasp = torch.cat([obj[:, :2], obj[:, 2:].clamp(min=GRASP_MIN_Z)], -1)
    at_grasp = aligned & ((tcp[:, 2] - grasp[:, 2]).abs() < 0.012)
    above = obj + torch.tensor([0.0, 0.0, HOVER])
    # Descend only once aligned; from too low and misaligned, go back up first.
    target = torch.where(aligned[:, None], grasp, above)
    target = torch.where(holding[:, None], carry_target, target)
    grip = torch.where(holding | at_grasp, -1.0, 1.0)
    return _move(tcp, target), grip, holding


class Expert:
    def __init__(self, task, noise: float = 0.0, generator: torch.Generator | None = None):
        self.task = task
        self.noise = noise
        self.gen = generator or torch.Generator().manual_seed(0)

    def __call__(self, s: TaskState, ep: Episode) -> torch.Tensor:
        s = TaskState(*(t.detach().cpu() for t in (s.obj_pos, s.container_pos, s.tcp, s.gap)))
        action = getattr(self, "_" + self.task.name)(s, ep)
        if self.noise > 0:
            action = action + self.noise * torch.randn(action.shape, generator=self.gen)
        return action.clamp(-1.0, 1.0)

    def _lift(self, s, ep):
        n = len(ep.target)
        obj = s.obj_pos[torch.arange(n), ep.target]
        carry = torch.cat([obj[:, :2], torch.full((n, 1), CARRY_Z)], -1)
        dpos, grip, _ = _pick(s.tcp[:, 0], s.gap[:, 0], obj, carry)
        return torch.cat([dpos, grip[:, None]], -1)

    def _place(self, s, ep):
        n = len(ep.target)
        tcp, gap = s.tcp[:, 0], s.gap[:, 0]
        obj = s.obj_pos[torch.arange(n), ep.target]
        goal = s.container_pos[torch.arange(n), ep.goal]
        carry = torch.cat([goal[:, :2], torch.full((n, 1), CARRY_Z)], -1)
        dpos, grip, holding = _pick(tcp, gap, obj, carry)
        over_goal = holding & ((tcp[:, :2] - goal[:, :2]).norm(dim=-1) < 0.015)
        lower = torch.cat([goal[:, :2], torch.full((n, 1), 0.1)], -1)
        dpos = torch.where(over_goal[:, None], _move(tcp, lower), dpos)
        drop = over_goal & (tcp[:, 2] < 0.115)
        grip = torch.where(drop, 1.0, grip)
        # After the drop the object is in the container; stay put (no re-grasp) while it settles.
        in_goal = (obj[:, :2] - goal[:, :2]).norm(dim=-1) < 0.04
        dpos = torch.where((in_goal & ~holding)[:, None], torch.zeros_like(dpos), dpos)
        grip = torch.where(in_goal & ~holding, 1.0, grip)
        return torch.cat([dpos, grip[:, None]], -1)

    def _handover(self, s, ep):
        n = s.tcp.shape[0]
        obj = s.obj_pos[:, 0]
        left, right = s.tcp[:, 0], s.tcp[:, 1]
        point = torch.tensor(self.task.handover_point).expand(n, 3)
        l_dpos, l_grip, l_holding = _pick(left, s.gap[:, 0], obj, point)
        r_holding = grasped(obj, right, s.gap[:, 1], OBJ_WIDTH, tol=0.025)
        # The right gripper (pointing up) comes from below once the object waits at the handover point.
        ready = l_holding & ((obj - point).norm(dim=-1) < 0.02)
        r_aligned = (right[:, :2] - obj[:, :2]).norm(dim=-1) < 0.012
        below = obj - torch.tensor([0.0, 0.0, HOVER])
        r_target = torch.where(r_aligned[:, None], obj, below)
        r_wait = torch.tensor([0.0, 0.15, 0.08]).expand(n, 3)
        r_target = torch.where(ready[:, None] | r_holding[:, None], r_target, r_wait)
        r_at = r_aligned & ((right[:, 2] - obj[:, 2]).abs() < 0.012)
        r_grip = torch.where((ready & r_at) | r_holding, -1.0, 1.0)
        r_dpos = _move(right, r_target)
        # Once the right hand holds it, the left opens and backs off upwards.
        l_open = r_holding
        l_grip = torch.where(l_open, 1.0, l_grip)
        retreat = torch.cat([left[:, :2], torch.full((n, 1), 0.3)], -1)
        l_dpos = torch.where(l_open[:, None],
                             torch.where(released(s.gap[:, 0], OBJ_WIDTH)[:, None], _move(left, retreat),
                                         torch.zeros_like(l_dpos)), l_dpos)
        return torch.cat([l_dpos, l_grip[:, None], r_dpos, r_grip[:, None]], -1)


def make_expert(env, noise: float = 0.0, seed: int = 0) -> "callable":
    """An expert bound to ``env``: ``expert() -> action [N, A]`` from the env's current state."""
    expert = Expert(env.task, noise, torch.Generator().manual_seed(seed))
    return lambda: expert(env.task_state(), env.episode).to(env.device)


def evaluate_expert(task: str, num_episodes: int = 50, num_envs: int = 50, noise: float = 0.0, seed: int = 0,
                    **env_kwargs) -> float:
    """Success rate of the expert over the first ``num_episodes`` finished episodes."""
    from . import make_env

    env = make_env(task, num_envs, seed=seed, **env_kwargs)
    env.reset(seed=seed)
    act = make_expert(env, noise, seed)
    successes, done = 0, 0
    while done < num_episodes:
        _, _, term, trunc, info = env.step(act())
        ended = term | trunc
        successes += int(info["success"][ended].sum())
        done += int(ended.sum())
    env.close()
    return successes / done
