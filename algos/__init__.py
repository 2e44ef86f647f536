"""RL algorithms on denoising chains."""

from .dppo import DPPO, DPPOConfig, compute_gae, group_advantages
from .dsrl import DSRL, DSRLConfig, ReplayBuffer
from .rwr import RWR, RWRConfig, discounted_returns, rwr_weights

__all__ = ["DPPO", "DPPOConfig", "DSRL", "DSRLConfig", "ReplayBuffer", "RWR", "RWRConfig", "compute_gae", "discounted_returns", "group_advantages",
           "rwr_weights"]
