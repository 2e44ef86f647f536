"""Typed configuration of the VLA policy (an OmegaConf structured-config schema)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import one_of, register_rules
from .vlm_backbone import VLMConfig


@dataclass
class NoiseConfig:
    """The denoising process; every stochastic transition is Gaussian with a known mean and std."""

    # "ddim" (DDPM-trained, cosine schedule, DDIM sampler), "flow" (rectified flow, SDE sampler) or "gaussian"
    # (no diffusion: one Gaussian step around the head's output with a learned std; sample_steps must be 1),
    # the control policy for every diffusion-vs-Gaussian comparison.
    kind: str = "ddim"
    train_steps: int = 100  # DDPM diffusion steps used in training (ignored by flow)
    sample_steps: int = 10  # K: denoising steps at sampling time
    eta: float = 1.0  # DDIM eta / flow-SDE noise level; > 0 makes transitions stochastic
    std_floor: float = 0.1  # minimum std of a stochastic transition (exploration; DPPO's min sampling std)
    # K': only the last K' transitions are stochastic and fine-tuned (0 = all K). DPPO's presets use K' = 1: on
    # trained `place` policies the later steps undo an earlier transition's noise (flow K = 10: 2-28% of it
    # reaches the action from steps 5-8, DDIM x0-prediction 0-1%; benchmarks/bench_chain_noise.py), so those
    # transitions add likelihood-ratio gradient of full variance and almost no signal (BENCHMARKS.md).
    stochastic_steps: int = 0
    clip_sample: float = 1.0  # clip the predicted clean action (normalized units); 0 disables
    # Std of the initial noise x_K (a sampling temperature): 1 = the distribution the head was trained on,
    # 0 = every chunk starts from x_K = 0 (the mode of the noise). The initial draw is not a fine-tuned
    # transition, yet it decides much of the outcome (benchmarks/bench_spread.py: on `place` the BC policy,
    # deterministic after x_K, succeeds from 75% of the starts with some draws and fails with others). From x_K = 0
    # the demo's BC chain succeeds 4-12 points more often than from random draws (3 seeds; BENCHMARKS.md, "The
    # initial noise at its mode"), so the DPPO preset and the demo fine-tune and evaluate with init_scale 0.
    init_scale: float = 1.0
    # What the DDIM head regresses: "epsilon" (the added noise, DDPM's default) or "sample" (the clean chunk
    # x0). The epsilon loss weights the error in x0 by the signal-to-noise ratio, so the high-noise steps that
    # choose between modes (which object, which container) carry almost no weight and a language-conditioned
    # policy can fit the instruction-blind mixture instead (BENCHMARKS.md "Behaviour cloning", conditioning
    # neglect). "sample" weights every noise level's x0 error equally, as plain regression does. Flow ignores it.
    prediction: str = "epsilon"
    # ddim/flow: the stochastic transitions draw with a learned std per action dimension (initial value
    # exp(log_std_init), floored at std_floor) instead of the schedule's, trained by PPO with the head, so the
    # fine-tuned policy can narrow its exploration as a Gaussian policy does. Switching it on for fine-tuning a
    # checkpoint trained without it starts the std at exp(log_std_init). The "gaussian" kind always learns its std.
    learn_std: bool = False
    log_std_init: float = -1.5  # initial log std (normalized action units) of a learned std


@dataclass
class DiTConfig:
    """Diffusion transformer over the action chunk (self-attention + cross-attention to the observation)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass
class MLPHeadConfig:
    """Residual MLP action head (``PolicyConfig.head = "mlp"``)."""

    hidden: int = 256
    n_layers: int = 3  # residual blocks
    time_dim: int = 32


@dataclass
class NoiseActorConfig:
    """DSRL's actor over the chain's initial noise (``vla_rl.policy.noise_actor``); off unless enabled."""

    enabled: bool = False
    bound: float = 1.5  # |x_K| <= bound per coordinate (the published default)
    hidden: list[int] = field(default_factory=lambda: [256, 256, 256])
    log_std_init: float = -1.0
    log_std_min: float = -5.0
    log_std_max: float = 2.0


HEAD_DTYPES = ("float32", "bfloat16", "auto")  # policy.head_dtype


