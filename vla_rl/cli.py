"""The ``vla-rl`` command. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


def _pretrain(args) -> None:
    from .pretrain import PretrainConfig, pretrain

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data={args.data}")
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = load_config(PretrainConfig, args.config or [], overrides)
    out = pretrain(cfg)
    print(f"pretrained policy written to {out}")


def _export(args) -> None:
    from .export import export_main

    export_main(args)


def _serve(args) -> None:
    from .deploy.server import serve_main

    serve_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-rl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="behaviour cloning of a diffusion/flow VLA policy on demos")
    p.add_argument("--data", help="demo directory or .hdf5 file")
    p.add_argument("--config", action="append", help="YAML config (repeatable; later files win)")
    p.add_argument("--out", help="checkpoint directory to write")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. steps=500 policy.horizon=8")
    p.set_defaults(func=_pretrain)

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
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"vla-rl {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
