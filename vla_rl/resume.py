"""Deciding whether a run resumes, before any work: training progress is never silently thrown away.

``<log_dir>/checkpoint`` present means "this run has progress": it is resumed if it is whole and was written
by the same run (same ``policy_path``, ``algo``, sampler overrides and networks), and otherwise the run
stops with a message naming the directory and what to do; it is never overwritten by a run that started
from iteration 0 (``runner.resume=false``, a fresh start on purpose, renames it to ``checkpoint.before-<time>``). ``policy_overrides`` may change how the chain is sampled, never what the weights mean.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from vla_rl.checkpoint import CHECKSUMS_FILE, CheckpointError, read_json, recover_dir, verify_checksums
from vla_rl.config import ConfigError

STATE_FILE = "state.json"
STATE_KEYS = {"iteration": int, "env_steps": int, "optimizers": dict, "algo": dict, "torch_rng": list,
              "gen_rng": list, "config": dict}
# Config keys a resumed run must share with the one that wrote the checkpoint: they decide which weights,
# optimizer tensors and algorithm state the checkpoint holds (a mismatch would crash or silently mix runs).
SAME_RUN_KEYS = ("policy_path", "algo", "policy_overrides", "env.task")
NETWORK_KEYS = {
    "dppo": ("dppo.critic_clock", "dppo.freeze_early_steps", "dppo.train_encoders"),
    # advantage weights: a critic reading the clock, and its optimizer; transition targets: a frozen early head
    "rwr": ("rwr.weights", "rwr.target"),
    "dsrl": ("dsrl.actor_hidden", "dsrl.critic_hidden", "dsrl.n_critics", "dsrl.bound", "dsrl.critic_clock",
             "dsrl.critic_privileged"),
}
# Policy config keys that only change how the trained chain is sampled or executed.
SAMPLING_KEYS = frozenset({"exec_steps", "noise.sample_steps", "noise.eta", "noise.std_floor",
                           "noise.stochastic_steps", "noise.clip_sample", "noise.init_scale"})


def _fresh_hint(ckpt_dir: Path) -> str:
    return (f"to start a fresh run on purpose, set runner.log_dir to a new directory, or runner.resume=false "
            f"(which keeps {ckpt_dir} as {ckpt_dir.name}.before-<time>)")


def open_checkpoint(path: Path) -> dict:
    """Repair an interrupted save, verify every file against ``checksums.json`` and return ``state.json``,
    checked key by key; any problem is a :class:`CheckpointError` naming the file."""
    path = recover_dir(path)
    if (path / CHECKSUMS_FILE).is_file():
        verify_checksums(path)
    state = read_json(path / STATE_FILE)
    for key, kind in STATE_KEYS.items():
        if key not in state:
            raise CheckpointError(f"{path / STATE_FILE} is missing the key {key!r}")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise CheckpointError(f"{path / STATE_FILE}: {key!r} must be a {kind.__name__}, got {state[key]!r}")
    return state


def resume_state(ckpt_dir: Path, cfg) -> dict | None:
    """``None`` when the run starts fresh (no checkpoint directory); the checkpoint's verified state when it
    resumes. Raises when a checkpoint exists that this run must not resume or overwrite."""
    ckpt_dir = recover_dir(Path(ckpt_dir))
    if not ckpt_dir.exists():
        return None
    if not cfg.runner.resume:  # a fresh start on purpose: the old checkpoint is kept, under another name
        kept = _keep_aside(ckpt_dir)
        print(f"runner.resume=false: starting from iteration 0; the previous checkpoint is kept as {kept}",
              file=sys.stderr)
        return None
    if not (ckpt_dir / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} exists but {STATE_FILE} is missing, so its progress "
                              f"cannot be resumed (it was left untouched); {_fresh_hint(ckpt_dir)}")
    try:
        state = open_checkpoint(ckpt_dir)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the checkpoint was left untouched; {_fresh_hint(ckpt_dir)})") from e
    diffs = config_differences(state["config"], cfg)
    if diffs:
        raise CheckpointError(
            f"cannot resume {ckpt_dir}: this run's config differs from the one that wrote it:\n  "
            + "\n  ".join(diffs)
            + f"\nresume with the checkpoint's values, or {_fresh_hint(ckpt_dir)} "
              f"(policy_path={ckpt_dir / 'policy'} starts a new run from its policy)")
    return state


def _keep_aside(ckpt_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept, n = ckpt_dir.with_name(f"{ckpt_dir.name}.before-{stamp}"), 1
    while kept.exists():
        kept, n = ckpt_dir.with_name(f"{ckpt_dir.name}.before-{stamp}-{n}"), n + 1
    os.replace(ckpt_dir, kept)
    return kept


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


_MISSING = object()


def _same(key: str, saved, now) -> bool:
    if key == "policy_path" and saved and now:  # the same directory spelled differently is the same run
        return Path(saved).expanduser().resolve() == Path(now).expanduser().resolve()
    return saved == now


def config_differences(saved: dict, cfg) -> list[str]:
    """``"key: checkpoint X, now Y"`` for every run-defining key that differs (keys the checkpoint predates
    are not compared)."""
    from vla_rl.runner import _jsonable

    now = _jsonable(asdict(cfg))
    keys = SAME_RUN_KEYS + NETWORK_KEYS.get(cfg.algo, ())
    out = []
    for key in keys:
        old, new = _get(saved, key), _get(now, key)
        if key == "env.task":  # the runner's default env is the toy task
            old, new = (v if v is not _MISSING else "toy" for v in (old, new))
        if old is _MISSING or _same(key, old, new):
            continue
        out.append(f"{key}: checkpoint {old!r}, now {new!r}")
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_policy_overrides(policy_path: str, overrides: dict) -> None:
    """Refuse ``policy_overrides`` that change what the trained weights mean (noise kind, prediction target,
    schedule, network sizes): only the sampling keys may differ from the policy's saved config."""
    from vla_rl.policy.config import PolicyConfig
    from vla_rl.policy.vla import CONFIG_FILE

    if not overrides:
        return
    schema = _flatten(OmegaConf.to_container(OmegaConf.structured(PolicyConfig)))
    saved_file = Path(policy_path) / CONFIG_FILE
    saved = None
    if saved_file.is_file():  # a missing one is reported by VLAPolicy.from_pretrained, naming the file
        try:
            merged = OmegaConf.merge(OmegaConf.structured(PolicyConfig), OmegaConf.load(saved_file))
        except Exception as e:  # omegaconf raises several types; all mean a bad config file
            raise CheckpointError(f"{saved_file}: {e}") from e
        saved = _flatten(OmegaConf.to_container(merged))
    bad = []
    for key, value in _flatten(dict(overrides)).items():
        if key not in schema:
            bad.append(f"policy_overrides.{key}: not a policy config key")
        elif saved is not None and key not in SAMPLING_KEYS and saved.get(key) != value:
            bad.append(f"policy_overrides.{key}={value!r}: the policy was trained with {saved.get(key)!r}")
    if bad:
        raise ConfigError("; ".join(bad) + f" (policy_overrides may change only how the trained chain is sampled: "
                          f"{', '.join(sorted(SAMPLING_KEYS))})")
