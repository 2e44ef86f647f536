"""What the runner reports about its rollouts beyond losses: an unbiased training success rate and
diverged (unstable) envs, with a stop when most envs keep diverging.

Why the success rate needs care: the episodes that *end* inside a rollout window are biased toward short
ones, and short episodes are the successful ones (success ends an episode; failure runs to the time limit),
so the plain "success among ended episodes" reads 1.0 in early iterations. :class:`EpisodeOutcomes` counts,
per iteration and per env, the first episode the env *starts* after the iteration began (a choice that does
not depend on that episode's length) and reports the iteration once every such episode has ended -- the
fixed quota of ``vla_rl.evaluate`` (one episode per env), on the training stream.
"""

from __future__ import annotations

import torch


class TrainingDiverged(RuntimeError):
    """Most envs kept diverging: training on their data would be meaningless."""


class EpisodeOutcomes:
    """Iteration ``b`` counts, for every env, the first episode that starts at or after ``b`` began (one
    episode may count for several iterations when it spans them): a fixed quota of one episode per env,
    chosen without looking at its length, so short successes are not over-counted."""

    def __init__(self, num_envs: int):
        none = torch.full((num_envs,), -1, dtype=torch.long)
        self.lo, self.hi = none.clone(), none.clone()  # iterations the running episode counts for (-1: none)
        self.owed = none.clone()  # first iteration an env still owes an episode to (-1: none)
        self.current = -1
        self.results: dict[int, list[bool]] = {}
        self.spoiled: set[int] = set()  # iterations with an episode cut short by a reset: not reported

    def begin(self, iteration: int, fresh: torch.Tensor) -> None:
        """Iteration ``iteration`` starts; ``fresh`` marks envs whose episode starts right now (clock 0)."""
        fresh = fresh.cpu().bool()
        self.current = iteration
        self.results.setdefault(iteration, [])
        counted = fresh & (self.lo >= 0)  # started at this very boundary: it is this iteration's episode too
        self.hi[counted] = iteration
        self.owed[~counted & (self.owed < 0)] = iteration
        self._start(fresh)

    def _start(self, started: torch.Tensor) -> None:
        take = started & (self.owed >= 0) & (self.lo < 0)
        self.lo[take], self.hi[take] = self.owed[take], self.current
        self.owed[take] = -1

    def record(self, done: torch.Tensor, success: torch.Tensor) -> None:
        """After a step: episodes in ``done`` ended with ``success``; their envs start new episodes."""
        done = done.cpu().bool()
        for i in (done & (self.lo >= 0)).nonzero().flatten().tolist():
            for it in range(int(self.lo[i]), int(self.hi[i]) + 1):
                self.results.setdefault(it, []).append(bool(success[i]))
        self.lo[done], self.hi[done] = -1, -1
        if self.current >= 0:
            self._start(done)

    def abandon(self) -> None:
        """Every env is reset mid-episode (eval, group reset): the counted episodes cut short are lost, so
        their iterations would be biased and are dropped."""
        for i in (self.lo >= 0).nonzero().flatten().tolist():
            self.spoiled.update(range(int(self.lo[i]), int(self.hi[i]) + 1))
        self.lo[:], self.hi[:] = -1, -1

    def completed(self) -> list[tuple[int, float, int]]:
        """``(iteration, success rate, episodes)`` of every iteration now fully known, oldest first (once)."""
        return [(it, k / n, n) for it, k, n, spoiled in self.completed_counts() if not spoiled and n]

    def completed_counts(self) -> list[tuple[int, int, int, bool]]:
        """``(iteration, successes, episodes, spoiled)`` of every iteration now fully known, oldest first (once),
        spoiled and empty ones included: with several ranks an iteration is reported once *every* rank knows it
        (``vla_rl.runner``), so each rank must say so even when it has nothing to add."""
        pending = [int(x) for x in self.lo[self.lo >= 0]] + [int(x) for x in self.owed[self.owed >= 0]]
        first_open = min(pending, default=self.current + 1)
        out = []
        for it in sorted(self.results):
            if it >= first_open:
                break  # some env still owes (or runs) an episode for it
            res = self.results.pop(it)
            out.append((it, sum(res), len(res), it in self.spoiled))
            self.spoiled.discard(it)
        return out


class DivergenceWatch:
    """Counts the envs that diverged (``info["unstable"]``) in the current iteration and stops training
    when more than half of them diverge in ``patience`` iterations in a row (0 = never stop)."""

    def __init__(self, num_envs: int, patience: int, total_envs: int | None = None):
        # total_envs: the envs of all ranks (the majority is taken over them); num_envs: this process's
        self.num_envs, self.patience = (total_envs or num_envs), patience
        self.unstable = torch.zeros(num_envs, dtype=torch.bool)
        self.history: list[int] = []

    def record(self, info: dict, done: torch.Tensor) -> None:
        if "unstable" in info:
            self.unstable |= info["unstable"].cpu().bool() & done.cpu().bool()

    def end_iteration(self, reduce=None) -> int:
        """The count of envs that diverged in the iteration that just ended (then reset for the next);
        ``reduce``: turns this process's count into all ranks' (a sum over ranks)."""
        count = int(self.unstable.sum())
        if reduce is not None:
            count = reduce(count)
        self.unstable[:] = False
        self.history = (self.history + [count])[-max(self.patience, 1):]
        return count

    def check(self, iteration: int, where: str) -> None:
        """Raise :class:`TrainingDiverged` when the last ``patience`` iterations each had a diverged majority."""
        majority = [c > self.num_envs / 2 for c in self.history]
        if self.patience and len(majority) == self.patience and all(majority):
            raise TrainingDiverged(
                f"more than half of the {self.num_envs} envs diverged (simulation unstable: NaN state or physics "
                f"warning) in each of the last {self.patience} iterations (counts {self.history}, up to iteration "
                f"{iteration}); stopped. {where} Check the task's dynamics and randomization ranges and the action "
                f"scale, or set runner.max_unstable_iters=0 to keep going anyway.")
