"""The VLA policy: encoders, diffusion/flow action head, denoising chain with exact likelihoods, critic."""

from .config import DIT_SIZES, DiTConfig, NoiseConfig, PolicyConfig
from .noise import DDIMProcess, FlowSDEProcess, NoiseProcess, make_noise_process
from .vla import Chain, ObservationError, VLAPolicy, gaussian_log_prob

__all__ = [
    "DIT_SIZES", "Chain", "DDIMProcess", "DiTConfig", "FlowSDEProcess", "NoiseConfig", "NoiseProcess",
    "ObservationError", "PolicyConfig", "VLAPolicy", "gaussian_log_prob", "make_noise_process",
]
