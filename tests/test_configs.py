"""Every preset under configs/ loads against its schema, so a renamed field cannot leave a stale preset."""

from pathlib import Path

import pytest

from vla_rl.cli import load_train_config
from vla_rl.config import ConfigError, load_config
from vla_rl.demo import DemoConfig
from vla_rl.envs import EnvConfig
from vla_rl.pretrain import PretrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEMAS = {"env": EnvConfig, "randomization": EnvConfig, "pretrain": PretrainConfig, "demo": DemoConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_preset_loads(path):
    kind = path.parent.name
    if kind == "train":
        cfg = load_train_config([path], [])
        assert cfg.algo in ("dppo", "rwr", "dsrl")
    else:
        load_config(SCHEMAS[kind], [path])


def test_rwr_asks_for_the_demos_it_mixes_in():
    with pytest.raises(ConfigError, match="rwr.demo_path: rwr.demo_coef=1.0 mixes demonstrations"):
        load_train_config([CONFIGS / "train" / "place_rwr.yaml"], ["rwr.demo_coef=1.0"])
    cfg = load_train_config([CONFIGS / "train" / "place_rwr.yaml"], [])
    assert cfg.rwr.demo_coef == 0 and cfg.rwr.target == "transition"
    assert cfg.policy_overrides["noise"]["std_floor"] == 0.22  # DPPO's sampling: the transition carries noise


def test_demo_preset_is_the_default_demo():
    """`vla-rl demo` and `vla-rl demo --config configs/demo/place.yaml` run the same job."""
    assert load_config(DemoConfig, [CONFIGS / "demo" / "place.yaml"]) == DemoConfig()


def test_toy_preset_overrides_the_base_env_workers():
    """toy_dppo.yaml inherits place_dppo.yaml's 2 env worker processes and sets 1, the only value the pure-torch
    toy takes; any other is a ConfigError naming the key."""
    from vla_rl.config import ConfigError
    from vla_rl.runner import _default_env_factory

    cfg = load_train_config([CONFIGS / "train" / "toy_dppo.yaml"], [])
    assert cfg.env == {"task": "toy", "workers": 1}
    assert _default_env_factory(cfg.env, 4, "cpu").num_envs == 4
    with pytest.raises(ConfigError, match="env.workers"):
        load_train_config([CONFIGS / "train" / "toy_dppo.yaml"], ["env.workers=2"])


def test_gaussian_control_preset_differs_from_the_demo_only_in_the_action_head_and_its_lr():
    """The control's figures compare against the demo's only while everything else (demos, encoders, head network,
    runner, PPO settings, budget) stays the demo's; its output directory is its own."""
    from dataclasses import asdict

    from vla_rl.resume import _flatten

    demo = _flatten(asdict(DemoConfig()))
    control = _flatten(asdict(load_config(DemoConfig, [CONFIGS / "demo" / "place_gaussian_control.yaml"])))
    differences = [k for k in demo if demo[k] != control[k]]

    assert sorted(differences) == ["dppo.actor_lr", "out", "policy.noise.kind",
                                   "policy.noise.sample_steps", "std_floor"]
