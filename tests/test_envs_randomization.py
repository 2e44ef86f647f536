"""Domain randomization: validation, ranges, held-out disjointness, effect on pixels and physics."""

import numpy as np
import pytest
import torch

from vla_rl.envs import EnvError, make_env
from vla_rl.envs.randomization import DynamicsConfig, RandomizationConfig, hue_is_heldout, sample
from vla_rl.envs.tasks.scene import NUM_TABLE_TEXTURES


def test_validation_errors_name_the_field():
    with pytest.raises(EnvError, match="dynamics.friction"):
        RandomizationConfig(dynamics=DynamicsConfig(friction=(1.2, 0.8)))
    with pytest.raises(EnvError, match="randomization.dynamics.frction"):
        RandomizationConfig.from_dict({"dynamics": {"frction": [0.5, 1.0]}})
    with pytest.raises(EnvError, match="randomization.lightning"):
        RandomizationConfig.from_dict({"lightning": {}})
    with pytest.raises(EnvError, match="split"):
        RandomizationConfig(split="test")
    with pytest.raises(EnvError, match="lighting.intensity"):
        make_env("lift", 1, randomization={"lighting": {"intensity": [1.0, 0.2]}})


def test_heldout_values_never_drawn_in_training():
    gen = torch.Generator().manual_seed(0)
    train = sample(RandomizationConfig(split="train"), gen, 5000, NUM_TABLE_TEXTURES)
    held = sample(RandomizationConfig(split="heldout"), gen, 5000, NUM_TABLE_TEXTURES)
    for key in ("light_hue", "floor_hue"):
        assert not hue_is_heldout(train[key]).any() and hue_is_heldout(held[key]).all()
        assert train[key].min() < 0.1 and train[key].max() > 0.9  # both splits span the colour wheel
    assert set(train["table_texture"].tolist()).isdisjoint(held["table_texture"].tolist())
    assert train["object_brightness"].max() <= held["object_brightness"].min()


def test_physics_parameters_within_ranges_and_reported():
    cfg = {"dynamics": {"friction": [0.5, 0.7], "mass": [2.0, 3.0], "actuator_gain": [0.8, 0.9],
                        "damping": [1.5, 2.0], "action_delay": [0, 2]}}
    env = make_env("lift", 8, randomization=cfg, seed=0)
    env.reset()
    _, _, _, _, info = env.step(torch.zeros(8, 4))
    r = info["randomization"]
    b = env.base_model
    for key, (lo, hi) in [("friction", (0.5, 0.7)), ("mass", (2.0, 3.0)), ("actuator_gain", (0.8, 0.9))]:
        assert r[key].shape == (8,) and (r[key] >= lo).all() and (r[key] <= hi).all()
    assert r["light_rgb"].shape == (8, 3) and set(r["action_delay"].tolist()) <= {0, 1, 2}
    for i, m in enumerate(env.models):
        g = env.obj_geom[0]
        assert np.isclose(m.geom_friction[g, 0], b.geom_friction[g, 0] * float(r["friction"][i]))
        assert np.isclose(m.body_mass[env.obj_body[0]], b.body_mass[env.obj_body[0]] * float(r["mass"][i]))
        assert np.isclose(m.actuator_gainprm[0, 0], b.actuator_gainprm[0, 0] * float(r["actuator_gain"][i]))
    assert len({float(m.geom_friction[env.obj_geom[0], 0]) for m in env.models}) == 8  # per env


def test_action_delay_delays_motion():
    env = make_env("lift", 1, randomization={"dynamics": {"action_delay": [2, 2]}}, seed=0)
    env.reset()
    z0 = env.datas[0].mocap_pos[0, 2]
    env.step(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    env.step(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert env.datas[0].mocap_pos[0, 2] == z0  # two steps of delay: nothing executed yet
    env.step(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert env.datas[0].mocap_pos[0, 2] > z0


def test_randomization_changes_pixels():
    kw = dict(cameras=("front",), image_size=(48, 48))
    plain = make_env("lift", 4, seed=0, **kw).reset(seed=0)["rgb"].float()
    env = make_env("lift", 4, seed=0, randomization={}, **kw)
    rand = env.reset(seed=0)["rgb"].float()
    assert (plain[0] - plain[1]).abs().mean() < (rand[0] - rand[1]).abs().mean()  # envs differ from each other
    assert (plain - rand).abs().mean() > 5.0
    table_only = make_env("lift", 2, seed=0, randomization={"visual": {"floor_color": False}}, **kw)
    again = table_only.reset(seed=1)["rgb"]
    assert (again[0].float() - again[1].float()).abs().mean() > 1.0
    env.close()
