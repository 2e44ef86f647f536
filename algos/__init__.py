"""RL algorithms on denoising chains."""

from .dppo import DPPO, DPPOConfig, compute_gae, group_advantages
from .dsrl import DSRL, DSRLConfig, ReplayBuffer
from .rwr import RWR, RWRConfig, episode_ended_later, rwr_weights

__all__ = ["DPPO", "DPPOConfig", "DSRL", "DSRLConfig", "ReplayBuffer", "RWR", "RWRConfig", "compute_gae", "episode_ended_later", "group_advantages",
           "rwr_weights"]
