"""The whole command-line story on a real task, small: collect -> pretrain -> train -> eval -> export ->
eval through the exported bundle. Numbers are not the point here (see benchmarks/); wiring is."""

import json

import pytest

from vla_rl.cli import main

TINY = ["policy.language_encoder=hash", "policy.dit.d_model=32", "policy.dit.n_heads=4", "policy.dit.n_layers=1",
        "policy.horizon=4", "policy.exec_steps=2", "policy.noise.sample_steps=4", "policy.critic_hidden=[32]"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["collect", "--task", "place", "--episodes", "4", "--num-envs", "4", "--out", str(root / "demos")]) == 0
    assert main(["pretrain", "--data", str(root / "demos"), "--out", str(root / "pre"), "steps=5", "batch_size=16",
                 "progress=false", *TINY]) == 0
    return root


def test_train_eval_export_and_bundle_eval(pretrained, tmp_path, capsys):
    root = pretrained
    (tmp_path / "train.yaml").write_text(
        f"policy_path: {root / 'pre'}\nenv: {{task: place}}\nalgo: dppo\n"
        f"runner: {{iterations: 1, num_envs: 4, steps_per_iter: 2, eval_every: 0, log_dir: {tmp_path / 'run'}, progress: false}}\n")
    assert main(["train", str(tmp_path / "train.yaml"), "dppo.update_epochs=1"]) == 0
    policy_dir = tmp_path / "run" / "checkpoint" / "policy"
    assert (policy_dir / "model.safetensors").is_file()

    assert main(["eval", "--policy", str(policy_dir), "--task", "place", "--episodes", "4", "--num-envs", "4",
                 "--json", str(tmp_path / "eval.json"), "max_episode_steps=6"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_episodes"] == 4 and 0.0 <= result["success_rate"] <= 1.0

    assert main(["export", str(policy_dir), "--out", str(tmp_path / "bundle")]) == 0
    assert main(["eval", "--bundle", str(tmp_path / "bundle"), "--task", "place", "--episodes", "4", "--num-envs", "4",
                 "--json", str(tmp_path / "bundle_eval.json"), "max_episode_steps=6"]) == 0
    bundle_result = json.loads((tmp_path / "bundle_eval.json").read_text())
    assert bundle_result["num_episodes"] == 4 and "holds" in bundle_result
    assert "success rate" in capsys.readouterr().out


def test_cli_errors_name_the_problem(pretrained, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(f"policy_path: {pretrained / 'pre'}\nenv: {{task: place, colour: red}}\n")
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    assert "colour" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "bad.yaml"), "runner.iterationz=3"]) == 2
    assert "iterationz" in capsys.readouterr().err
    assert main(["eval", "--policy", str(tmp_path / "missing"), "--task", "place"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "--policy", str(pretrained / "pre"), "--task", "nosuchtask"]) == 2
    assert "nosuchtask" in capsys.readouterr().err


def test_demo_runs_end_to_end_small(tmp_path, capsys):
    """The README's main job (`vla-rl demo`), shrunk: every stage runs and the summary is written."""
    out = tmp_path / "demo"
    small = ["demos=4", "pretrain_steps=3", "runner.iterations=1", "runner.num_envs=4", "runner.steps_per_iter=2",
             "runner.progress=false", "eval_episodes=4", "eval_envs=4", f"out={out}",
             *(t for t in TINY if not t.startswith("policy.noise.sample_steps")), "policy.noise.sample_steps=6",
             "stochastic_steps=2"]
    assert main(["demo", *small]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["num_episodes"] == 4 and summary["after"]["num_episodes"] == 4
    # the deterministic chain's success, and the RL sampler's on the same episodes
    assert summary["before"]["sampled"]["num_episodes"] == 4 and summary["after"]["sampled"]["num_episodes"] == 4
    assert "before RL" in capsys.readouterr().out
