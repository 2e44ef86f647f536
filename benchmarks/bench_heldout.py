"""The held-out randomization split: BC and DPPO trained under training-split randomization, evaluated on
the training split and on the held-out split. Not a test.

    python benchmarks/bench_heldout.py --seed 0 [--out runs/bench_heldout]
    python benchmarks/bench_heldout.py --seed 0 --config configs/demo/place_gaussian_control.yaml  # the control

The demo's recipe as ``DemoConfig`` holds it, or as a demo preset gives it (``--config``, e.g. the Gaussian-head
control): its demos, BC steps, policy, DPPO settings and budget (stop 16's table in BENCHMARKS.md ran it at 150
demos and 205k env steps, from random x_K), with
every env -- the expert's demos, the RL envs -- drawing its dynamics from configs/randomization/train.yaml.
The pretrained and the fine-tuned policy then run the same 128 episodes of each split (held-out: the wider
dynamics ranges and held-out visual draws of configs/randomization/heldout.yaml), deterministic and sampled.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from vla_rl.collect import collect_demos
from vla_rl.config import check_values, load_config
from vla_rl.demo import DemoConfig, demo_rl_noise
from vla_rl.envs import EnvConfig, RandomizationConfig, make_env
from vla_rl.evaluate import evaluate
from vla_rl.policy import VLAPolicy
from vla_rl.pretrain import PretrainConfig, pretrain
from vla_rl.runner import RunnerConfig, TrainConfig, train

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "randomization"


def split(name: str) -> RandomizationConfig:
    """configs/randomization/<name>.yaml, validated by its schema."""
    return load_config(EnvConfig, [PRESETS / f"{name}.yaml"]).randomization


def success(policy_dir, noise: dict, name: str, episodes: int, seed: int) -> dict:
    policy = VLAPolicy.from_pretrained(policy_dir, noise=noise)
    out = {}
    for mode in ("deterministic", "sampled"):
        env = make_env("place", 32, randomization=split(name), seed=seed)
        with torch.no_grad():
            r = evaluate(policy, env, episodes, deterministic=mode == "deterministic", seed=seed)
        env.close()
        out[mode] = {"success": r["success_rate"], "ci95": r["success_ci95"]}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/bench_heldout")
    p.add_argument("--config", action="append", default=[],
                   help="a demo preset (schema vla_rl.demo.DemoConfig; its `out` is not used), e.g. the Gaussian control")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    demo = load_config(DemoConfig, a.config, [f"seed={a.seed}"])
    check_values(demo)
    out = Path(a.out) / f"s{a.seed}"
    t0 = time.time()
    collect_demos("place", demo.demos, out / "demos", num_envs=16, noise=demo.demo_noise, seed=a.seed,
                  randomization=split("train"))
    pretrained = pretrain(PretrainConfig(data=str(out / "demos"), out=str(out / "pretrained"), policy=demo.policy,
                                         steps=demo.pretrain_steps, lr=demo.pretrain_lr, seed=a.seed,
                                         save_every=demo.pretrain_steps))
    t_bc = time.time() - t0
    noise = demo_rl_noise(demo)
    runner = RunnerConfig(**{**asdict(demo.runner), "log_dir": str(out / "dppo"), "seed": a.seed, "resume": False,
                             "progress": False})
    t1 = time.time()
    env = {"task": "place", "seed": a.seed, "randomization": asdict(split("train"))}  # recorded with the run's config
    run_dir = train(TrainConfig(policy_path=str(pretrained), env=env, algo="dppo", dppo=demo.dppo, runner=runner),
                    policy=VLAPolicy.from_pretrained(pretrained, noise=noise))
    t_rl = time.time() - t1
    result = {"seed": a.seed, "bc_minutes": t_bc / 60, "rl_minutes": t_rl / 60,
              "env_steps": demo.runner.iterations * demo.runner.num_envs * demo.runner.steps_per_iter
              * demo.policy.exec_steps}
    for stage, policy_dir in (("pretrained", pretrained), ("fine_tuned", run_dir / "checkpoint" / "policy")):
        for name, eval_seed in (("train", a.seed + 10_000), ("heldout", a.seed + 20_000)):
            result[f"{stage}_{name}"] = success(policy_dir, noise, name, a.episodes, eval_seed)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    fmt = lambda r: f"{r['success']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"  # noqa: E731
    for name in ("train", "heldout"):
        for mode in ("deterministic", "sampled"):
            print(f"seed {a.seed} {name:8s} {mode:13s}: pretrained {fmt(result[f'pretrained_{name}'][mode])} -> "
                  f"fine-tuned {fmt(result[f'fine_tuned_{name}'][mode])}")
    print(f"BC {t_bc / 60:.1f} min, RL {t_rl / 60:.1f} min ({result['env_steps']} env steps)")


if __name__ == "__main__":
    main()
