"""Plug in your own environment: a small Gymnasium task through the whole workflow.

    python examples/plug_in_gym_env.py --out runs/reach2d          # minutes on a laptop CPU
    python examples/plug_in_gym_env.py --out /tmp/r --tiny         # seconds: wiring only (the test runs this)

The task is defined here: a point in the plane, two targets, and an instruction saying which one to reach
("reach the left target" / "reach the right target"; the env reports it in its reset info, so one env is a
two-task suite). The env reports success as ``info["success"]`` and is registered with a 30-step time limit.
Everything after that is the library's ordinary command line, given the env as ``gym:<id>`` and the expert
as ``module:factory``:

    collect (custom expert, DART noise) -> pretrain (BC) -> train (DPPO) -> eval -> export -> eval --bundle
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np

ENV_ID = "VlaRlExample/Reach2D-v0"
STEP = 0.1  # metres per step at |action| = 1


class Reach2D(gym.Env):
    """State: the point's position and both targets' positions; action: a 2-D velocity in [-1, 1]."""

    observation_space = gym.spaces.Box(-2.0, 2.0, (6,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(-0.2, 0.2, 2)
        self.targets = np.array([[-0.6, 0.0], [0.6, 0.0]]) + self.np_random.uniform(-0.2, 0.2, (2, 2))
        self.goal = int(self.np_random.integers(2))
        return self._obs(), {"task": f"reach the {('left', 'right')[self.goal]} target"}

    def _obs(self):
        return np.concatenate([self.pos, self.targets.ravel()]).astype(np.float32)

    def step(self, action):
        self.pos = np.clip(self.pos + STEP * np.clip(action, -1.0, 1.0), -2.0, 2.0)
        success = bool(np.linalg.norm(self.pos - self.targets[self.goal]) < 0.08)
        # terminated on success; the 30-step TimeLimit wrapper adds truncated=True at the end
        return self._obs(), float(success), success, False, {"success": success}


gym.register(ENV_ID, entry_point=Reach2D, max_episode_steps=30)


def instruction_of(reset_info: dict) -> str:
    """The adapter's per-env instruction: read from the env's reset info (gym.instruction_fn)."""
    return reset_info["task"]


def make_expert(env):
    """``collect --expert``: factory(env) -> callable obs -> action ``[num_envs, 2]`` (batched, numpy)."""

    def act(obs):
        state = obs["state"].cpu().numpy()
        goal = np.array([0 if "left" in text else 1 for text in obs["instruction"]])
        target = state[:, 2:6].reshape(-1, 2, 2)[np.arange(len(goal)), goal]
        return np.clip((target - state[:, :2]) / STEP, -1.0, 1.0).astype(np.float32)

    return act


def main(out: str, tiny: bool = False, seed: int = 0) -> dict:
    from vla_rl.cli import main as vla_rl

    out = Path(out)
    module = __name__  # "__main__" when run as a script: import paths resolve in this process
    env = [f"gym.instruction_fn={module}:instruction_of", "gym.success_key=success", "gym.control_hz=20",
           "gym.action_hold=[zero]"]  # velocity commands: holding still is a zero action
    s = dict(episodes=8, envs=4, steps=20, iters=1, eval=8) if tiny else dict(episodes=200, envs=16, steps=1500,
                                                                             iters=15, eval=64)
    # a state-based task: no image tokens to fuse, a small MLP action head
    policy = ["policy.language_encoder=hash", "policy.head=mlp", "policy.horizon=4", "policy.exec_steps=2",
              "policy.noise.sample_steps=6", "policy.fusion_layers=0", "policy.mlp_head.hidden=256"]
    if tiny:
        policy += ["policy.mlp_head.hidden=32", "policy.critic_hidden=[32]", "policy.dit.d_model=32",
                   "policy.dit.n_heads=4", "policy.dit.n_layers=1"]

    def run(*argv):
        status = vla_rl([str(a) for a in argv])
        if status:
            raise SystemExit(f"vla-rl {argv[0]} failed with status {status}")

    run("collect", "--task", f"gym:{ENV_ID}", "--expert", f"{module}:make_expert", "--episodes", s["episodes"],
        "--num-envs", s["envs"], "--noise", 0.2, "--seed", seed, "--out", out / "demos", *env)
    run("pretrain", "--data", out / "demos", "--out", out / "pretrained", f"steps={s['steps']}", "batch_size=64",
        "progress=false", f"seed={seed}", *policy)
    (out / "train.yaml").write_text(
        f"policy_path: {out / 'pretrained'}\n"
        f"policy_overrides: {{noise: {{stochastic_steps: 3}}}}\n"
        f"env:\n  task: gym:{ENV_ID}\n  gym:\n    instruction_fn: {module}:instruction_of\n"
        f"    success_key: success\n    control_hz: 20\n    action_hold: [zero]\n"
        f"algo: dppo\nrunner:\n  iterations: {s['iters']}\n  num_envs: {s['envs'] * 2}\n  steps_per_iter: 8\n"
        f"  eval_every: 0\n  seed: {seed}\n  log_dir: {out / 'dppo'}\n  resume: false\n  progress: false\n")
    run("train", out / "train.yaml")
    policy_dir = out / "dppo" / "checkpoint" / "policy"
    for name, src in (("pretrained", out / "pretrained"), ("dppo", policy_dir)):
        run("eval", "--policy", src, "--task", f"gym:{ENV_ID}", "--episodes", s["eval"], "--num-envs", s["envs"],
            "--json", out / f"eval_{name}.json", *env)
    run("export", policy_dir, "--out", out / "bundle")  # the action space and its hold come from the run's env
    run("eval", "--bundle", out / "bundle", "--task", f"gym:{ENV_ID}", "--episodes", s["eval"],
        "--num-envs", s["envs"], "--json", out / "eval_bundle.json", *env)
    import json

    return {name: json.loads((out / f"eval_{name}.json").read_text()) for name in ("pretrained", "dppo", "bundle")}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/reach2d")
    parser.add_argument("--tiny", action="store_true", help="a few seconds: checks the wiring, learns nothing")
    parser.add_argument("--seed", type=int, default=0, help="demos, BC and RL seed (the evaluation episodes stay fixed)")
    args = parser.parse_args()
    results = main(args.out, args.tiny, args.seed)
    for name, r in results.items():
        print(f"{name:10s} success {r['success_rate']:.1%} over {r['num_episodes']} episodes")
    sys.exit(0)
