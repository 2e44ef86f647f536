"""Issue 14, training side: progress is never silently lost (crash-safe checkpoint swap, checksums, resume
refusals), every config value is checked before work starts, and failures are reported, not hidden."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vla_rl.algos import DPPOConfig, RWRConfig
from vla_rl.checkpoint import CheckpointError, recover_dir, verify_checksums, write_dir_atomically
from vla_rl.cli import main
from vla_rl.config import ConfigError
from vla_rl.envs.toy import ToyGoalEnv
from vla_rl.evaluate import evaluate
from vla_rl.faults import STEPS
from vla_rl.policy import VLAPolicy
from vla_rl.runner import Runner, RunnerConfig, TrainConfig, train
from vla_rl.train_monitor import EpisodeOutcomes, TrainingDiverged

from toy_utils import toy_policy_cfg

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _cfg(log_dir, iters=2, algo="dppo", **runner):
    rc = dict(iterations=iters, num_envs=8, steps_per_iter=2, eval_every=0, checkpoint_every=1,
              log_dir=str(log_dir), progress=False)
    rc.update(runner)
    return TrainConfig(algo=algo, dppo=DPPOConfig(update_epochs=1, num_minibatches=2), rwr=RWRConfig(update_epochs=1),
                       runner=RunnerConfig(**rc))


def _policy():
    torch.manual_seed(0)
    return VLAPolicy(toy_policy_cfg(stochastic_steps=3))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 2-iteration toy run; tests copy it before breaking it."""
    run = tmp_path_factory.mktemp("run") / "run"
    train(_cfg(run), policy=_policy(), env=ToyGoalEnv(8))
    return run