@dataclass
class PolicyConfig:
    action_dim: int = 4
    state_dim: int = 8
    privileged_dim: int = 0
    horizon: int = 8  # H: actions per chunk
    exec_steps: int = 4  # how many actions of a chunk are executed before re-planning
    cameras: list[str] = field(default_factory=list)
    image_size: list[int] = field(default_factory=lambda: [64, 64])  # (H, W)
    image_channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # conv encoder widths
    image_tokens: int = 4  # tokens per camera (spatial pooling grid, a square number)
    language_encoder: str = "auto"  # "minilm" (frozen pretrained), "hash" (learned word-hash embedding), "auto"
    language_dim: int = 64  # width of the learned "hash" embedding
    language_buckets: int = 4096
    # The observation backbone: "builtin" (the conv image encoder + language encoder above) or "transformers"
    # (a vision-language model loaded from the local directory vlm.path reads every camera and the
    # instruction; see vla_rl/policy/vlm_backbone.py). The proprio state stays its own token either way, and
    # the critic keeps the language encoder above (it never runs the VLM).
    backbone: str = "builtin"
    vlm: VLMConfig = field(default_factory=VLMConfig)
    # Observation trunk: transformer layers over the [state, language, camera] tokens before the action
    # head reads them, so the instruction can select what matters in the state and images (which object,
    # which container), as the VLM backbone of a VLA fuses them. 0 = the encoders' tokens as they are.
    fusion_layers: int = 2
    # The action head: "dit" (a diffusion transformer over the chunk, cross-attending to the observation
    # tokens) or "mlp" (a residual MLP over the flattened chunk and observation tokens, DPPO's head for
    # state-based tasks; see BENCHMARKS.md "Behaviour cloning" for how the two compare on `place`).
    head: str = "dit"
    # The dtype the action head's matrix products run in (torch.autocast). The weights, the optimizer state,
    # the chain's latents and every likelihood stay float32, and the head's output is cast back to float32
    # before the denoising update reads it. "bfloat16" runs the head's matmuls at 4.5x the float32 rate on a
    # CPU with AVX512-BF16 (this repo's dev machine; BENCHMARKS.md "bfloat16 action head") and on any recent
    # GPU; an exported bundle always computes in float32. "auto": bfloat16 where the device has it natively
    # (a CUDA GPU that supports it, a CPU with oneDNN's bfloat16 path), else float32 -- the presets use it.
    head_dtype: str = "float32"
    dit: DiTConfig = field(default_factory=DiTConfig)
    mlp_head: MLPHeadConfig = field(default_factory=lambda: MLPHeadConfig())
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    # A second, frozen DiT head that runs the deterministic early denoising steps (the ones before the
    # last noise.stochastic_steps). DPPO's freeze_early_steps sets it (a copy of the pretrained head) so
    # that fine-tuning moves only the fine-tuned steps; it is saved with the weights, so a reloaded,
    # resumed or exported policy samples exactly as the trained one did.
    early_head: bool = False
    # With the noise actor enabled, sample() draws x_K from it (its mode when deterministic) and runs the
    # whole chain deterministically: the pretrained chain is a fixed map from noise to actions (DSRL).
    noise_actor: NoiseActorConfig = field(default_factory=NoiseActorConfig)
    critic_hidden: list[int] = field(default_factory=lambda: [256, 256])
    critic_privileged: bool = True  # the critic may see privileged simulator state
    # The critic also reads obs["episode_time"] (fraction of the env's time limit used; the runner adds it).
    # Where the deadline cut is a failure, the value of a state depends on the time left: without the clock
    # V is not a function of its input. DPPO turns it on (DPPOConfig.critic_clock).
    critic_clock: bool = False
    critic_images: bool = False


register_rules(PolicyConfig, backbone=one_of("builtin", "transformers"))  # the others: vla_rl/config_rules.py

# Named sizes of the action head; the CLI and configs refer to them by name.
DIT_SIZES = {
    "tiny": DiTConfig(d_model=64, n_layers=2, n_heads=4),
    "small": DiTConfig(d_model=128, n_layers=4, n_heads=4),
    "base": DiTConfig(d_model=512, n_layers=8, n_heads=8),
    # ~1.07B parameters in the action head, the size class of the 1.15B decoders in the field.
    "large": DiTConfig(d_model=1536, n_layers=18, n_heads=16),
}
