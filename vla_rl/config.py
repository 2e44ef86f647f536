"""Configuration loading: OmegaConf YAML files validated against typed dataclass schemas.

``load_config(Schema, "configs/x.yaml", ["a.b=1"])`` merges the schema's defaults, the file(s) and
command-line ``key=value`` overrides; an unknown or ill-typed key fails at once with a message that
names it. A YAML file may start with ``base: other.yaml`` (relative to itself) to extend a preset.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the offending key."""


def _read_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config 'base' cycle through {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"cannot parse {path}: {e}") from e
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    parent = _read_yaml((path.parent / str(base)), seen + (path.resolve(),))
    return OmegaConf.merge(parent, cfg)


def load_config(schema: type, paths=(), overrides=()):
    """Return an instance of the dataclass ``schema`` built from YAML files and overrides."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    merged = OmegaConf.structured(schema)
    sources = [(str(p), _read_yaml(Path(p))) for p in paths]
    try:
        sources.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    except Exception as e:
        raise ConfigError(f"bad override in {list(overrides)}: {e}") from e
    for name, source in sources:
        try:
            merged = OmegaConf.merge(merged, source)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or getattr(e, "key", None)
            raise ConfigError(f"{name}: invalid config key {key!r}: {e.msg if hasattr(e, 'msg') else e}") from e
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"incomplete config: {e}") from e


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
