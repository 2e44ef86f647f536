"""Every preset under configs/ loads against its schema, so a renamed field cannot leave a stale preset."""

from pathlib import Path

import pytest

from vla_rl.cli import load_train_config
from vla_rl.config import load_config
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


def test_demo_preset_is_the_default_demo():
    """`vla-rl demo` and `vla-rl demo --config configs/demo/place.yaml` run the same job."""
    assert load_config(DemoConfig, [CONFIGS / "demo" / "place.yaml"]) == DemoConfig()
