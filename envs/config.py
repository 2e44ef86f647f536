"""Typed env config mirroring :func:`vla_rl.envs.make_env` (validated by OmegaConf structured configs).

``task`` is an env spec (``vla_rl.envs.registry``): a task name, ``gym:<id>`` or ``module:factory``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .base import EnvError
from .randomization import RandomizationConfig


def _check_keys(cls, d: dict, what: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in names:
            raise EnvError(f"unknown {what} key {key!r}; valid keys: {sorted(names)}")


@dataclass
class GymConfig:
    """Options of the Gymnasium adapter for ``task: gym:<id>`` (see :class:`~vla_rl.envs.gym_adapter.GymnasiumBatchedEnv`)."""

    success_key: Optional[str] = None  # the info key of the success flag; None: look for is_success, success
    instruction: Any = ""  # one instruction for every env, or a list with one per env
    instruction_fn: str = ""  # "module:function" of the env's reset info -> instruction (multi-task suites)
    control_hz: float = 10.0
    action_hold: list[Any] = field(default_factory=list)  # "zero" | "last" | a number, one or one per action dim
    obs_map: dict[str, Any] = field(default_factory=dict)  # obs key -> key of the env's Dict observation

    @staticmethod
    def from_dict(d: dict) -> "GymConfig":
        _check_keys(GymConfig, d, "gym config")
        return GymConfig(**d)


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
    gym: GymConfig = field(default_factory=GymConfig)  # the adapter's options, for task: gym:<id>

    @staticmethod
    def from_dict(d: dict) -> "EnvConfig":
        _check_keys(EnvConfig, d, "env config")
        d = dict(d)
        if d.get("randomization") is not None and not isinstance(d["randomization"], RandomizationConfig):
            d["randomization"] = RandomizationConfig.from_dict(dict(d["randomization"]))
        if isinstance(d.get("gym"), dict):
            d["gym"] = GymConfig.from_dict(dict(d["gym"]))
        return EnvConfig(**d)