def _copy(run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- the checkpoint swap


def _write_v1(tmp):
    (tmp / "sub").mkdir()
    (tmp / "sub" / "w.bin").write_bytes(b"v1" * 1000)
    (tmp / "state.json").write_text('{"v": 1}')


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_any_step_of_the_swap_leaves_a_whole_checkpoint(tmp_path, step):
    path = tmp_path / "checkpoint"
    write_dir_atomically(path, _write_v1, checksums=True)
    proc = subprocess.run([sys.executable, "-m", "vla_rl.faults", str(path), step], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 9, proc.stderr
    recover_dir(path)  # what the next load or save does first
    verify_checksums(path)  # whole: every file there and intact
    version = json.loads((path / "state.json").read_text())["v"]
    assert version == (2 if step in ("after_swap", "during_cleanup") else 1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no orphaned aside copy or temp dir left
    write_dir_atomically(path, _write_v1, checksums=True)  # and the next save works
    verify_checksums(path)


def test_an_orphaned_aside_copy_is_resumed_not_restarted(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    os.replace(run / "checkpoint", run / ".checkpoint.old-999999999")  # a crash between the two renames
    r = Runner(_cfg(run, iters=3), policy=_policy(), env=ToyGoalEnv(8))
    assert r.iteration == 2 and (run / "checkpoint" / "state.json").is_file()


# ------------------------------------------------------------------------------- refusing to resume
def test_missing_state_json_stops_and_overwrites_nothing(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path)
    (run / "checkpoint" / "state.json").unlink()
    before = _snapshot(run)
    with pytest.raises(CheckpointError, match=r"checkpoint.*state\.json is missing.*runner\.log_dir"):
        Runner(_cfg(run, iters=3), policy=_policy(), env=ToyGoalEnv(8))
    assert _snapshot(run) == before
    # the same through the CLI, from a policy directory: non-zero exit, the message names the directory
    _policy().save_pretrained(tmp_path / "pre")
    (tmp_path / "t.yaml").write_text(f"policy_path: {tmp_path / 'pre'}\nenv: {{task: toy}}\n"
                                     f"runner: {{iterations: 3, num_envs: 8, log_dir: {run}, progress: false}}\n")
    assert main(["train", str(tmp_path / "t.yaml")]) == 2
    assert str(run / "checkpoint") in capsys.readouterr().err
    assert _snapshot(run) == before


def test_resume_false_starts_fresh_and_keeps_the_old_checkpoint(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    before = _snapshot(run / "checkpoint")
    r = Runner(_cfg(run, iters=3, resume=False), policy=_policy(), env=ToyGoalEnv(8))
    assert r.iteration == 0 and not (run / "checkpoint").exists()
    kept = [p for p in run.iterdir() if p.name.startswith("checkpoint.before-")]
    assert len(kept) == 1 and _snapshot(kept[0]) == before


@pytest.mark.parametrize("change, expect", [
    (lambda c: setattr(c, "algo", "rwr"), "algo: checkpoint 'dppo', now 'rwr'"),
    (lambda c: setattr(c, "policy_path", "runs/other"), "policy_path: checkpoint '', now 'runs/other'"),
    (lambda c: setattr(c.dppo, "critic_clock", False), "dppo.critic_clock: checkpoint True, now False"),
    (lambda c: c.policy_overrides.update(noise={"std_floor": 0.3}), "policy_overrides"),
])
def test_resume_with_another_run_config_is_refused_listing_the_differences(trained_run, tmp_path, change, expect):
    run = _copy(trained_run, tmp_path)
    cfg = _cfg(run, iters=3)
    change(cfg)
    with pytest.raises(CheckpointError, match="differs from the one that wrote it") as e:
        Runner(cfg, policy=_policy(), env=ToyGoalEnv(8))
    assert expect in str(e.value)


def _flip_byte(f: Path):
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


def _drop_state_key(ckpt: Path, rehash: bool):
    state = json.loads((ckpt / "state.json").read_text())
    del state["optimizers"]
    (ckpt / "state.json").write_text(json.dumps(state))
    if rehash:  # as if edited by hand or written before checksums existed
        from vla_rl.checkpoint import write_checksums
        write_checksums(ckpt)


CORRUPTIONS = {
    "flipped byte in model.safetensors": (lambda c: _flip_byte(c / "policy" / "model.safetensors"), "model.safetensors"),
    "garbage normalization.json": (lambda c: (c / "policy" / "normalization.json").write_text("{garbage"),
                                   "normalization.json"),
    "missing normalization.json": (lambda c: (c / "policy" / "normalization.json").unlink(), "normalization.json"),
    "truncated optim.safetensors": (lambda c: (c / "optim.safetensors").write_bytes(
        (c / "optim.safetensors").read_bytes()[:100]), "optim.safetensors"),
    "state.json missing a key": (lambda c: _drop_state_key(c, rehash=False), "state.json"),
    "state.json missing a key, checksums rewritten": (lambda c: _drop_state_key(c, rehash=True),
                                                      "state.json is missing the key 'optimizers'"),
    "truncated optim.safetensors, no checksums": (lambda c: ((c / "checksums.json").unlink(), (c / "optim.safetensors")
                                                             .write_bytes(b"\x08")), "optim.safetensors"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_a_checkpoint_error_naming_the_file(trained_run, tmp_path, name):
    run = _copy(trained_run, tmp_path)
    corrupt, expect = CORRUPTIONS[name]
    corrupt(run / "checkpoint")
    with pytest.raises(CheckpointError) as e:
        Runner(_cfg(run, iters=3), policy=_policy(), env=ToyGoalEnv(8))
    assert expect in str(e.value)


def test_checkpoints_carry_checksums(trained_run):
    sums = json.loads((trained_run / "checkpoint" / "checksums.json").read_text())["sha256"]
    assert {"state.json", "optim.safetensors", "policy/model.safetensors", "policy/normalization.json"} <= set(sums)


# ------------------------------------------------------------------------------- config values
@pytest.fixture(scope="module")
def toy_policy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre") / "pre"
    _policy().save_pretrained(d)
    return d


TRAIN_BAD = {
    "runner.iterations=0": ("runner.iterations", "> 0"),
    "runner.iterations=-5": ("runner.iterations", "> 0"),
    "runner.steps_per_iter=0": ("runner.steps_per_iter", "> 0"),
    "dppo.num_minibatches=0": ("dppo.num_minibatches", "> 0"),
    "rwr.num_minibatches=0": ("rwr.num_minibatches", "> 0"),
    "rwr.weights=advantages": ("rwr.weights", "'advantage'"),
    "dsrl.n_critics=0": ("dsrl.n_critics", ">= 1"),
    "dsrl.batch_size=-1": ("dsrl.batch_size", "> 0"),
    "dsrl.tau=2.0": ("dsrl.tau", "in [0, 1]"),
    "dppo.gamma=1.5": ("dppo.gamma", "in [0, 1]"),
    "env.max_episode_steps=abc": ("env.max_episode_steps", "abc"),
    "env.max_episode_steps=0": ("env.max_episode_steps", "> 0"),
    "env.randomization.dynamics.mass=[-1.0,1.0]": ("dynamics.mass", "0 <= low"),
    "env.randomization.dynamics.damping=[-0.5,1.0]": ("dynamics.damping", "0 <= low"),
    "env.randomization.dynamics.friction=[-1.0,-0.5]": ("dynamics.friction", "0 <= low"),
    "env.randomization.dynamics.action_delay=[-2,0]": ("dynamics.action_delay", "0 <= low"),
    "env.randomization.dynamics.action_noise=-0.1": ("dynamics.action_noise", ">= 0"),
    "env.randomization.dynamics.obs_noise=-1": ("dynamics.obs_noise", ">= 0"),
    "env.num_envs=4": ("env.num_envs", "runner.num_envs"),
    "algo=ppo": ("algo", "'dppo'"),
    "policy_overrides.noise.kind=flow": ("policy_overrides.noise.kind", "trained with 'ddim'"),
    "policy_overrides.horizon=8": ("policy_overrides.horizon", "trained with 4"),
    "runner.max_unstable_iters=-1": ("runner.max_unstable_iters", ">= 0"),
}
if not torch.cuda.is_available():
    TRAIN_BAD["runner.device=cuda"] = ("runner.device", "cuda")


@pytest.mark.parametrize("override", list(TRAIN_BAD))
def test_bad_train_values_stop_at_start_up_naming_the_key(toy_policy_dir, tmp_path, capsys, override):
    key, allowed = TRAIN_BAD[override]
    task = "place" if override.startswith("env.") else "toy"  # the place env is never built: it fails first
    (tmp_path / "t.yaml").write_text(f"policy_path: {toy_policy_dir}\nenv: {{task: {task}}}\n"
                                     f"runner: {{iterations: 2, num_envs: 8, log_dir: {tmp_path / 'run'}, progress: false}}\n")
    assert main(["train", str(tmp_path / "t.yaml"), override]) == 2
    err = capsys.readouterr().err
    assert key in err and allowed in err, err
    assert not (tmp_path / "run").exists()


def test_bad_values_of_other_commands_stop_and_write_nothing(tmp_path, capsys):
    cases = [
        (["pretrain", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "pre"), "steps=0"], "steps", "> 0"),
        (["pretrain", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "pre"), "batch_size=0"], "batch_size", "> 0"),
        (["collect", "--task", "place", "--episodes", "0", "--out", str(tmp_path / "demos")], "--episodes", "> 0"),
        (["collect", "--task", "place", "--episodes", "-3", "--out", str(tmp_path / "demos")], "--episodes", "> 0"),
        (["collect", "--task", "place", "--noise", "-0.1", "--out", str(tmp_path / "demos")], "--noise", ">= 0"),
        (["eval", "--policy", str(tmp_path / "p"), "--task", "place", "--episodes", "0"], "--episodes", "> 0"),
        (["eval", "--policy", str(tmp_path / "p"), "--task", "place", "max_episode_steps=abc"], "max_episode_steps", "abc"),
    ]
    if not torch.cuda.is_available():
        cases.append((["pretrain", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "pre"), "device=cuda"],
                      "device", "cuda"))
    for argv, key, allowed in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert key in err and allowed in err, (argv, err)
    assert list(tmp_path.iterdir()) == []


def test_the_api_checks_values_too(tmp_path):
    cfg = _cfg(tmp_path / "run")
    cfg.runner.steps_per_iter = 0
    with pytest.raises(ConfigError, match=r"runner\.steps_per_iter=0 .*> 0"):
        Runner(cfg, policy=_policy(), env=ToyGoalEnv(8))
    assert not (tmp_path / "run").exists()


def test_sampling_overrides_of_a_trained_policy_are_allowed(toy_policy_dir, tmp_path):
    cfg = _cfg(tmp_path / "run", iters=1)
    cfg.policy_path = str(toy_policy_dir)
    cfg.env = {"task": "toy"}
    cfg.policy_overrides = {"noise": {"stochastic_steps": 2, "std_floor": 0.2, "kind": "ddim"}}
    r = Runner(cfg)
    assert r.policy.cfg.noise.std_floor == 0.2


# ------------------------------------------------------------------------------- failures reported
class _SplitEnv(ToyGoalEnv):
    """Envs [0, n_fast) succeed at their first control step; the others never succeed (time limit 8)."""

    def __init__(self, num_envs, n_fast=4, n_unstable=0):
        super().__init__(num_envs, max_episode_steps=8)
        self.n_fast, self.n_unstable = n_fast, n_unstable

    def _success(self):
        return torch.arange(self.num_envs) < self.n_fast

    def _unstable(self):
        return torch.arange(self.num_envs) >= self.num_envs - self.n_unstable


def _scalars(run, tag):
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_train_success_rate_is_not_biased_toward_short_episodes(tmp_path):
    # Half the envs succeed at once, half time out after 2 decisions: the true success rate is 0.5, while the
    # episodes that end in the first 1-decision rollout are all successes.
    run = tmp_path / "run"
    train(_cfg(run, iters=4, steps_per_iter=1), policy=_policy(), env=_SplitEnv(8))
    assert _scalars(run, "train/success_rate_ended")[0] == 1.0
    unbiased = _scalars(run, "train/success_rate")
    assert unbiased and all(abs(v - 0.5) < 1e-6 for v in unbiased), unbiased


def test_episode_outcomes_drop_iterations_cut_short_by_a_reset():
    o = EpisodeOutcomes(2)
    o.begin(0, torch.tensor([True, True]))
    o.record(torch.tensor([True, False]), torch.tensor([True, False]))
    o.abandon()  # env 1's counted episode never ends
    o.begin(1, torch.tensor([True, True]))
    o.record(torch.tensor([True, True]), torch.tensor([False, True]))
    o.begin(2, torch.tensor([True, True]))
    assert o.completed() == [(1, 0.5, 2)]


def test_unstable_envs_are_logged_and_a_majority_stops_training(tmp_path):
    run = tmp_path / "few"
    train(_cfg(run, iters=3), policy=_policy(), env=_SplitEnv(8, n_fast=0, n_unstable=2))
    assert _scalars(run, "train/unstable_envs") == [2.0, 2.0, 2.0]
    run = tmp_path / "most"
    with pytest.raises(TrainingDiverged, match=r"more than half of the 8 envs diverged.*last 3 iterations"):
        train(_cfg(run, iters=10), policy=_policy(), env=_SplitEnv(8, n_fast=0, n_unstable=5))
    assert _scalars(run, "train/unstable_envs") == [5.0, 5.0, 5.0]
    assert json.loads((run / "checkpoint" / "state.json").read_text())["iteration"] == 2  # kept, not overwritten


def test_per_factor_table_leaves_out_empty_slices():
    class OneStart(ToyGoalEnv):  # every env starts at the same x: the quantile bins collapse
        def _episode_info(self):
            return {"randomization": {"start_x": torch.zeros(self.num_envs)}}

    ev = evaluate(_policy(), OneStart(4), 8, seed=0, bins=3)
    rows = ev["by_factor"]["start_x"]
    assert rows and all(r["n"] > 0 for r in rows) and sum(r["n"] for r in rows) == 8
    with pytest.raises(ValueError, match="num_episodes"):
        evaluate(_policy(), ToyGoalEnv(4), 0)


def test_eval_of_a_bundle_that_holds_every_step_reports_it_and_fails(tmp_path, capsys):
    from vla_rl.export import export_bundle

    # a bundle for 3 state dims evaluated on `lift` (13): every observation is refused, every step held
    cfg = toy_policy_cfg(stochastic_steps=3)
    cfg.action_dim = 4  # lift's action space, so only the observations differ
    export_bundle(VLAPolicy(cfg), tmp_path / "bundle", env="lift")
    rc = main(["eval", "--bundle", str(tmp_path / "bundle"), "--task", "lift", "--episodes", "2", "--num-envs", "2",
               "--json", str(tmp_path / "ev.json"), "max_episode_steps=3"])
    out = capsys.readouterr()
    assert rc == 3 and "held every control step" in out.err
    result = json.loads((tmp_path / "ev.json").read_text())
    assert result["holds"] == result["control_steps"] > 0 and result["hold_reasons"]
    assert f"safety holds: {result['holds']} of {result['control_steps']}" in out.out
