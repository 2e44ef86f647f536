"""Outcome reward: 1 on the step the task succeeds (the episode then terminates), 0 otherwise.

:class:`BatchedEnv.step` applies this rule itself; these helpers let tasks and user code build the
same reward from any predicate, and combine predicates.
"""

from __future__ import annotations

from typing import Callable

import torch

Predicate = Callable[..., torch.Tensor]


def outcome_reward(success: torch.Tensor) -> torch.Tensor:
    """Sparse reward ``[N]`` float: 1.0 where ``success`` holds."""
    return success.to(torch.float32)


def all_of(*predicates: Predicate) -> Predicate:
    """A predicate true where every given predicate (called with the same arguments) is true."""

    def combined(*args, **kwargs):
        out = predicates[0](*args, **kwargs)
        for p in predicates[1:]:
            out = out & p(*args, **kwargs)
        return out

    return combined


def any_of(*predicates: Predicate) -> Predicate:
    def combined(*args, **kwargs):
        out = predicates[0](*args, **kwargs)
        for p in predicates[1:]:
            out = out | p(*args, **kwargs)
        return out

    return combined
