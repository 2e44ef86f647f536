"""Reliability of the training side (issue 14): bad inputs and faults tried against checkpoints/resume,
config values and failure reporting, each outcome classified.

    .venv/bin/python benchmarks/reliability_training.py [--out results.json]

Outcomes: ``clear error`` (non-zero exit / named exception, the message names the key or file, nothing
written), ``accepted correctly`` (a valid input or a recoverable fault: the run does the right thing),
``traceback`` (an unexpected exception escaped), ``unclear error`` (refused, but the message does not name
the key or file), ``silent wrong result`` (exit 0 / a wrong number where an error or another number was
due, or output written for a refused input), ``data lost`` (a checkpoint changed or progress restarted).
Prints a markdown table by area and the totals (the table in BENCHMARKS.md). Toy task and tiny networks:
about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from vla_rl.algos import DPPOConfig
from vla_rl.checkpoint import CheckpointError, write_checksums
from vla_rl.cli import main
from vla_rl.envs.toy import ToyGoalEnv
from vla_rl.evaluate import evaluate
from vla_rl.policy import VLAPolicy
from vla_rl.policy.config import DiTConfig, NoiseConfig, PolicyConfig
from vla_rl.runner import RunnerConfig, TrainConfig, train
from vla_rl.train_monitor import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["clear error", "accepted correctly", "traceback", "unclear error", "silent wrong result", "data lost"]
RESULTS: list[dict] = []


def tiny_policy(action_dim=2) -> VLAPolicy:
    torch.manual_seed(0)
    return VLAPolicy(PolicyConfig(action_dim=action_dim, state_dim=3, horizon=4, exec_steps=4, language_encoder="hash",
                                  language_dim=16, language_buckets=64, dit=DiTConfig(d_model=32, n_layers=1, n_heads=2),
                                  noise=NoiseConfig(kind="ddim", train_steps=50, sample_steps=5, stochastic_steps=3),
                                  critic_hidden=[64, 64], critic_privileged=False))


def cli(argv):
    """(exit status, stdout, stderr, escaped exception text or None) of ``vla-rl argv``."""
    out, err = io.StringIO(), io.StringIO()
    escaped = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 -- exactly what is being measured
            rc, escaped = 1, traceback.format_exc()
    return rc, out.getvalue(), err.getvalue(), escaped


def snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


def record(area: str, case: str, kind: str, detail: str = "") -> None:
    lines = [ln for ln in detail.strip().splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1]) if lines else ""
    RESULTS.append({"area": area, "case": case, "outcome": kind, "detail": last[:200]})
    print(f"  [{kind}] {area}: {case}", file=sys.__stderr__)


def refused(area, case, argv, names, nothing_at=(), keep=None):
    """A case that must stop with a named error, write nothing under ``nothing_at`` and leave ``keep`` as it was."""
    before = snapshot(keep) if keep else None
    rc, out, err, escaped = cli(argv)
    if keep and snapshot(keep) != before:
        return record(area, case, "data lost", f"{keep} changed")
    if escaped or "Traceback" in err:
        return record(area, case, "traceback", escaped or err)
    if rc == 0:
        return record(area, case, "silent wrong result", out)
    if any(Path(p).exists() for p in nothing_at):
        return record(area, case, "silent wrong result", f"refused but wrote {nothing_at}")
    if not all(n in err for n in names):
        return record(area, case, "unclear error", err)
    record(area, case, "clear error", err)


def api_refused(area, case, fn, exc_type, names):
    try:
        fn()
    except exc_type as e:
        msg = str(e)
        return record(area, case, "clear error" if all(n in msg for n in names) else "unclear error", msg)
    except Exception:  # noqa: BLE001
        return record(area, case, "traceback", traceback.format_exc())
    record(area, case, "silent wrong result", "no error")


# ----------------------------------------------------------------------------------- checkpoints / resume
def train_yaml(tmp: Path, policy_dir: Path, log_dir: Path, iters=3, extra="") -> Path:
    f = tmp / f"train-{len(list(tmp.glob('train-*.yaml')))}.yaml"
    f.write_text(f"policy_path: {policy_dir}\nenv: {{task: toy}}\n{extra}"
                 f"runner: {{iterations: {iters}, num_envs: 8, steps_per_iter: 2, eval_every: 0, checkpoint_every: 1, "
                 f"log_dir: {log_dir}, progress: false}}\ndppo: {{update_epochs: 1, num_minibatches: 2}}\n")
    return f


def state_iteration(run: Path, key="iteration"):
    try:
        return json.loads((run / "checkpoint" / "state.json").read_text())[key]
    except (OSError, ValueError, KeyError):
        return None


MARK = 10**6  # env_steps written into the checkpoint before a fault: a resumed run counts on from it


def mark(ckpt: Path):
    state = json.loads((ckpt / "state.json").read_text())
    state["env_steps"] = MARK
    (ckpt / "state.json").write_text(json.dumps(state))
    write_checksums(ckpt)




def flip(f: Path):
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


def drop_key(ckpt: Path, rehash: bool):
    state = json.loads((ckpt / "state.json").read_text())
    del state["gen_rng"]
    (ckpt / "state.json").write_text(json.dumps(state))
    if rehash:
        write_checksums(ckpt)


def checkpoint_cases(tmp: Path, policy_dir: Path, good_run: Path):
    area = "checkpoints / resume"

    def fresh(name):
        run = tmp / name
        shutil.copytree(good_run, run)
        return run

    # resumable faults: the run must continue from iteration 2, not restart
    steps = {"during_write": "while writing the new checkpoint", "before_aside": "before the old checkpoint goes aside",
             "after_aside": "between the two renames", "after_swap": "after the new one is in, before cleanup",
             "during_cleanup": "halfway through deleting the old copy"}
    for key, step in steps.items():
        run = fresh(f"crash-{len(RESULTS)}")
        mark(run / "checkpoint")
        proc = subprocess.run([sys.executable, "-m", "vla_rl.faults", str(run / "checkpoint"), key, "--copy-iteration", "3"],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 9, proc.stderr
        rc, out, err, escaped = cli(["train", train_yaml(tmp, policy_dir, run, iters=4)])
        it, steps = state_iteration(run), state_iteration(run, "env_steps")
        if escaped or "Traceback" in err:
            record(area, f"crash {step}, then train", "traceback", escaped or err)
        elif rc != 0:
            record(area, f"crash {step}, then train", "unclear error", err)
        elif it != 4 or not steps or steps < MARK:  # restarted from iteration 0
            record(area, f"crash {step}, then train", "data lost", f"iteration {it}, env_steps {steps}")
        else:
            leftovers = [p.name for p in run.iterdir() if p.name.startswith(".checkpoint")]
            record(area, f"crash {step}, then train", "silent wrong result" if leftovers else "accepted correctly",
                   str(leftovers))

    corruptions = {
        "state.json deleted": (lambda c: (c / "state.json").unlink(), ["state.json", "runner.log_dir"]),
        "state.json unreadable (garbage)": (lambda c: (c / "state.json").write_text("{nope"), ["state.json"]),
        "state.json missing a key": (lambda c: drop_key(c, rehash=False), ["state.json"]),
        "state.json missing a key (checksums rewritten)": (lambda c: drop_key(c, rehash=True), ["state.json", "gen_rng"]),
        "flipped byte in policy/model.safetensors": (lambda c: flip(c / "policy" / "model.safetensors"), ["model.safetensors"]),
        "garbage policy/normalization.json": (lambda c: (c / "policy" / "normalization.json").write_text("xx"),
                                              ["normalization.json"]),
        "missing policy/normalization.json": (lambda c: (c / "policy" / "normalization.json").unlink(), ["normalization.json"]),
        "truncated optim.safetensors": (lambda c: (c / "optim.safetensors").write_bytes((c / "optim.safetensors")
                                                                                        .read_bytes()[:64]), ["optim.safetensors"]),
        "truncated optim.safetensors, checksums.json deleted": (
            lambda c: ((c / "checksums.json").unlink(), (c / "optim.safetensors").write_bytes(b"\x10\x00")),
            ["optim.safetensors"]),
        "checksums.json garbage": (lambda c: (c / "checksums.json").write_text("]"), ["checksums.json"]),
        "empty checkpoint directory": (lambda c: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in c.iterdir()],
                                       ["state.json", "runner.log_dir"]),
    }
    for name, (corrupt, names) in corruptions.items():
        run = fresh(f"corrupt-{len(RESULTS)}")
        corrupt(run / "checkpoint")
        refused(area, name, ["train", train_yaml(tmp, policy_dir, run, iters=4)], names, keep=run / "checkpoint")

    other = tmp / "other_policy"
    tiny_policy().save_pretrained(other)
    mismatches = {  # name: (policy dir, override, what the message must name)
        "resume with another algo (rwr)": (policy_dir, "algo=rwr", ["algo: checkpoint 'dppo', now 'rwr'"]),
        "resume with another algo (dsrl)": (policy_dir, "algo=dsrl", ["algo: checkpoint 'dppo', now 'dsrl'"]),
        "resume with another policy_path": (other, None, ["policy_path"]),
        "resume with dppo.critic_clock changed (network)": (policy_dir, "dppo.critic_clock=false", ["dppo.critic_clock"]),
        "resume with dppo.train_encoders changed (network)": (policy_dir, "dppo.train_encoders=true",
                                                              ["dppo.train_encoders"]),
        "resume with other policy_overrides": (policy_dir, "policy_overrides.noise.std_floor=0.3", ["policy_overrides"]),
    }
    for name, (pdir, override, names) in mismatches.items():
        run = fresh(f"mismatch-{len(RESULTS)}")
        argv = ["train", train_yaml(tmp, pdir, run, iters=4)] + ([override] if override else [])
        refused(area, name, argv, names, keep=run / "checkpoint")

    run = fresh("fresh-on-purpose")  # runner.resume=false: a fresh run, the old checkpoint kept aside
    before = snapshot(run / "checkpoint")
    rc, _, err, escaped = cli(["train", train_yaml(tmp, policy_dir, run, iters=1), "runner.resume=false"])
    kept = [p for p in run.iterdir() if p.name.startswith("checkpoint.before-")]
    ok = rc == 0 and state_iteration(run) == 1 and len(kept) == 1 and snapshot(kept[0]) == before
    record(area, "runner.resume=false over an existing checkpoint (fresh run, old one kept)",
           "accepted correctly" if ok else ("traceback" if escaped else "data lost"), err)

    run = fresh("resume-ok")  # a plain resume after the run stopped (SIGKILL-like): continues, nothing lost
    rc, _, err, escaped = cli(["train", train_yaml(tmp, policy_dir, run, iters=3)])
    record(area, "resume an intact checkpoint", "accepted correctly" if rc == 0 and state_iteration(run) == 3 else
           ("traceback" if escaped else "data lost"), err)


# ----------------------------------------------------------------------------------- config values
def config_cases(tmp: Path, policy_dir: Path):
    area = "config values"
    train_bad = {
        "runner.iterations=0": ["runner.iterations", "> 0"],
        "runner.iterations=-1": ["runner.iterations", "> 0"],
        "runner.steps_per_iter=0": ["runner.steps_per_iter", "> 0"],
        "runner.num_envs=0": ["runner.num_envs", "> 0"],
        "runner.eval_episodes=0": ["runner.eval_episodes", "> 0"],
        "runner.checkpoint_every=-1": ["runner.checkpoint_every", ">= 0"],
        "runner.group_size=3": ["runner.group_size", "divide"],
        "dppo.num_minibatches=0": ["dppo.num_minibatches", "> 0"],
        "dppo.update_epochs=0": ["dppo.update_epochs", "> 0"],
        "dppo.gamma=1.5": ["dppo.gamma", "[0, 1]"],
        "dppo.actor_lr=-1e-4": ["dppo.actor_lr", ">= 0"],
        "dppo.advantage=grpo": ["dppo.advantage", "'gae'"],
        "rwr.num_minibatches=0": ["rwr.num_minibatches", "> 0"],
        "rwr.max_weight=0": ["rwr.max_weight", "> 0"],
        "dsrl.batch_size=0": ["dsrl.batch_size", "> 0"],
        "dsrl.n_critics=0": ["dsrl.n_critics", ">= 1"],
        "dsrl.utd=0": ["dsrl.utd", "> 0"],
        "dsrl.critic_hidden=[]": ["dsrl.critic_hidden", "non-empty"],
        "algo=ppo": ["algo", "'dppo'"],
        "env.max_episode_steps=abc": ["env.max_episode_steps", "abc"],
        "env.max_episode_steps=-3": ["env.max_episode_steps", "> 0"],
        "env.num_envs=4 (runner-owned)": ["env.num_envs", "runner.num_envs"],
        "env.randomization.dynamics.mass=[-1.0,1.0]": ["dynamics.mass", "0 <= low"],
        "env.randomization.dynamics.damping=[-1.0,2.0]": ["dynamics.damping", "0 <= low"],
        "env.randomization.dynamics.friction=[-0.5,1.0]": ["dynamics.friction", "0 <= low"],
        "env.randomization.dynamics.action_delay=[-1,2]": ["dynamics.action_delay", "0 <= low"],
        "env.randomization.dynamics.action_noise=-0.05": ["dynamics.action_noise", ">= 0"],
        "env.randomization.dynamics.obs_noise=-1": ["dynamics.obs_noise", ">= 0"],
        "env.randomization.camera.pos_jitter=-0.1": ["camera.pos_jitter", ">= 0"],
        "policy_overrides.noise.kind=flow": ["policy_overrides.noise.kind", "trained with 'ddim'"],
        "policy_overrides.noise.train_steps=100": ["policy_overrides.noise.train_steps", "trained with 50"],
        "policy_overrides.horizon=8": ["policy_overrides.horizon", "trained with 4"],
        "policy_overrides.nosuchkey=1": ["policy_overrides.nosuchkey", "not a policy config key"],
        "runner.max_unstable_iters=-1": ["runner.max_unstable_iters", ">= 0"],
    }
    if not torch.cuda.is_available():
        train_bad["runner.device=cuda (no CUDA here)"] = ["runner.device", "cuda"]
    for override, names in train_bad.items():
        arg = override.split(" ")[0]
        log_dir = tmp / f"cfg-{len(RESULTS)}"
        task = "place" if arg.startswith("env.") else "toy"
        f = train_yaml(tmp, policy_dir, log_dir).read_text().replace("{task: toy}", f"{{task: {task}}}")
        (tmp / "cfg.yaml").write_text(f)
        refused(area, f"train {override}", ["train", tmp / "cfg.yaml", arg], names, nothing_at=[log_dir])

    out = tmp / "nothing"
    others = [
        ("pretrain steps=0", ["pretrain", "--data", tmp / "demos", "--out", out, "steps=0"], ["steps", "> 0"]),
        ("pretrain batch_size=0", ["pretrain", "--data", tmp / "demos", "--out", out, "batch_size=0"], ["batch_size"]),
        ("pretrain policy.horizon=0", ["pretrain", "--data", tmp / "demos", "--out", out, "policy.horizon=0"],
         ["policy.horizon", "> 0"]),
        ("pretrain policy.noise.eta=-1", ["pretrain", "--data", tmp / "demos", "--out", out, "policy.noise.eta=-1"],
         ["policy.noise.eta", ">= 0"]),
        ("pretrain policy.exec_steps > horizon", ["pretrain", "--data", tmp / "demos", "--out", out, "policy.horizon=4",
                                                  "policy.exec_steps=6"], ["policy.exec_steps", "horizon=4"]),
        ("collect --episodes 0", ["collect", "--task", "place", "--episodes", "0", "--out", out], ["--episodes", "> 0"]),
        ("collect --episodes -5", ["collect", "--task", "place", "--episodes", "-5", "--out", out], ["--episodes"]),
        ("collect --num-envs 0", ["collect", "--task", "place", "--num-envs", "0", "--out", out], ["--num-envs"]),
        ("collect --noise -0.1", ["collect", "--task", "place", "--noise", "-0.1", "--out", out], ["--noise", ">= 0"]),
        ("eval --episodes 0", ["eval", "--policy", policy_dir, "--task", "place", "--episodes", "0"], ["--episodes", "> 0"]),
        ("eval --episodes -2", ["eval", "--policy", policy_dir, "--task", "place", "--episodes", "-2"], ["--episodes"]),
        ("eval max_episode_steps=abc", ["eval", "--policy", policy_dir, "--task", "place", "max_episode_steps=abc"],
         ["max_episode_steps"]),
        ("eval randomization.dynamics.mass=[-1,1]", ["eval", "--policy", policy_dir, "--task", "place",
                                                     "randomization.dynamics.mass=[-1,1]"], ["dynamics.mass"]),
        ("demo runner.iterations=0", ["demo", f"out={out}", "runner.iterations=0"], ["runner.iterations"]),
    ]
    if not torch.cuda.is_available():
        others += [("pretrain device=cuda (no CUDA here)", ["pretrain", "--data", tmp / "demos", "--out", out, "device=cuda"],
                    ["device", "cuda"]),
                   ("eval device=cuda (no CUDA here)", ["eval", "--policy", policy_dir, "--task", "place", "device=cuda"],
                    ["device", "cuda"])]
    for name, argv, names in others:
        refused(area, name, argv, names, nothing_at=[out, Path(f"{out}.hdf5")])

    log_dir = tmp / "cfg-ok"  # a sampling override of a trained policy is fine
    f = train_yaml(tmp, policy_dir, log_dir, iters=1, extra="policy_overrides: {noise: {std_floor: 0.2, eta: 0.5}}\n")
    rc, _, err, escaped = cli(["train", f])
    record(area, "train policy_overrides of sampling only (std_floor, eta)",
           "accepted correctly" if rc == 0 and state_iteration(log_dir) == 1 else ("traceback" if escaped else "unclear error"),
           err)


# ----------------------------------------------------------------------------------- failures reported
class SplitEnv(ToyGoalEnv):
    """Envs [0, n_fast) succeed at once; the others time out after 8 steps; the last n_unstable diverge."""

    def __init__(self, n, n_fast=4, n_unstable=0):
        super().__init__(n, max_episode_steps=8)
        self.n_fast, self.n_unstable = n_fast, n_unstable

    def _success(self):
        return torch.arange(self.num_envs) < self.n_fast

    def _unstable(self):
        return torch.arange(self.num_envs) >= self.num_envs - self.n_unstable


def tb_scalars(run: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def small_cfg(run: Path, iters: int, spi: int = 2) -> TrainConfig:
    return TrainConfig(dppo=DPPOConfig(update_epochs=1, num_minibatches=2),
                       runner=RunnerConfig(iterations=iters, num_envs=8, steps_per_iter=spi, eval_every=0,
                                           checkpoint_every=1, log_dir=str(run), progress=False))


def failure_cases(tmp: Path):
    area = "failure reporting"
    from vla_rl.export import export_bundle

    cfg = tiny_policy(action_dim=4).cfg  # lift's action space, a 3-dim state: every lift observation is refused
    export_bundle(tiny_policy(action_dim=4), tmp / "bundle", env="lift")
    rc, out, err, escaped = cli(["eval", "--bundle", tmp / "bundle", "--task", "lift", "--episodes", "2", "--num-envs", "2",
                                 "max_episode_steps=3"])
    kind = ("traceback" if escaped else "silent wrong result" if rc == 0 else
            "clear error" if "safety holds:" in out and "held every control step" in err and "'state'" in out
            else "unclear error")
    record(area, f"eval --bundle whose observations do not match (state {cfg.state_dim} vs 13)", kind, err or out)

    run = tmp / "diverge"
    api_refused(area, "training where 5 of 8 envs diverge every iteration",
                lambda: train(small_cfg(run, 10), policy=tiny_policy(), env=SplitEnv(8, 0, n_unstable=5)),
                TrainingDiverged, ["more than half", "runner.max_unstable_iters"])
    logged = tb_scalars(run, "train/unstable_envs")
    record(area, "unstable env count logged to TensorBoard", "accepted correctly" if logged == [5.0] * 3
           else "silent wrong result", str(logged))

    run = tmp / "few_diverge"
    try:
        train(small_cfg(run, 3), policy=tiny_policy(), env=SplitEnv(8, 0, n_unstable=2))
        ok = tb_scalars(run, "train/unstable_envs") == [2.0] * 3
        record(area, "training where 2 of 8 envs diverge: goes on, count logged",
               "accepted correctly" if ok else "silent wrong result")
    except Exception:  # noqa: BLE001
        record(area, "training where 2 of 8 envs diverge: goes on, count logged", "traceback", traceback.format_exc())

    run = tmp / "biased"  # true success 0.5; the episodes ending in the first 1-decision rollout are all successes
    train(small_cfg(run, 4, spi=1), policy=tiny_policy(), env=SplitEnv(8, 4))
    rates = tb_scalars(run, "train/success_rate")
    record(area, "train/success_rate with fast successes, slow failures (truth 0.5)",
           "accepted correctly" if rates and all(abs(r - 0.5) < 1e-6 for r in rates) else "silent wrong result", str(rates))

    class OneStart(ToyGoalEnv):
        def _episode_info(self):
            return {"randomization": {"start_x": torch.zeros(self.num_envs)}}

    ev = evaluate(tiny_policy(), OneStart(4), 8, seed=0)
    empty = [r for r in ev["by_factor"]["start_x"] if r["n"] == 0]
    record(area, "per-factor table of a factor with one value (empty slices)",
           "silent wrong result" if empty else "accepted correctly", str(ev["by_factor"]))
    api_refused(area, "evaluate(num_episodes=0)", lambda: evaluate(tiny_policy(), ToyGoalEnv(4), 0), ValueError,
                ["num_episodes"])


def table() -> str:
    areas = list(dict.fromkeys(r["area"] for r in RESULTS))
    head = "| area | tried | " + " | ".join(KINDS) + " |\n|---|---|" + "---|" * len(KINDS) + "\n"
    rows = []
    for area in areas + ["total"]:
        sel = [r for r in RESULTS if area in ("total", r["area"])]
        cells = [str(sum(r["outcome"] == k for r in sel)) for k in KINDS]
        name = f"**{area}**" if area == "total" else area
        rows.append(f"| {name} | {len(sel)} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows)


def main_() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write every case and its outcome as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        policy_dir = tmp / "pre"
        tiny_policy().save_pretrained(policy_dir)
        good_run = tmp / "good"
        assert main(["train", str(train_yaml(tmp, policy_dir, good_run, iters=2))]) == 0
        cwd = os.getcwd()
        os.chdir(tmp)  # anything a case writes by default (runs/...) stays in the scratch directory
        try:
            checkpoint_cases(tmp, policy_dir, good_run)
            config_cases(tmp, policy_dir)
            failure_cases(tmp)
        finally:
            os.chdir(cwd)
    bad = [r for r in RESULTS if r["outcome"] not in ("clear error", "accepted correctly")]
    print(table())
    for r in bad:
        print(f"- {r['area']}: {r['case']} -> {r['outcome']}: {r['detail']}")
    if args.out:
        Path(args.out).write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main_()
