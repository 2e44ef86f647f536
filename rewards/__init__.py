"""Outcome rewards: success predicates over simulator state and the sparse reward built from them."""

from .outcome import all_of, any_of, outcome_reward
from .predicates import grasped, in_region, lifted, released

__all__ = ["all_of", "any_of", "outcome_reward", "grasped", "in_region", "lifted", "released"]
