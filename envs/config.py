"""Typed env config mirroring :func:`vla_rl.envs.make_env` (validated by OmegaConf structured configs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .base import EnvError
from .randomization import RandomizationConfig


@dataclass
class EnvConfig:
    task: str = "lift"
    num_envs: int = 16
    backend: str = "cpu"
    device: str = "cpu"
    cameras: list[str] = field(default_factory=list)
    image_size: list[int] = field(default_factory=lambda: [128, 128])
    randomization: Optional[RandomizationConfig] = None
    seed: Optional[int] = None
    max_episode_steps: Optional[int] = None
    workers: int = 1  # > 1: CPU envs in that many parallel processes (make_env)
    task_kwargs: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_dict(d: dict) -> "EnvConfig":
        names = {f.name for f in dataclasses.fields(EnvConfig)}
        for key in d:
            if key not in names:
                raise EnvError(f"unknown env config key {key!r}; valid keys: {sorted(names)}")
        d = dict(d)
        if d.get("randomization") is not None and not isinstance(d["randomization"], RandomizationConfig):
            d["randomization"] = RandomizationConfig.from_dict(dict(d["randomization"]))
        return EnvConfig(**d)
