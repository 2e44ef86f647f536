"""Task environments: the batched env interface, backends, built-in tasks, experts, randomization."""

from __future__ import annotations

import os

# Offscreen rendering needs the GL backend chosen before mujoco is first imported; EGL works headless.
if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "egl"

from .base import BatchedEnv, EnvError, EnvSpec
from .mujoco_install import warn_if_broken as _warn_if_broken

_warn_if_broken()  # mujoco 4's split distributions half-replaced by a pinned 3.x: print the fix
from .config import EnvConfig, GymConfig
from .registry import ENTRY_POINT_GROUP, env_spec_kind, register, registered, unregister
from .randomization import RandomizationConfig
from .tasks import TASKS, get_task

BACKENDS = ("cpu", "warp")


def make_env(
    task: str,
    num_envs: int,
    backend: str = "cpu",
    device="cpu",
    cameras=(),
    image_size=(128, 128),
    randomization=None,
    seed=None,
    max_episode_steps=None,
    arm: bool = False,
    workers: int = 1,
    gym=None,
    **task_kwargs,
) -> BatchedEnv:
    """Build ``num_envs`` copies of a built-in task on a backend: ``"cpu"`` (MuJoCo) or ``"warp"``
    (mujoco-warp; ``device="cuda:0"`` on a GPU, ``"cpu"`` runs warp's CPU device, for tests).

    ``task`` is an env spec (see :mod:`vla_rl.envs.registry`): a built-in or registered name, ``gym:<id>``
    (``gym``: the adapter's options, a :class:`GymConfig` or dict; ``task_kwargs`` go to ``gymnasium.make``)
    or ``module:factory``. Anything but a built-in name is built by its factory.

    ``arm=True`` adds a 6-joint arm behind each gripper; ``task_kwargs`` go to the backend
    (e.g. ``state_includes_objects``). ``workers > 1`` (CPU backend) splits the envs into that many
    shards stepped in parallel worker processes (:class:`~vla_rl.envs.subproc.SubprocEnv`; a script
    that builds one needs the usual ``if __name__ == "__main__":`` guard of spawned processes).
    """
    if env_spec_kind(task) != "builtin":  # validates the spec here, not in a worker
        from .registry import make_custom

        return make_custom(task, num_envs, backend=backend, gym=gym, arm=arm, device=device, cameras=cameras,
                           image_size=image_size, randomization=randomization, seed=seed,
                           max_episode_steps=max_episode_steps, workers=workers, **task_kwargs)
    if isinstance(gym, dict):
        gym = GymConfig.from_dict(gym)
    if gym is not None and gym != GymConfig():
        raise EnvError(f"the env config's gym: section is for gym:<id> envs, not the built-in task {task!r}")
    task_obj = get_task(task, arm=arm)
    if workers > 1:
        if backend != "cpu":
            raise EnvError(f"workers={workers} is for the 'cpu' backend; {backend!r} vectorizes on its device")
        from .subproc import SubprocEnv

        return SubprocEnv(task, num_envs, workers, device=device, seed=seed, cameras=tuple(cameras),
                          image_size=tuple(image_size), randomization=randomization,
                          max_episode_steps=max_episode_steps, arm=arm, **task_kwargs)
    if workers < 1:
        raise EnvError(f"workers must be >= 1, got {workers}")
    if backend == "cpu":
        from .mujoco_cpu import MujocoCPUEnv

        return MujocoCPUEnv(task_obj, num_envs, device=device, cameras=tuple(cameras), image_size=tuple(image_size),
                            randomization=randomization, seed=seed, max_episode_steps=max_episode_steps, **task_kwargs)
    if backend == "warp":
        try:
            from .mujoco_warp import TaskWarpEnv
        except ImportError as e:
            raise EnvError(f"backend 'warp' needs mujoco-warp and warp-lang: pip install 'vla-rl[warp]' ({e})") from e

        return TaskWarpEnv(task_obj, num_envs, device=device, cameras=tuple(cameras), image_size=tuple(image_size),
                           randomization=randomization, seed=seed, max_episode_steps=max_episode_steps, **task_kwargs)
    raise EnvError(f"unknown backend {backend!r}; valid backends: {list(BACKENDS)}")


def make_env_from_config(cfg) -> BatchedEnv:
    if not isinstance(cfg, EnvConfig):
        cfg = EnvConfig.from_dict(dict(cfg))
    return make_env(cfg.task, cfg.num_envs, backend=cfg.backend, device=cfg.device, cameras=tuple(cfg.cameras),
                    image_size=tuple(cfg.image_size), randomization=cfg.randomization, seed=cfg.seed,
                    max_episode_steps=cfg.max_episode_steps, workers=cfg.workers, gym=cfg.gym,
                    **dict(cfg.task_kwargs))


__all__ = ["BatchedEnv", "EnvError", "EnvSpec", "EnvConfig", "GymConfig", "RandomizationConfig", "TASKS", "make_env",
           "make_env_from_config", "register", "unregister", "registered", "env_spec_kind", "ENTRY_POINT_GROUP",
           "GymnasiumBatchedEnv", "make_gym_env"]

from .gym_adapter import GymnasiumBatchedEnv, make_gym_env  # noqa: E402
from .gym_adapter import register_gym_envs as _register_gym_envs  # noqa: E402

_register_gym_envs()
