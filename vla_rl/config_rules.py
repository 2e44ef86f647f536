"""The allowed values of the library's config schemas, in one table (applied by ``vla_rl.config.check_values``).

Each schema's rules sit here rather than in ``__post_init__`` methods so that every entry point (YAML +
``vla-rl``, ``Runner(cfg)``, ``pretrain(cfg)``) checks the same things before any work starts, and the
message names the full key (``runner.iterations``, ``dppo.num_minibatches``).
"""

from __future__ import annotations

import re

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vla_rl.algos import DPPOConfig, DSRLConfig, RWRConfig
from vla_rl.config import ConfigError, Rule, between, check_values, device, ge, gt, one_of, register_rules, sizes
from vla_rl.envs import EnvConfig, EnvError, GymConfig, env_spec_kind
from vla_rl.policy.config import DIT_SIZES, HEAD_DTYPES, DiTConfig, MLPHeadConfig, NoiseActorConfig, NoiseConfig, PolicyConfig
from vla_rl.pretrain import PretrainConfig
from vla_rl.runner import RunnerConfig, TrainConfig

lr, prob, pos = ge(0), between(0, 1), gt(0)

register_rules(RunnerConfig, iterations=pos, num_envs=pos, steps_per_iter=pos, eval_every=ge(0), eval_episodes=pos,
               checkpoint_every=ge(0), group_size=ge(0), device=device(), max_unstable_iters=ge(0),
               checks=(lambda c: ("group_size", f"must divide runner.num_envs={c.num_envs}, got {c.group_size}")
                       if c.group_size > 0 and c.num_envs % c.group_size else None,))

register_rules(DPPOConfig, gamma=prob, gae_lambda=prob, gamma_denoising=prob, clip_ploss_coef=pos,
               clip_ploss_coef_base=pos, clip_ploss_coef_rate=ge(0), logprob=one_of("joint", "mean_executed"),
               clip_vloss_coef=ge(0), vf_coef=ge(0), ent_coef=ge(0), update_epochs=pos, num_minibatches=pos,
               actor_lr=lr, critic_lr=lr, max_grad_norm=pos, target_kl=ge(0), kl_revert=ge(0), reward_scale_const=pos,
               n_critic_warmup_itr=ge(0), bc_coef=ge(0), advantage=one_of("gae", "group"))
register_rules(RWRConfig, beta=ge(0), max_weight=pos, gamma=prob, min_episodes=pos, update_epochs=pos, num_minibatches=pos, lr=lr,
               max_grad_norm=pos, demo_coef=ge(0), weights=one_of("return", "advantage"),
               target=one_of("action", "transition"), critic_lr=lr, critic_warmup=ge(0))
register_rules(DSRLConfig, bound=pos, actor_hidden=sizes(), critic_hidden=sizes(), n_critics=ge(1), gamma=prob,
               tau=between(0, 1), actor_lr=lr, critic_lr=lr, alpha_lr=lr, init_alpha=pos, batch_size=pos, utd=pos,
               buffer_size=pos, learning_starts=ge(0))


def _exec_within_horizon(c: PolicyConfig):
    if c.exec_steps > c.horizon:
        return "exec_steps", f"must be in [1, horizon={c.horizon}], got {c.exec_steps}"
    return None


def _stochastic_within_k(c: NoiseConfig):
    if c.stochastic_steps > c.sample_steps:
        return "stochastic_steps", f"must be in [0, sample_steps={c.sample_steps}], got {c.stochastic_steps}"
    return None


def _heads_divide(c: DiTConfig):
    if c.d_model % c.n_heads:
        return "d_model", f"must be a multiple of n_heads={c.n_heads}, got {c.d_model}"
    return None


register_rules(PolicyConfig, action_dim=pos, state_dim=pos, privileged_dim=ge(0), horizon=pos, exec_steps=pos,
               image_size=sizes(), image_channels=sizes(), image_tokens=pos, language_encoder=one_of("auto", "minilm", "hash"),
               language_dim=pos, language_buckets=pos, fusion_layers=ge(0), head=one_of("dit", "mlp"), critic_hidden=sizes(),
               head_dtype=one_of(*HEAD_DTYPES),
               checks=(_exec_within_horizon,))
