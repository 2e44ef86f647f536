"""Argument definitions of ``vla-rl export`` and ``vla-rl serve``, shared by ``vla_rl/cli.py`` and
``python -m vla_rl.deploy.server``; torch-free, so building the parser is cheap."""

from __future__ import annotations


def add_export_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="policy directory written by save_pretrained (e.g. a training run's policy/)")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--denoising-steps", type=int, default=None, help="K (default: the policy's noise.sample_steps)")
    parser.add_argument("--exec-steps", type=int, default=None, help="actions executed per chunk (default: the policy's)")
    parser.add_argument("--control-hz", type=float, default=10.0)
    parser.add_argument("--action-low", type=float, nargs="+", default=None, help="safety bounds (scalar or per dim)")
    parser.add_argument("--action-high", type=float, nargs="+", default=None)
    parser.add_argument("--max-delta", type=float, nargs="+", default=None, help="max per-step action change")
    parser.add_argument("--hold-action", type=float, nargs="+", default=None)
    parser.add_argument("--watchdog-timeout", type=float, default=0.5, help="seconds; <= 0 disables")
    parser.add_argument("--require-timestamp", action="store_true", help="hold on observations without a timestamp")
    parser.add_argument("--deterministic", action="store_true", help="export the eta=0 / ODE chain")
    parser.add_argument("--torchscript", action="store_true", help="also write a TorchScript artifact")
    parser.add_argument("--torch-export", action="store_true", help="also write a torch.export program (policy.pt2)")


def add_serve_arguments(parser) -> None:
    parser.add_argument("bundle", help="bundle directory written by `vla-rl export`")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default=None, help="require this token in hello (or set VLA_RL_SERVE_TOKEN)")
    parser.add_argument("--max-message-bytes", type=int, default=8 << 20)
    parser.add_argument("--mode", choices=["queue", "ensemble"], default="queue")
    parser.add_argument("--noise", choices=["random", "zeros"], default="random")
    parser.add_argument("--seed", type=int, default=0)
