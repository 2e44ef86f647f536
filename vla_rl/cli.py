"""The ``vla-rl`` command. Each subcommand is a thin shell over a library function.

    vla-rl demo                                   the whole story, small, on CPU MuJoCo
    vla-rl collect --task place --episodes 50 --out demos/place
    vla-rl collect --task gym:MyEnv-v0 --expert my_pkg.experts:make --out demos/mine gym.success_key=success
    vla-rl pretrain --data demos/place --out runs/pretrained [key=value ...]
    vla-rl train configs/train/place_dppo.yaml [key=value ...]
    vla-rl eval --policy runs/place_dppo/checkpoint/policy --task place [--split heldout]
    vla-rl eval --bundle bundles/place --task place
    vla-rl export runs/place_dppo/checkpoint/policy --out bundles/place
    vla-rl serve bundles/place --port 8765
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .config import ConfigError, check_value, check_values, gt, load_config


def _pretrain(args) -> None:
    from .pretrain import PretrainConfig, pretrain

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data={args.data}")
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = load_config(PretrainConfig, args.config or [], overrides)
    out = pretrain(cfg)
    if _is_rank0():
        print(f"pretrained policy written to {out}")


def _collect(args) -> None:
    from .collect import collect_demos
    from .envs import EnvConfig

    env_cfg = load_config(EnvConfig, args.env_config or [], [f"task={args.task}", *args.overrides])
    if args.cameras:
        env_cfg.cameras, env_cfg.image_size = list(args.cameras), list(args.image_size)
    check_values(env_cfg)
    result = collect_demos(env_cfg, args.episodes, args.out, num_envs=args.num_envs, noise=args.noise,
                           label=args.label, seed=args.seed, keep_failed=args.keep_failed, expert=args.expert)
    print(f"wrote {result['written']} episodes to {result['path']} "
          f"(expert success {result['success_rate']:.1%} over {result['attempted']} attempts)")


def load_train_config(paths, overrides):
    """The RL-stage config (``vla_rl.runner.TrainConfig``), with the env section checked key by key."""
    from .envs import EnvConfig, EnvError
    from .runner import TrainConfig

    cfg = load_config(TrainConfig, paths, overrides)
    env = dict(cfg.env)
    if env.get("task", "toy") != "toy":
        try:  # the env section is passed to make_env: reject unknown keys now, not mid-run
            EnvConfig.from_dict(env)
        except EnvError as e:
            raise ConfigError(f"env: {e}") from e
    return cfg


def _train(args) -> None:
    from .runner import train

    cfg = load_train_config(args.config, args.overrides)
    if not cfg.policy_path:
        raise ConfigError("policy_path is not set: the RL stage starts from a pretrained policy directory")
    run_dir = train(cfg)
    if _is_rank0():
        print(f"run written to {run_dir} (TensorBoard: tensorboard --logdir {run_dir}/tb)")


def _eval(args) -> None:
    import torch

    from .envs import EnvConfig, RandomizationConfig, make_env_from_config
    from .evaluate import evaluate, evaluate_bundle

    if bool(args.policy) == bool(args.bundle):
        raise ConfigError("give exactly one of --policy DIR or --bundle DIR")
    check_value("--episodes", args.episodes, gt(0))
    overrides = [f"task={args.task}", f"num_envs={args.num_envs}", *args.overrides]
    env_cfg = load_config(EnvConfig, args.env_config or [], overrides)
    check_values(env_cfg)  # the device too, before anything is loaded
    if args.split:
        env_cfg.randomization = dataclasses.replace(env_cfg.randomization or RandomizationConfig(), split=args.split)
    if args.policy:
        from .policy import VLAPolicy

        policy = VLAPolicy.from_pretrained(args.policy, device=env_cfg.device)
        _use_policy_cameras(policy.cfg.cameras, policy.cfg.image_size, env_cfg)
        env = make_env_from_config(env_cfg)
        with torch.no_grad():
            result = evaluate(policy, env, args.episodes, deterministic=args.deterministic, seed=args.seed,
                              video_path=args.video)
    else:
        from .deploy import PolicyRuntime

        runtime = PolicyRuntime.load(args.bundle)
        _use_policy_cameras(runtime.cameras, runtime.image_size, env_cfg)
        env = make_env_from_config(env_cfg)
        result = evaluate_bundle(runtime, env, args.episodes, seed=args.seed, video_path=args.video)
    env.close()
    _print_eval(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return _held_everything(result)


def _print_eval(result: dict) -> None:
    low, high = result["success_ci95"]
    print(f"success rate {result['success_rate']:.1%} (95% CI {low:.1%}-{high:.1%}) over {result['num_episodes']} "
          f"episodes; mean return {result['mean_return']:.3f}, mean length {result['mean_length']:.1f}")
    for factor, rows in result["by_factor"].items():
        cells = ", ".join(f"[{r['low']:.2f}, {r['high']:.2f}]: {r['success_rate']:.0%} (n={r['n']})" for r in rows)
        print(f"  {factor}: {cells}")
    if "holds" in result:
        reasons = "; ".join(f"{r} ({n}x)" for r, n in list(result["hold_reasons"].items())[:5])
        print(f"safety holds: {result['holds']} of {result['control_steps']} control steps"
              + (f" -- {reasons}" if reasons else ""))


def _held_everything(result: dict) -> int:
    """Exit status 3 when the safety filter held every step: the bundle never acted, so its success rate
    says nothing (typically its observation spec does not match the env)."""
    if result.get("holds") and result["holds"] == result.get("control_steps"):
        print("vla-rl eval: error: the bundle held every control step (see the reasons above); "
              "its success rate measures nothing", file=sys.stderr)
        return 3
    return 0


def _use_policy_cameras(cameras, image_size, env_cfg) -> None:
    """Render what the policy was trained to see, unless the env config names cameras itself."""
    if list(cameras) and not env_cfg.cameras:
        env_cfg.cameras, env_cfg.image_size = list(cameras), list(image_size)


def _demo(args) -> None:
    from .demo import DemoConfig, run_demo

    cfg = load_config(DemoConfig, args.config or [], args.overrides)
    check_values(cfg)  # the device too, before demos are collected
    run_demo(cfg)


def _export(args) -> None:
    from .export import export_main

    export_main(args)


def _serve(args) -> None:
    from .deploy.server import serve_main

    serve_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-rl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    overrides_help = "key=value config overrides (OmegaConf dot-list), e.g. runner.iterations=50"

    p = sub.add_parser("demo", help="end-to-end on CPU MuJoCo: collect demos, pretrain, fine-tune with DPPO, evaluate")
    p.add_argument("--config", action="append", help="YAML preset (schema vla_rl.demo.DemoConfig)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=_demo)

    env_help = "env spec: a task name (built-in or registered), gym:<id>, or module:factory"
    p = sub.add_parser("collect", help="record expert demonstrations (the built-in scripted experts or your own)")
    p.add_argument("--task", required=True, help=env_help)
    p.add_argument("--expert", help="module:factory of an expert: factory(env) -> callable obs -> action "
                                    "(default: the built-in task's scripted expert)")
    p.add_argument("--env-config", action="append", help="YAML env config (schema vla_rl.envs.EnvConfig)")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--out", required=True, help="directory (or .hdf5 file) to write")
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--noise", type=float, default=0.0, help="std of noise added to the executed expert action")
    p.add_argument("--label", choices=["expert", "executed"], default="expert",
                   help="record the expert's noise-free action (DART) or the executed, noisy one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cameras", nargs="*", default=[])
    p.add_argument("--image-size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    p.add_argument("--keep-failed", action="store_true", help="also write episodes the expert failed")
    p.add_argument("overrides", nargs="*", help="env config key=value overrides, e.g. gym.success_key=success")
    p.set_defaults(func=_collect)

    p = sub.add_parser("pretrain", help="behaviour cloning of a diffusion/flow VLA policy on demos")
    p.add_argument("--data", help="demo directory or .hdf5 file")
    p.add_argument("--config", action="append", help="YAML config (repeatable; later files win)")
    p.add_argument("--out", help="checkpoint directory to write")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("train", help="RL fine-tuning (DPPO or RWR) of a pretrained policy")
    p.add_argument("config", nargs="+", help="YAML config(s) (schema vla_rl.runner.TrainConfig), then key=value overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="success rate (95%% CI) of a policy or an exported bundle, per randomization factor")
    p.add_argument("--policy", help="policy directory (save_pretrained / a run's checkpoint/policy)")
    p.add_argument("--bundle", help="exported bundle directory: evaluates the torch-free runtime in the loop")
    p.add_argument("--task", required=True, help=env_help)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--split", choices=["train", "heldout"], help="randomization split (needs randomization on)")
    p.add_argument("--env-config", action="append", help="YAML env config (schema vla_rl.envs.EnvConfig)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--deterministic", action="store_true", help="deterministic denoising (eta = 0)")
    p.add_argument("--video", help="write an mp4 of env 0 (needs cameras and imageio)")
    p.add_argument("--json", help="write the full result as JSON")
    p.add_argument("overrides", nargs="*", help="env config key=value overrides, e.g. randomization.split=heldout")
    p.set_defaults(func=_eval)

    from .deploy.cli import add_export_arguments, add_serve_arguments

    p = sub.add_parser("export", help="export a policy checkpoint to a torch-free ONNX bundle")
    add_export_arguments(p)
    p.set_defaults(func=_export)
    p = sub.add_parser("serve", help="serve an exported bundle to a robot's control loop (websocket + msgpack)")
    add_serve_arguments(p)
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":  # split "a.yaml b.yaml k=v k2=v2" into files and overrides
        args.overrides = [a for a in args.config if "=" in a]
        args.config = [a for a in args.config if "=" not in a]
    from .train_monitor import TrainingDiverged

    name = _process_name(args.command)
    try:
        status = args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return _failed(e, 2)
    except ValueError as e:  # EnvError, CheckpointError, DataError, ObservationError: bad input, named
        print(f"{name}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return _failed(e, 2)
    except TrainingDiverged as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return _failed(e, 1)
    except Exception as e:
        _failed(e, 1)
        raise
    if args.command in ("train", "pretrain"):  # leave the process group torchrun started (if any) cleanly
        from .distributed import shutdown

        shutdown()
    return status or 0


def _is_rank0() -> bool:
    """Under torchrun, rank 0 alone reports what the job wrote."""
    import os

    return os.environ.get("RANK", "0") in ("", "0")


def _process_name(command: str) -> str:
    """``vla-rl train``, or ``vla-rl train [rank 1/4]`` in a process launched by torchrun."""
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    return f"vla-rl {command}" + (f" [rank {os.environ.get('RANK', '?')}/{world}]" if world not in ("", "1") else "")


def _failed(error: BaseException, code: int) -> int:
    """Under torchrun, write the error where the elastic agent reads it, so that its failure summary names
    this rank's exception (not only its exit code)."""
    import os

    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)
    return code


if __name__ == "__main__":
    sys.exit(main())
