"""Configuration loading: OmegaConf YAML files validated against typed dataclass schemas.

``load_config(Schema, "configs/x.yaml", ["a.b=1"])`` merges the schema's defaults, the file(s) and
command-line ``key=value`` overrides; an unknown or ill-typed key fails at once with a message that
names it. A YAML file may start with ``base: other.yaml`` (relative to itself) to extend a preset.

Values are checked in one place, :func:`check_values`: every dataclass in the config tree is looked up in
a registry of :class:`Rule` s (``vla_rl.config_rules`` holds the library's; :func:`register_rules` adds a
plug-in's), so ``runner.iterations=0`` fails before any work with the key and the allowed range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
            msg = str(e.msg if hasattr(e, "msg") else e).splitlines()[0]  # omegaconf appends its internals
            raise ConfigError(f"{name}: invalid config key {key!r}: {msg}") from e
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"incomplete config: {e}") from e
    except ValueError as e:  # a nested schema's own __post_init__ check (e.g. RandomizationConfig)
        raise ConfigError(str(e)) from e
    check_values(cfg, machine=False)  # the machine (e.g. is there a GPU) is checked where the run starts
    return cfg


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ---------------------------------------------------------------------------------------------- values
@dataclass(frozen=True)
class Rule:
    """``ok(value)`` says whether a value is allowed; ``allowed`` says which ones are, for the message."""

    ok: Callable[[Any], bool]
    allowed: str
    machine: bool = False  # depends on this machine (a device), not only on the value: checked at run start


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def gt(x) -> Rule:
    return Rule(lambda v: _num(v) and v > x, f"> {x}")


def ge(x) -> Rule:
    return Rule(lambda v: _num(v) and v >= x, f">= {x}")


def between(lo, hi, hi_open: bool = False) -> Rule:
    return Rule(lambda v: _num(v) and lo <= v and (v < hi if hi_open else v <= hi),
                f"in [{lo}, {hi}{')' if hi_open else ']'}")


def one_of(*choices) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def sizes() -> Rule:
    """A non-empty list of layer widths."""
    return Rule(lambda v: len(v) > 0 and all(_num(x) and x > 0 and int(x) == x for x in v),
                "a non-empty list of integers > 0")


def _device_ok(v) -> bool:
    import torch

    try:
        d = torch.device(v)
    except (RuntimeError, TypeError):
        return False
    if d.type == "cuda":
        return torch.cuda.is_available() and (d.index is None or d.index < torch.cuda.device_count())
    return d.type in ("cpu", "mps") and (d.type != "mps" or torch.backends.mps.is_available())


def device() -> Rule:
    return Rule(_device_ok, "'cpu', or 'cuda' / 'cuda:N' on a machine where torch sees that GPU", machine=True)


# cls -> ({field: Rule}, [check(cfg) -> (field, message) or None]) ; filled by register_rules
_RULES: dict[type, tuple[dict[str, Rule], list[Callable]]] = {}


def register_rules(cls: type, checks: tuple[Callable, ...] = (), **rules: Rule) -> None:
    """Declare the allowed values of dataclass ``cls``'s fields (``**rules``) and checks that relate several
    fields (``checks``: ``check(cfg) -> None or (field, "message")``). Applied wherever ``cls`` appears."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = (set(rules) - names)
    if unknown:
        raise TypeError(f"register_rules({cls.__name__}): no such fields {sorted(unknown)}")
    field_rules, cross = _RULES.setdefault(cls, ({}, []))
    field_rules.update(rules)
    cross.extend(checks)


def check_value(key: str, value, rule: Rule) -> None:
    """Raise :class:`ConfigError` naming ``key`` and the allowed values unless ``rule`` accepts ``value``."""
    try:
        ok = rule.ok(value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: must be {rule.allowed}")


def check_values(cfg, prefix: str = "", machine: bool = True) -> None:
    """Check every field of the dataclass tree ``cfg`` against the registered rules; the first bad value
    raises :class:`ConfigError` naming its full key (e.g. ``runner.iterations``) and the allowed range.
    ``machine=False`` skips the rules that depend on this machine (a preset for a GPU box loads anywhere)."""
    from . import config_rules  # noqa: F401  (registers the library's rules on first use)

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_values(value, f"{prefix}{f.name}.", machine)
    field_rules, cross = _RULES.get(type(cfg), ({}, []))
    for name, rule in field_rules.items():
        value = getattr(cfg, name)
        if value is not None and (machine or not rule.machine):
            check_value(prefix + name, value, rule)
    for check in cross:
        problem = check(cfg)
        if problem is not None:
            key, msg = problem
            raise ConfigError(f"{prefix}{key}: {msg}")
