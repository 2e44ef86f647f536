"""vla-rl: RL fine-tuning of diffusion/flow vision-language-action policies in parallel simulation."""

__version__ = "0.1.0"
