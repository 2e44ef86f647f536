"""Issue 15: any task environment through the whole workflow. Env specs (built-in / registered name,
gym:<id>, module:factory) everywhere a task is named, plug-in registry and entry points, demos from any expert,
and the checked Gymnasium adapter. Real Gymnasium envs (tests/plugin_envs.py), real CLI."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import plugin_envs  # noqa: F401  (registers PluginTest/Line-v0)
from vla_rl.cli import load_train_config, main
from vla_rl.collect import collect_demos, per_env_expert
from vla_rl.config import ConfigError, load_config
from vla_rl.data import load_episodes
from vla_rl.envs import EnvConfig, EnvError, GymnasiumBatchedEnv, make_env, make_env_from_config, register, registered
from vla_rl.envs import unregister

LINE = "gym:PluginTest/Line-v0"
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- the resolver
def test_three_forms_build_envs_and_unknown_lists_them():
    for spec in (LINE, "plugin_envs:make_line"):
        env = make_env(spec, 3, seed=0)
        assert env.num_envs == 3 and env.spec.action_dim == 1 and env.spec.extra["task"] == spec
        env.reset(seed=0)
        obs, _, _, _, info = env.step(torch.ones(3, 1))
        assert obs["state"].shape == (3, 2) and "success" in info
        env.close()
    assert make_env("plugin_envs:make_line", 2, speed=0.25).envs[0].speed == 0.25  # task_kwargs reach the factory
    for bad in ("nosuchtask", "plugin_envs:nosuch", "no_such_module:make", "gym:NoSuch-v9"):
        with pytest.raises(EnvError) as e:
            make_env(bad, 2)
        msg = str(e.value)
        assert bad.split(":")[-1] in msg or "NoSuch" in msg
    msg = str(pytest.raises(EnvError, make_env, "nosuchtask", 2).value)
    assert "gym:<id>" in msg and "module:factory" in msg and "place" in msg
    with pytest.raises(EnvError, match="not a BatchedEnv"):
        make_env("plugin_envs:make_not_an_env", 2)
    with pytest.raises(EnvError, match="cameras"):  # a set option the factory does not take is named
        make_env("plugin_envs:make_line", 2, cameras=("front",))


def test_train_config_env_section_takes_specs(tmp_path):
    good = load_train_config([], ["env.task=gym:PluginTest/Line-v0", "env.gym.success_key=success"])
    assert good.env["task"] == LINE
    with pytest.raises(ConfigError, match="env.task.*module:factory"):
        load_train_config([], ["env.task=nosuchtask"])
    with pytest.raises(ConfigError, match="env.gym.control_hz"):
        load_train_config([], [f"env.task={LINE}", "env.gym.control_hz=0"])
    with pytest.raises(ConfigError, match="env.gym"):  # adapter options on a built-in task
        load_train_config([], ["env.task=place", "env.gym.success_key=success"])
    # the runner's default env factory builds it
    from vla_rl.runner import _default_env_factory

    env = _default_env_factory({"task": LINE, "gym": {"instruction": "go right", "control_hz": 20.0}}, 2, "cpu")
    assert env.spec.control_hz == 20.0 and env.reset()["instruction"] == ["go right"] * 2


def test_register_and_entry_point(tmp_path, monkeypatch):
    register("line_task", plugin_envs.make_line)
    try:
        assert "line_task" in registered()
        assert make_env("line_task", 2).num_envs == 2
        with pytest.raises(EnvError, match="already registered"):
            register("line_task", "plugin_envs:make_not_an_env")
        with pytest.raises(EnvError, match="built-in"):
            register("place", plugin_envs.make_line)
    finally:
        unregister("line_task")
    # an installed package's entry point in group vla_rl.envs: a real dist-info on sys.path
    pkg = tmp_path / "vla_plug_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from plugin_envs import make_line\n\ndef make(num_envs, seed=None):\n"
                                     "    return make_line(num_envs, seed=seed, speed=0.75)\n")
    info = tmp_path / "vla_plug_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vla-plug-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vla_rl.envs]\nplug_line = vla_plug_pkg:make\n")
    assert "plug_line" not in registered()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plug_line" in registered()
    env = make_env("plug_line", 2, seed=0)
    assert env.envs[0].speed == 0.75
    # ... and the CLI knows it by name
    out = tmp_path / "demos"
    assert main(["collect", "--task", "plug_line", "--expert", "plugin_envs:push_right", "--episodes", "2",
                 "--num-envs", "2", "--out", str(out)]) == 0
    assert len(load_episodes(out)) == 2


# ------------------------------------------------------------------------------------------- the adapter
def test_success_key_detected_or_wrong_key_raises():
    env = make_env(LINE, 2, seed=0)  # no success_key: finds info["success"]
    env.reset(seed=0)
    _, reward, term, _, info = env.step(torch.ones(2, 3, 1))
    assert info["success"].all() and term.all() and reward.tolist() == [1.0, 1.0]
    wrong = make_env(LINE, 2, seed=0, gym={"success_key": "is_success"})
    wrong.reset(seed=0)
    with pytest.raises(EnvError, match=r"success_key='is_success'.*info keys seen: \['success'\]"):
        for _ in range(10):
            wrong.step(torch.ones(2, 1))
    # a config with the wrong key fails the same way through the CLI, naming the key
    env_cfg = load_config(EnvConfig, [], [f"task={LINE}", "num_envs=2", "gym.success_key=done"])
    with pytest.raises(EnvError, match="gym.success_key"):
        env = make_env_from_config(env_cfg)
        env.reset()
        for _ in range(10):
            env.step(torch.zeros(2, 1))


def test_own_time_limit_is_truncation_not_failure():
    env = make_env(LINE, 2, seed=0)
    assert env.spec.max_episode_steps == 5  # the registered TimeLimit
    env.reset(seed=0)
    _, _, term, trunc, info = env.step(torch.zeros(2, 5, 1))
    assert trunc.all() and not term.any() and not info["success"].any()
    assert info["episode_length"].tolist() == [5, 5]
    # a longer limit of ours: the env's own TimeLimit (5) still ends it, as a truncation
    env = make_env(LINE, 2, seed=0, max_episode_steps=50)
    env.reset(seed=0)
    _, _, term, trunc, _ = env.step(torch.zeros(2, 6, 1))
    assert trunc.all() and not term.any()


def test_per_env_instructions_list_and_reset_info():
    env = make_env(LINE, 3, gym={"instruction": ["a", "b", "c"]})
    assert env.reset()["instruction"] == ["a", "b", "c"] and env.spec.instructions == ("a", "b", "c")
    with pytest.raises(EnvError, match="one per env"):
        make_env(LINE, 2, gym={"instruction": ["a", "b", "c"]})
    env = make_env(LINE, 8, seed=1, gym={"instruction_fn": "plugin_envs:instruction_of"})
    obs = env.reset(seed=1)
    expected = [f"go {e.word}" for e in (s.unwrapped for s in env.envs)]
    assert obs["instruction"] == expected and set(expected) == {"go left", "go right"}
    # after an auto-reset the new episode's instruction is read again
    obs, *_ = env.step(torch.zeros(8, 5, 1))
    assert obs["instruction"] == [f"go {e.word}" for e in (s.unwrapped for s in env.envs)]
    # they reach the policy's input: the demos record them per episode
    from vla_rl.policy import PolicyConfig, VLAPolicy

    policy = VLAPolicy(PolicyConfig(action_dim=1, state_dim=2, horizon=2, exec_steps=2, language_encoder="hash",
                                    head="mlp"))
    seen = []
    policy.language.register_forward_pre_hook(lambda _m, args: seen.extend(args[0]))
    policy.sample(obs)
    assert seen == obs["instruction"]


def test_control_hz_hold_and_export_spec():
    env_cfg = load_config(EnvConfig, [], [f"task={LINE}", "num_envs=2", "gym.control_hz=25",
                                          "gym.action_hold=[zero]"])
    spec = make_env_from_config(env_cfg).spec
    assert spec.control_hz == 25.0 and spec.action_hold == ("zero",)


@pytest.mark.timeout(120)
def test_workers_and_reset_group():
    # the id is registered in this process only (by importing plugin_envs): the workers get its EnvSpec
    env = make_env(LINE, 4, seed=0, workers=2, gym={"instruction": ["a", "b", "c", "d"]})
    try:
        assert env.reset(seed=0)["instruction"] == ["a", "b", "c", "d"]
        obs = env.reset_group(2, seed=3)
        s = obs["state"]
        assert torch.equal(s[0], s[1]) and torch.equal(s[2], s[3]) and not torch.equal(s[0], s[2])
        obs, _, term, trunc, info = env.step(torch.ones(4, 3, 1))
        assert term.all() and info["success"].all()
    finally:
        env.close()
    single = make_env(LINE, 4, seed=0)
    s = single.reset_group(2, seed=3)["state"]
    assert torch.equal(s[0], s[1]) and not torch.equal(s[0], s[2])
    unseeded = GymnasiumBatchedEnv(plugin_envs.Unseeded, 4, seed=0)
    with pytest.raises(EnvError, match="not seedable"):
        unseeded.reset_group(2, seed=0)


# ------------------------------------------------------------------------------------------- demos
def test_collect_with_custom_expert_dart_labels(tmp_path):
    expert = plugin_envs.push_right(None)
    clean = collect_demos(LINE, 6, tmp_path / "clean", num_envs=3, noise=0.5, seed=0,
                          expert="plugin_envs:push_right", label="expert")
    eps = load_episodes(tmp_path / "clean")
    assert clean["written"] == 6 and len(eps) == 6
    for ep in eps:  # the label is the expert's clean action at the recorded state
        want = expert({"state": torch.from_numpy(ep["state"])}).numpy()
        np.testing.assert_allclose(ep["action"], want, atol=1e-6)
    collect_demos(LINE, 6, tmp_path / "noisy", num_envs=3, noise=0.5, seed=0, expert="plugin_envs:push_right",
                  label="executed")
    ep = load_episodes(tmp_path / "noisy")[0]
    assert not np.allclose(ep["action"], expert({"state": torch.from_numpy(ep["state"])}).numpy())
    # a single-env policy through per_env_expert, given as a callable
    out = collect_demos(LINE, 2, tmp_path / "single", num_envs=2, expert=per_env_expert(lambda s: [1.0]))
    assert out["success_rate"] == 1.0
    with pytest.raises(EnvError, match="no built-in expert"):
        collect_demos(LINE, 2, tmp_path / "none", num_envs=2)


def test_demo_on_a_custom_env(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", f"task={LINE}", "expert=plugin_envs:push_right", "demos=4", "pretrain_steps=3",
                 "runner.iterations=1", "runner.num_envs=4", "runner.steps_per_iter=2", "runner.progress=false",
                 "eval_episodes=4", "eval_envs=4", f"out={out}", "policy.mlp_head.hidden=32",
                 "policy.critic_hidden=[32]", "policy.noise.sample_steps=4", "stochastic_steps=2",
                 "policy.fusion_layers=0", "policy.dit.d_model=32", "policy.dit.n_heads=4", "policy.dit.n_layers=1",
                 "dppo.update_epochs=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["num_episodes"] == 4


# ------------------------------------------------------------------------------------------- the worked example
@pytest.mark.timeout(180)
def test_worked_example_full_cli_workflow(tmp_path):
    """examples/plug_in_gym_env.py (the README's worked example) at tiny scale: collect with a custom expert ->
    pretrain -> train -> eval -> export -> eval --bundle, the env given only as gym:<id>, the expert as
    module:factory."""
    spec = importlib.util.spec_from_file_location("plug_in_gym_env", ROOT / "examples" / "plug_in_gym_env.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plug_in_gym_env"] = module
    try:
        spec.loader.exec_module(module)
        results = module.main(str(tmp_path), tiny=True)
    finally:
        sys.modules.pop("plug_in_gym_env", None)
    assert {k: r["num_episodes"] for k, r in results.items()} == {"pretrained": 8, "dppo": 8, "bundle": 8}
    assert results["bundle"]["holds"] == 0
    demos = load_episodes(tmp_path / "demos")
    assert {ep["instruction"] for ep in demos} == {"reach the left target", "reach the right target"}
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert "zero" in json.dumps(manifest)  # the hold and the control rate come from the run's gym: config
    assert manifest["chunking"]["control_hz"] == 20.0


@pytest.mark.timeout(120)
def test_module_factory_sharded_into_workers():
    """A module:factory without a `workers` argument: workers=2 builds each shard from the spec in its process."""
    env = make_env("plugin_envs:make_line", 4, seed=0, workers=2, speed=1.0)
    try:
        assert type(env).__name__ == "SubprocEnv" and env.reset(seed=0)["state"].shape == (4, 2)
        _, _, term, _, info = env.step(torch.ones(4, 2, 1))
        assert term.all() and info["success"].all()  # speed=1.0 reached the shards: two steps past x = 1
    finally:
        env.close()
