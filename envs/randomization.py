"""Declarative domain randomization, applied per env at every reset by every backend.

``RandomizationConfig`` is a dataclass tree; ranges are ``(low, high)`` tuples (``low == high`` turns
a factor off). ``split="heldout"`` draws every *visual* factor from values disjoint from training:

* hues (light colour, floor colour) come from interleaved hue bands: training uses the first half of
  each of 6 bands, held-out the second half, so both splits span the colour wheel but never meet;
* object colours keep their hue (the instruction names the colour) and split on brightness;
* table textures: the scene has ``NUM_TABLE_TEXTURES`` materials, training uses the first half,
  held-out the second half.

Backends call :func:`sample` to draw values for the envs being reset (torch, with the env's own
generator) and write them into their models; every drawn value is reported in
``info["randomization"]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .base import EnvError

HUE_BANDS = 6


@dataclass
class LightingConfig:
    intensity: tuple[float, float] = (0.5, 1.0)
    saturation: tuple[float, float] = (0.0, 0.4)  # light colour saturation; hue split train/held-out


@dataclass
class VisualConfig:
    floor_color: bool = True
    table_texture: bool = True
    object_brightness: tuple[float, float] = (0.6, 1.0)  # split: train lower half, held-out upper


@dataclass
class CameraConfig:
    pos_jitter: float = 0.0  # metres, uniform per axis
    fovy_jitter: float = 0.0  # degrees


@dataclass
class DynamicsConfig:
    friction: tuple[float, float] = (1.0, 1.0)  # scale of sliding friction of objects and fingers
    mass: tuple[float, float] = (1.0, 1.0)  # scale of object masses
    damping: tuple[float, float] = (1.0, 1.0)  # scale of finger joint damping
    armature: tuple[float, float] = (1.0, 1.0)
    actuator_gain: tuple[float, float] = (1.0, 1.0)  # scale of finger position gains kp
    action_delay: tuple[int, int] = (0, 0)  # control steps, inclusive
    action_noise: float = 0.0  # std of Gaussian noise on normalized actions
    obs_noise: float = 0.0  # std of Gaussian noise on the state observation


@dataclass
class RandomizationConfig:
    split: str = "train"
    lighting: LightingConfig = field(default_factory=LightingConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)

    def __post_init__(self):
        validate(self)

    @staticmethod
    def from_dict(d: dict | None) -> "RandomizationConfig":
        return _from_dict(RandomizationConfig, d or {}, "randomization")


def _from_dict(cls, d: dict, path: str):
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise EnvError(f"{path} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            raise EnvError(f"unknown key {path}.{key}; valid keys: {sorted(fields)}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _from_dict(sub, value, f"{path}.{key}")
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def validate(cfg, path: str = "randomization") -> None:
    if isinstance(cfg, RandomizationConfig) and cfg.split not in ("train", "heldout"):
        raise EnvError(f"{path}.split must be 'train' or 'heldout', got {cfg.split!r}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{path}.{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, name)
        elif isinstance(value, tuple):
            if len(value) != 2 or not all(_is_number(v) for v in value):
                raise EnvError(f"{name} must be a (low, high) pair of numbers, got {value}")
            if value[0] > value[1]:
                raise EnvError(f"{name}: low {value[0]} > high {value[1]}")
            # Every factor is a scale, an intensity, a step count or a std: none is meaningful below 0.
            if value[0] < 0:
                raise EnvError(f"{name}={list(value)}: must be 0 <= low <= high, got low {value[0]}")
            if f.type in ("tuple[int, int]", tuple[int, int]) and not all(float(v).is_integer() for v in value):
                raise EnvError(f"{name} must be a pair of integers (control steps), got {value}")
        elif _is_number(value) and value < 0:
            raise EnvError(f"{name} must be >= 0, got {value}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def uniform(gen: torch.Generator, n: int, low: float, high: float, k: int | None = None) -> torch.Tensor:
    shape = (n,) if k is None else (n, k)
    return low + (high - low) * torch.rand(shape, generator=gen)


def split_hue(gen: torch.Generator, n: int, split: str) -> torch.Tensor:
    """Hue in [0, 1): training = first half of each of HUE_BANDS bands, held-out = second half."""
    band = torch.randint(0, HUE_BANDS, (n,), generator=gen).float()
    offset = torch.rand(n, generator=gen) * 0.5 + (0.5 if split == "heldout" else 0.0)
    return (band + offset) / HUE_BANDS


def hue_is_heldout(hue: torch.Tensor) -> torch.Tensor:
    return (hue * HUE_BANDS) % 1.0 >= 0.5


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def split_range(low: float, high: float, split: str) -> tuple[float, float]:
    mid = 0.5 * (low + high)
    return (mid, high) if split == "heldout" else (low, mid)


def sample(cfg: RandomizationConfig, gen: torch.Generator, n: int, num_textures: int) -> dict:
    """Draw every factor for ``n`` envs; returns a dict of tensors [n] or [n, k]."""
    L, V, C, D = cfg.lighting, cfg.visual, cfg.camera, cfg.dynamics
    out = {}
    light_hue = split_hue(gen, n, cfg.split)
    out["light_hue"] = light_hue
    out["light_rgb"] = hsv_to_rgb(light_hue, uniform(gen, n, *L.saturation), uniform(gen, n, *L.intensity))
    if V.floor_color:
        floor_hue = split_hue(gen, n, cfg.split)
        out["floor_hue"] = floor_hue
        out["floor_rgb"] = hsv_to_rgb(floor_hue, uniform(gen, n, 0.3, 0.7), uniform(gen, n, 0.3, 0.8))
    if V.table_texture:
        half = num_textures // 2
        lo = half if cfg.split == "heldout" else 0
        out["table_texture"] = torch.randint(lo, lo + half, (n,), generator=gen)
    out["object_brightness"] = uniform(gen, n, *split_range(*V.object_brightness, cfg.split))
    out["camera_offset"] = uniform(gen, n, -C.pos_jitter, C.pos_jitter, 3)
    out["camera_fovy_offset"] = uniform(gen, n, -C.fovy_jitter, C.fovy_jitter)
    for name in ("friction", "mass", "damping", "armature", "actuator_gain"):
        out[name] = uniform(gen, n, *getattr(D, name))
    out["action_delay"] = torch.randint(D.action_delay[0], D.action_delay[1] + 1, (n,), generator=gen)
    return out