register_rules(NoiseConfig, kind=one_of("ddim", "flow", "gaussian"), prediction=one_of("epsilon", "sample"), train_steps=pos, sample_steps=pos, eta=ge(0), std_floor=ge(0),
               stochastic_steps=ge(0), clip_sample=ge(0), init_scale=ge(0), checks=(_stochastic_within_k,))
register_rules(DiTConfig, d_model=pos, n_layers=pos, n_heads=pos, mlp_ratio=pos, dropout=between(0, 1, hi_open=True),
               checks=(_heads_divide,))
register_rules(MLPHeadConfig, hidden=pos, n_layers=pos, time_dim=pos)
register_rules(NoiseActorConfig, bound=pos, hidden=sizes())

register_rules(PretrainConfig, steps=pos, batch_size=pos, lr=pos, weight_decay=ge(0), warmup_steps=ge(0),
               lr_schedule=one_of("constant", "cosine"), ema_decay=prob, grad_clip=pos, device=device(),
               log_every=pos, save_every=pos, size=one_of("", *DIT_SIZES))

def _env_spec(c: EnvConfig):
    try:
        env_spec_kind(c.task)
    except EnvError as e:
        return "task", str(e)
    if not str(c.task).startswith("gym:") and c.gym != GymConfig():
        return "gym", f"the Gymnasium adapter's options apply only to task: gym:<id>, not {c.task!r}"
    return None


def _instruction_ok(v) -> bool:
    return isinstance(v, str) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) for x in v))


def _hold_ok(v) -> bool:
    return all(x in ("zero", "last") or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in v)


register_rules(EnvConfig, num_envs=pos, device=device(), image_size=sizes(), max_episode_steps=pos, workers=ge(1),
               checks=(_env_spec,))
register_rules(GymConfig, control_hz=pos,
               instruction=Rule(_instruction_ok, "a string, or a non-empty list of strings (one per env)"),
               instruction_fn=Rule(lambda v: v == "" or re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", v) is not None,
                                   "'' or a 'module:function' import path"),
               action_hold=Rule(_hold_ok, "a list of 'zero' | 'last' | numbers (one, or one per action dim)"))

# Keys of the train config's free-form `env:` section that the runner sets itself.
_RUNNER_OWNED = {"num_envs": "runner.num_envs", "device": "runner.device"}
_TOY_KEYS = {"task", "max_episode_steps", "seed"}


def typed_env_config(env: dict, prefix: str = "env.") -> EnvConfig:
    """The train config's ``env:`` dict as a typed, checked :class:`EnvConfig` (values, not only keys:
    ``max_episode_steps=abc`` fails here rather than mid-run)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EnvConfig), OmegaConf.create(dict(env)))
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        raise ConfigError(f"{prefix}{key}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from e
    except ValueError as e:  # RandomizationConfig's own range check
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from e
    check_values(typed, prefix)
    return typed


def _train_env(c: TrainConfig):
    env = dict(c.env)
    for key, owner in _RUNNER_OWNED.items():
        if key in env:
            return f"env.{key}", f"set {owner} instead (the runner passes it to the env)"
    if env.get("task", "toy") == "toy":
        # workers: 1 is the no-op a toy preset sets to override a base preset's env worker processes
        extra = sorted(k for k in set(env) - _TOY_KEYS if not (k == "workers" and env[k] == 1))
        if extra:
            return f"env.{extra[0]}", f"the toy task takes only {sorted(_TOY_KEYS)}"
        typed_env_config({k: v for k, v in env.items() if k != "task"})  # the runner's own toy env
        return None
    typed_env_config(env)
    return None


def _rwr_demos(c: TrainConfig):
    if c.algo == "rwr" and c.rwr.demo_coef > 0 and not c.rwr.demo_path:
        return "rwr.demo_path", (f"rwr.demo_coef={c.rwr.demo_coef} mixes demonstrations into every update: give their "
                                 "directory or .hdf5 file (the demos BC read), or set rwr.demo_coef=0")
    return None


register_rules(TrainConfig, algo=one_of("dppo", "rwr", "dsrl"), checks=(_train_env, _rwr_demos))
