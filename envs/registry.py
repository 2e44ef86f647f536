"""Env specs: the one resolver behind every place a task is named (``vla-rl collect/train/eval/demo``,
the train config's ``env:`` section, ``make_env``).

An env spec is one of three forms:

1. a **name**: a built-in task (``lift``, ``place``, ``handover``) or a name a plug-in registered, with
   :func:`register` or through the ``vla_rl.envs`` entry-point group of an installed package::

       [project.entry-points."vla_rl.envs"]
       my_task = "my_pkg.envs:make_my_task"

2. ``gym:<id>``: a registered Gymnasium id, wrapped by :class:`~vla_rl.envs.gym_adapter.GymnasiumBatchedEnv`
   (``task_kwargs`` go to ``gymnasium.make``, the adapter's options come from the env config's ``gym:``
   section); an id of the form ``gym:my_pkg.module:MyEnv-v0`` imports ``my_pkg.module`` first, as
   ``gymnasium.make`` does;
3. ``module:factory``: an import path to a function returning a ``BatchedEnv``.

A factory (registered or ``module:factory``) is called as ``factory(num_envs=N, **options)``: ``task_kwargs``
always, and ``device``, ``seed``, ``max_episode_steps``, ``cameras``, ``image_size``, ``randomization``,
``workers`` when they were set and the factory takes them (a set option the factory does not take is an
error naming it). With ``workers > 1`` and a factory that does not take ``workers``, the envs are split
into worker processes (:class:`~vla_rl.envs.subproc.SubprocEnv`), each building its shard from the spec.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Callable

from .base import EnvError

ENTRY_POINT_GROUP = "vla_rl.envs"
GYM_PREFIX = "gym:"

_REGISTRY: dict[str, Callable] = {}
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

FORMS = ("an env is given as one of: (1) a task name; valid tasks: built-in {builtin}, registered {registered} "
         "(vla_rl.envs.register(name, factory) or the 'vla_rl.envs' entry-point group); "
         "(2) gym:<id>, a registered Gymnasium id, e.g. gym:CartPole-v1 (keyword arguments from the env "
         "config's task_kwargs); (3) module:factory, an import path to a function returning a BatchedEnv, "
         "e.g. my_pkg.envs:make_env")


def _builtin() -> list[str]:
    from .tasks import TASKS

    return sorted(TASKS)


def register(name: str, factory: Callable | str, overwrite: bool = False) -> None:
    """Make ``name`` an env spec: ``factory(num_envs=N, **options) -> BatchedEnv`` (a callable, or a
    ``"module:factory"`` import path). Built-in names cannot be replaced; a registered one only with
    ``overwrite=True``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise EnvError(f"register: the name must be a non-empty string without ':', got {name!r}")
    if name in _builtin():
        raise EnvError(f"register: {name!r} is a built-in task and cannot be replaced")
    if isinstance(factory, str):
        if not _IMPORT_PATH.match(factory):
            raise EnvError(f"register({name!r}): {factory!r} is not a 'module:factory' import path")
    elif not callable(factory):
        raise EnvError(f"register({name!r}): factory must be callable or a 'module:factory' string, got {factory!r}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise EnvError(f"register: {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def registered() -> list[str]:
    """Names registered by :func:`register` and by installed packages' entry points."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _load(path: str, what: str):
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise EnvError(f"{what}: cannot import module {module!r} ({e})") from e
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise EnvError(f"{what}: module {module!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise EnvError(f"{what}: {path} is not callable")
    return obj


def env_spec_kind(spec) -> str:
    """``"builtin"``, ``"registered"``, ``"gym"`` or ``"import"``; an :class:`EnvError` listing the three
    forms when ``spec`` is none of them (checked without importing anything)."""
    if not isinstance(spec, str) or not spec:
        raise EnvError(f"env spec must be a non-empty string, got {spec!r}; " + _forms())
    if spec in _builtin():
        return "builtin"
    if spec.startswith(GYM_PREFIX):
        if not spec[len(GYM_PREFIX):].strip():
            raise EnvError(f"env spec {spec!r} names no Gymnasium id; " + _forms())
        return "gym"
    if ":" in spec:
        if not _IMPORT_PATH.match(spec):
            raise EnvError(f"env spec {spec!r} is not a valid 'module:factory' import path; " + _forms())
        return "import"
    if spec in _REGISTRY or spec in _entry_points():
        return "registered"
    raise EnvError(f"unknown env {spec!r}; " + _forms())


def _forms() -> str:
    return FORMS.format(builtin=_builtin(), registered=registered())


def resolve(spec: str) -> Callable:
    """The factory behind a registered name or a ``module:factory`` path."""
    kind = env_spec_kind(spec)
    if kind == "import":
        return _load(spec, f"env {spec!r}")
    if kind == "registered":
        factory = _REGISTRY.get(spec)
        if factory is None:
            ep = _entry_points()[spec]
            try:
                factory = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plug-in is named, not a traceback
                raise EnvError(f"env {spec!r}: entry point {ep.value!r} of group {ENTRY_POINT_GROUP!r} "
                               f"failed to load: {e}") from e
        return _load(factory, f"env {spec!r}") if isinstance(factory, str) else factory
    raise EnvError(f"env {spec!r} is a {kind} env, not a factory")


# Options of make_env passed to a factory only when set (not their defaults), and only if it takes them.
_DEFAULTS = {"device": "cpu", "seed": None, "max_episode_steps": None, "cameras": (), "image_size": (128, 128),
             "randomization": None, "workers": 1}


def _is_set(key, value) -> bool:
    default = _DEFAULTS[key]
    if isinstance(default, tuple):
        return tuple(value or ()) != default
    return value != default and not (key == "device" and str(value) == "cpu")


def make_custom(spec: str, num_envs: int, backend: str = "cpu", gym=None, arm: bool = False, **options):
    """Build a non-built-in env spec (registered name, ``gym:<id>``, ``module:factory``); ``options`` are
    make_env's (``device``, ``seed``, ...) plus the factory's own ``task_kwargs``."""
    kind = env_spec_kind(spec)
    if backend != "cpu":
        raise EnvError(f"backend={backend!r} is for the built-in tasks; env {spec!r} builds its own simulator")
    if arm:
        raise EnvError(f"arm=True is for the built-in tasks, not env {spec!r}")
    named = {k: options.pop(k) for k in list(options) if k in _DEFAULTS}
    task_kwargs = options
    if kind == "gym":
        from .gym_adapter import make_gym_env

        for key in ("cameras", "image_size", "randomization"):
            if key in named and _is_set(key, named[key]):
                raise EnvError(f"{key}={named[key]!r} is not supported for Gymnasium env {spec!r} (the wrapped env "
                               "renders and randomizes itself; map its image observation with gym.obs_map)")
        adapter = _gym_options(gym)
        env = make_gym_env(spec[len(GYM_PREFIX):], num_envs, env_kwargs=task_kwargs,
                           device=named.get("device", "cpu"), seed=named.get("seed"),
                           max_episode_steps=named.get("max_episode_steps"), workers=named.get("workers", 1),
                           **adapter)
        return _tag(env, spec)
    if gym is not None and _gym_options(gym):
        raise EnvError(f"the env config's gym: section is for gym:<id> envs, not {spec!r}")
    factory = resolve(spec)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = dict(task_kwargs)
    workers = int(named.get("workers", 1) or 1)
    for key, value in named.items():
        if not _is_set(key, value):
            continue
        if key == "workers" and "workers" not in params:
            continue  # sharded below (only a factory that names `workers` shards itself)
        if key in params or takes_any:
            kwargs[key] = value
        else:
            raise EnvError(f"env {spec!r}: {key}={value!r} was set, but its factory "
                           f"{getattr(factory, '__qualname__', factory)}{inspect.signature(factory) if params else ''} "
                           f"does not take {key!r}")
    if workers > 1 and "workers" not in kwargs:
        from .subproc import SubprocEnv

        shard = {k: v for k, v in kwargs.items() if k not in ("device", "seed")}
        return SubprocEnv(spec, num_envs, workers, device=named.get("device", "cpu"), seed=named.get("seed"),
                          **shard)
    try:
        env = factory(num_envs=num_envs, **kwargs)
    except TypeError as e:
        raise EnvError(f"env {spec!r}: calling its factory with num_envs={num_envs}, {kwargs} failed: {e}") from e
    for attr in ("reset", "step", "num_envs", "spec"):
        if not hasattr(env, attr):
            raise EnvError(f"env {spec!r}: its factory returned {type(env).__name__}, not a BatchedEnv "
                           f"(no {attr!r}); a factory must return a vla_rl.envs.BatchedEnv")
    if env.num_envs != num_envs:
        raise EnvError(f"env {spec!r}: asked for num_envs={num_envs}, its factory built {env.num_envs}")
    return _tag(env, spec)


def _gym_options(gym) -> dict:
    """The env config's ``gym:`` section (a GymConfig or a dict) as adapter keyword arguments; only the
    values that differ from the defaults."""
    if gym is None:
        return {}
    import dataclasses

    from .config import GymConfig

    if isinstance(gym, dict):
        gym = GymConfig.from_dict(gym)
    default = GymConfig()
    out = {}
    for f in dataclasses.fields(GymConfig):
        value = getattr(gym, f.name)
        if value != getattr(default, f.name):
            out[f.name] = value
    if "instruction_fn" in out:
        out["instruction"] = _load(out.pop("instruction_fn"), "gym.instruction_fn")
    return out


def _tag(env, spec: str):
    extra = getattr(env.spec, "extra", None)
    if isinstance(extra, dict):
        extra.setdefault("task", spec)
    return env
